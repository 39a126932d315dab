"""The guardians the fuzzers run against, with data planted that the fuzzing agent must never see.

Agent world (one guardian for the agent-socket and MCP fuzzers): the agents
``fuzzer`` (raw gRPC) and ``mcp-fuzzer`` (through the gateway) on the
``fuzz`` profile (rate limits out of reach, may read ``team-notes`` and
write ``fuzz-shared``); ``bob``, another agent, who stores marker memories
(in content, tags and metadata) and one that the policy quarantines; each
fuzzing agent also stores one marker memory that is quarantined in its own
namespace; ``ghost``, a revoked agent. Every marker text, every agent token
and every key is a forbidden string: no answer on the agent socket and no
tool result may contain one. Anomaly detectors only log.

Admin world (its own guardian, so admin calls such as release, purge, revoke
or apply cannot change what the agent fuzzers rely on): an agent ``owner``
with one active and one quarantined marker memory. No admin answer may hold
a key, a token of an existing agent, or the active marker; the quarantined
marker only in a ShowQuarantined answer (the security team's view).

The pools (ids, cursors, names, versions) grow from what the guardian
answers, so later inputs name things that exist.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import yaml

from guardian.access.key_file import KeyFileSigner
from guardian.checks.filters import DEFAULT_FILTERS_YAML
from guardian.keys.ring import load_keys
from shared.rpc.guardian.v1 import admin_pb2, agent_pb2, agent_pb2_grpc
from tests.fuzz.protogen import Ref
from tests.fuzz.values import QUARANTINE_TRIGGER
from tests.support.harness import LOG_ONLY_ANOMALIES, AdminSigner, Guardian, _CallRecorder, running_guardian

__all__ = [
    "FUZZ_NAMESPACES",
    "AdminWorld",
    "AgentWorld",
    "Pool",
    "admin_world",
    "agent_world",
    "fuzz_policy",
    "memories_in",
    "recorded_channel",
]

#: Large enough for any answer (a page of 1000 memories of 64 KiB); the guardian accepts 64 MiB requests.
MAX_MESSAGE: Final = 256 * 1024 * 1024
_FAST: Final = {"burst": 1_000_000, "per_minute": 60_000_000}
#: What the fuzz profile reads besides the agent's own namespace.
FUZZ_NAMESPACES: Final = ("fuzz-shared", "team-notes")
_POOL_SIZE: Final = 64
#: A pool of ids with fewer entries than this is topped up before an id is picked from it.
_LOW_POOL: Final = 8


def fuzz_policy() -> dict[str, Any]:
    """Policy changes for ``running_guardian``.

    The fuzz profile, many sessions per agent, detectors that only log, and the shipped
    filters plus a quarantine rule.
    """
    filters = yaml.safe_load(DEFAULT_FILTERS_YAML)["filters"]
    filters.append({"name": "fuzz-quarantine", "action": "quarantine", "pattern": QUARANTINE_TRIGGER})
    return {
        "sessions": {"max_per_agent": 1000},
        "anomaly": LOG_ONLY_ANOMALIES,
        "profiles": {
            "fuzz": {
                "operations": ["store", "get", "search", "list", "update", "delete"],
                "namespaces": {"read": ["team-notes"], "write": ["fuzz-shared"]},
                "rate_limits": {
                    "session": {"reads": _FAST, "writes": _FAST},
                    "agent": {"reads": _FAST, "writes": _FAST},
                    "session_opens": _FAST,
                },
            }
        },
        "agents": {"fuzzer": "fuzz", "mcp-fuzzer": "fuzz"},
        "filters": filters,
    }


def recorded_channel(guardian: Guardian, socket_kind: str) -> grpc.Channel:
    """A channel like ``Guardian.channel`` (calls recorded for the audit cross-check) that takes large answers."""
    path = guardian.agent_socket if socket_kind == "agent" else guardian.admin_socket
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    channel = grpc.intercept_channel(
        grpc.insecure_channel(f"unix:{path}", options=options), _CallRecorder(socket_kind, guardian.calls)
    )
    if socket_kind == "admin":  # signed as the first admin (role security), as guardianctl would
        channel = grpc.intercept_channel(channel, AdminSigner(KeyFileSigner(guardian.admin_key)))
    return channel


@dataclass
class Pool:
    """The last few values of one kind the guardian issued."""

    items: list[str] = field(default_factory=list)

    def add(self, value: str) -> None:
        """Remember value (once), forgetting the oldest beyond the pool's size."""
        if value and value not in self.items:
            self.items.append(value)
            del self.items[:-_POOL_SIZE]

    def discard(self, value: str) -> None:
        """Forget value."""
        if value in self.items:
            self.items.remove(value)

    def pick(self, index: int, fallback: str) -> str:
        """The entry at index (modulo the size), or fallback when empty."""
        return self.items[index % len(self.items)] if self.items else fallback


def _key_strings(guardian: Guardian) -> list[str]:
    """Every key of the guardian, as the hex text it could leak as."""
    keys = load_keys(guardian.state_dir / "keys")
    found = [keys.database_hex]
    for ring in (keys.memory, keys.audit, keys.token):
        found.extend(key.hex() for key in ring.keys.values())
    return found


def _marker(label: str) -> str:
    """A marker text no fuzzer input can contain by chance."""
    return f"{label}-marker-{secrets.token_hex(8)}"


def _store(stub: agent_pb2_grpc.AgentServiceStub, session: str, content: str, **draft: Any) -> agent_pb2.Memory:
    """Store one memory on session and return it."""
    request = agent_pb2.StoreRequest(session_id=session, memory=agent_pb2.MemoryDraft(content=content, **draft))
    memory: agent_pb2.Memory = stub.Store(request, timeout=15).memory
    return memory


def _open(stub: agent_pb2_grpc.AgentServiceStub, token: str) -> agent_pb2.OpenSessionResponse:
    """Open a session with token."""
    answer: agent_pb2.OpenSessionResponse = stub.OpenSession(
        agent_pb2.OpenSessionRequest(agent_token=token), timeout=15
    )
    return answer


@dataclass(repr=False)
class AgentWorld:
    """The agent-socket fuzzers' guardian, agents, planted data and pools."""

    guardian: Guardian
    channel: grpc.Channel
    stub: agent_pb2_grpc.AgentServiceStub
    tokens: dict[str, str]
    session: agent_pb2.OpenSessionResponse
    #: Texts that must appear in no answer to a fuzzing agent.
    forbidden: list[str]
    #: Ids of memories the fuzzing agents must not read, change or delete: bob's and the quarantined ones.
    forbidden_ids: list[str]
    #: The planted memories as stored: id -> (who, content), for the check that they are unchanged.
    planted: dict[str, tuple[str, str]]
    foreign_cursor: str
    #: A session of mcp-fuzzer, to store memories the MCP fuzzer's pools are topped up with.
    mcp_session: str = ""
    own_ids: Pool = field(default_factory=Pool)
    cursors: Pool = field(default_factory=Pool)
    closed_sessions: Pool = field(default_factory=Pool)

    def __repr__(self) -> str:
        """Briefly: which guardian it fuzzes."""
        return f"AgentWorld({self.guardian.state_dir})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints this in a failing example: briefly."""
        printer.text(repr(self))

    @property
    def namespaces(self) -> frozenset[str]:
        """What the fuzzing agents may read: their own namespaces and the fuzz profile's shared ones."""
        return frozenset({"fuzzer", "mcp-fuzzer", *FUZZ_NAMESPACES})

    def fresh_session(self) -> str:
        """A new session of the fuzzing agent (for CloseSession, so the main one stays open)."""
        return _open(self.stub, self.tokens["fuzzer"]).session_id

    def resolve(self, ref: Ref) -> str:
        """The text a Ref stands for, now."""
        if ref.kind == "session":
            if ref.choice == "main":
                return self.session.session_id
            if ref.choice == "closed":
                return self.closed_sessions.pick(ref.index, "ses_closed-but-none-yet")
            return self.fresh_session()
        if ref.kind == "token":
            return {"own": self.tokens["fuzzer"], "other": self.tokens["bob"], "revoked": self.tokens["ghost"]}[
                ref.choice
            ]
        if ref.kind == "memory_id":
            if ref.choice == "forbidden":
                return self.forbidden_ids[ref.index % len(self.forbidden_ids)]
            return self.own_id(self.own_ids, self.session.session_id, ref.index)
        if ref.kind == "cursor":
            if ref.choice == "foreign":
                return self.foreign_cursor
            cursor = self.cursors.pick(ref.index, self.foreign_cursor)
            if ref.choice == "tampered":
                cut = ref.index % len(cursor)
                return cursor[:cut] + ("A" if cursor[cut] != "A" else "B") + cursor[cut + 1 :]
            return cursor
        if ref.kind == "query":
            words = [text for text in self.forbidden if "marker" in text]
            return words[ref.index % len(words)]
        raise AssertionError(f"no pool for {ref}")

    def own_id(self, pool: Pool, session: str, index: int) -> str:
        """An id from pool, which is first topped up (a memory stored on session) when it runs low."""
        if len(pool.items) < _LOW_POOL:
            pool.add(_store(self.stub, session, f"fuzz seed note {secrets.token_hex(4)}", tags=["fuzz"]).id)
        return pool.pick(index, "mem_" + "0" * 32)

    def learn(self, method: str, request: Any, response: Any) -> None:
        """Remember what a successful call issued (ids, cursors) and forget what it removed."""
        if method == "Delete":
            self.own_ids.discard(request.id)
        elif method == "CloseSession":
            self.closed_sessions.add(request.session_id)
        elif method == "OpenSession":
            return
        for memory in memories_in(response):
            self.own_ids.add(memory.id)
        if method == "List" and response.next_cursor:
            self.cursors.add(response.next_cursor)

    def check_planted_intact(self) -> None:
        """The planted memories are all still there, unchanged (bob reads his; the admin sees the held ones)."""
        bob = _open(self.stub, self.tokens["bob"])
        for memory_id, (who, content) in self.planted.items():
            if who == "held":
                # NOT_FOUND (an RpcError) here would mean it is no longer held.
                shown = self.guardian.admin("ShowQuarantined", admin_pb2.QuarantineRequest(id=memory_id))
                assert shown.content == content, f"the quarantined marker memory {memory_id} changed"
            else:
                got = self.stub.Get(agent_pb2.GetRequest(session_id=bob.session_id, id=memory_id), timeout=15).memory
                assert got.content == content, f"bob's marker memory {memory_id} changed"
        self.stub.CloseSession(agent_pb2.CloseSessionRequest(session_id=bob.session_id), timeout=15)


def memories_in(message: Any) -> list[Any]:
    """Every guardian.v1.Memory anywhere in a message."""
    found: list[Any] = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        for item in value if descriptor.is_repeated else [value]:
            if descriptor.message_type.full_name == "guardian.v1.Memory":
                found.append(item)
            else:
                found.extend(memories_in(item))
    return found


@contextmanager
def agent_world() -> Iterator[AgentWorld]:
    """A guardian with the fuzz policy, its agents and the planted memories; checks at the end they are intact."""
    with running_guardian(**fuzz_policy()) as guardian:
        tokens = {name: guardian.add_agent(name) for name in ("fuzzer", "mcp-fuzzer", "bob", "ghost")}
        guardian.revoke_agent("ghost")
        channel = recorded_channel(guardian, "agent")
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        markers = {name: _marker(name) for name in ("bob-content", "bob-tag", "bob-meta", "bob-second")}
        held_markers = {
            name: f"{QUARANTINE_TRIGGER} {_marker(name + '-held')}" for name in ("bob", "fuzzer", "mcp-fuzzer")
        }
        planted: dict[str, tuple[str, str]] = {}
        bob = _open(stub, tokens["bob"]).session_id
        first = _store(
            stub,
            bob,
            markers["bob-content"],
            tags=[markers["bob-tag"]],
            metadata_json=f'{{"secret": "{markers["bob-meta"]}"}}',
        )
        second = _store(stub, bob, markers["bob-second"])
        planted.update({first.id: ("bob", first.content), second.id: ("bob", second.content)})
        foreign_cursor = stub.List(agent_pb2.ListRequest(session_id=bob, page_size=1), timeout=15).next_cursor
        assert foreign_cursor
        for who, content in held_markers.items():
            session = bob if who == "bob" else _open(stub, tokens[who]).session_id
            held = _store(stub, session, content)
            assert held.status == "quarantined", held
            planted[held.id] = ("held", content)
            if who != "bob":
                stub.CloseSession(agent_pb2.CloseSessionRequest(session_id=session), timeout=15)
        stub.CloseSession(agent_pb2.CloseSessionRequest(session_id=bob), timeout=15)
        forbidden = [*markers.values(), *held_markers.values(), *tokens.values(), *_key_strings(guardian)]
        world = AgentWorld(
            guardian=guardian,
            channel=channel,
            stub=stub,
            tokens=tokens,
            session=_open(stub, tokens["fuzzer"]),
            mcp_session=_open(stub, tokens["mcp-fuzzer"]).session_id,
            forbidden=forbidden,
            forbidden_ids=list(planted),
            planted=planted,
            foreign_cursor=foreign_cursor,
        )
        try:
            yield world
            world.check_planted_intact()
        finally:
            channel.close()


@dataclass(repr=False)
class AdminWorld:
    """The admin-socket fuzzer's guardian, planted data and pools."""

    guardian: Guardian
    channel: grpc.Channel
    #: Texts no admin answer may hold.
    forbidden: list[str]
    #: Texts only a ShowQuarantined answer may hold (the content of quarantined memories).
    held_only: list[str]
    active_ids: list[str]
    #: The agent socket and a session of ``fuzzer``, to store memories that are held when the pool runs low.
    agent_stub: agent_pb2_grpc.AgentServiceStub
    tokens: dict[str, str]
    held_ids: Pool = field(default_factory=Pool)
    names: Pool = field(default_factory=Pool)
    versions: Pool = field(default_factory=Pool)

    def __repr__(self) -> str:
        """Briefly: which guardian it fuzzes."""
        return f"AdminWorld({self.guardian.state_dir})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints this in a failing example: briefly."""
        printer.text(repr(self))

    def resolve(self, ref: Ref) -> str:
        """The text a Ref stands for, now."""
        if ref.kind == "memory_id":
            if ref.choice == "active":
                return self.active_ids[ref.index % len(self.active_ids)]
            if len(self.held_ids.items) < _LOW_POOL:
                self._hold_one()
            return self.held_ids.pick(ref.index, "mem_" + "0" * 32)
        if ref.kind == "agent_name":
            return self.names.pick(ref.index, "owner")
        if ref.kind == "policy_version":
            version = self.versions.pick(ref.index, "0" * 64)
            if ref.choice == "prefix":
                return version[: 8 + ref.index % 56]
            if ref.choice == "short":
                return version[: ref.index % 8]
            return version
        if ref.kind in ("session", "token", "cursor", "query"):
            return ""  # not an admin notion: a method added later may still name such a field
        raise AssertionError(f"no pool for {ref}")

    def _hold_one(self) -> None:
        """Store a memory that a filter holds (by the fuzz policy or the shipped one), if the policy lets it.

        Applied policies may have changed the filters, the rate limits or the fuzzer's
        operations: then nothing is added, and the pool's fallback id is used.
        """
        content = f"{QUARANTINE_TRIGGER} <script>held {secrets.token_hex(4)}</script>"
        try:
            session = _open(self.agent_stub, self.tokens["fuzzer"]).session_id
            memory = _store(self.agent_stub, session, content)
            self.agent_stub.CloseSession(agent_pb2.CloseSessionRequest(session_id=session), timeout=15)
        except grpc.RpcError:
            return
        if memory.status == "quarantined":
            self.held_ids.add(memory.id)

    def learn(self, method: str, request: Any, response: Any) -> None:
        """Remember names, held ids and policy versions the guardian answered with."""
        if method == "AddAgent":
            self.names.add(response.name)
        elif method == "ListAgents":
            for agent in response.agents:
                self.names.add(agent.name)
        elif method == "ListQuarantine":
            for memory in response.memories:
                self.held_ids.add(memory.id)
        elif method == "PurgeQuarantined" or method == "ReleaseQuarantined":
            self.held_ids.discard(request.id)
        elif method == "PolicyHistory":
            for entry in response.entries:
                self.versions.add(entry.version)
        elif method in ("ShowPolicy", "ValidatePolicy", "ApplyPolicy"):
            self.versions.add(response.version)


@contextmanager
def admin_world() -> Iterator[AdminWorld]:
    """A guardian (the fuzz policy) with an agent ``owner`` holding an active and a quarantined marker memory."""
    with running_guardian(**fuzz_policy()) as guardian:
        tokens = {name: guardian.add_agent(name) for name in ("owner", "fuzzer")}
        channel = recorded_channel(guardian, "admin")
        agent_channel = recorded_channel(guardian, "agent")
        stub = agent_pb2_grpc.AgentServiceStub(agent_channel)
        session = _open(stub, tokens["owner"]).session_id
        active_marker = _marker("owner-active")
        held_marker = f"{QUARANTINE_TRIGGER} {_marker('owner-held')}"
        active = _store(stub, session, active_marker, tags=["owner"])
        held = _store(stub, session, held_marker)
        assert held.status == "quarantined", held
        stub.CloseSession(agent_pb2.CloseSessionRequest(session_id=session), timeout=15)
        world = AdminWorld(
            guardian=guardian,
            channel=channel,
            forbidden=[active_marker, *tokens.values(), *_key_strings(guardian)],
            held_only=[held_marker],
            active_ids=[active.id],
            agent_stub=stub,
            tokens=tokens,
        )
        world.held_ids.add(held.id)
        for name in ("owner", "fuzzer"):
            world.names.add(name)
        world.versions.add(guardian.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).version)
        try:
            yield world
        finally:
            channel.close()
            agent_channel.close()
