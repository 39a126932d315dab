"""What every hostile-gateway test asserts, in one place, and the attacker's tools.

For each attack the suite asserts, through :func:`refused` (or :func:`served` for
attacks whose payload the guardian must treat as inert data):

- the exact status code: never OK for a forbidden request, never INTERNAL, UNKNOWN;
- the error message and trailing metadata echo neither the attack's payload nor an
  internal path (a file name, a traceback, SQL);
- the attempt wrote exactly one audit row: its operation, decision ``deny`` and a
  reason starting with the error kind (``not_found: ...``), and that row holds no
  payload either;

and each module checks that nothing forbidden was stored or returned. Audit rows
are matched by sequence: the rows after the highest ``seq`` seen just before the
attempt (tests in a module run one after another on the module's guardian).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.rpc.guardian.v1 import agent_pb2_grpc
from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, running_guardian

__all__ = [
    "AGENT_METHODS",
    "NEVER",
    "OPERATION",
    "Agent",
    "Attack",
    "AuditWatch",
    "Refusal",
    "assert_serving",
    "cases",
    "enrol",
    "hostile_guardian",
    "marker",
    "memory_row",
    "raw_call",
    "refused",
    "served",
    "trailers",
    "unique_name",
]

pb = agent_pb2
T = TypeVar("T")

#: The agent service's methods and the audit operation each must be recorded under (the contract, written out).
OPERATION: Final[dict[str, str]] = {
    "OpenSession": "session.open",
    "CloseSession": "session.close",
    "Store": "memory.store",
    "StoreBatch": "memory.store_batch",
    "Get": "memory.get",
    "Search": "memory.search",
    "List": "memory.list",
    "Update": "memory.update",
    "Delete": "memory.delete",
}
AGENT_METHODS: Final = tuple(OPERATION)

#: The audit reason's prefix for each status a denial may carry.
ERROR_KIND: Final[dict[grpc.StatusCode, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limited",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.UNIMPLEMENTED: "unimplemented",
}
#: Statuses an attack must never get: OK (it was forbidden), INTERNAL and UNKNOWN (bad input is not a fault).
NEVER: Final = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
#: Text that would betray internals in an error: paths, tracebacks, SQL, the storage engine.
_INTERNAL_TELLS: Final = (
    "/tmp/",
    "/work/",
    "/home/",
    "/run/",
    "/var/",
    "site-packages",
    ".py",
    "traceback",
    "exception",
    "sqlite",
    "sqlcipher",
    "select ",
    "insert ",
    "fts5",
)
#: The only trailing metadata a denial may carry.
_ALLOWED_TRAILERS: Final = frozenset({"retry-after-ms"})


@dataclass(frozen=True)
class Attack:
    """One distinct attack: an id (``family.case``) and one line saying what it tries."""

    id: str
    tries: str
    #: The decision its audit row carries: "deny"; "allow" when the payload is inert data the guardian
    #: serves as such (an injection string in a search); "" when it never reaches the request pipeline
    #: (a connection that stalls, the health service), so there is no request to audit.
    audited_as: str = "deny"


def cases(attacks: Sequence[Attack]) -> list[Any]:
    """The attacks as pytest parameters, each test case named by its attack id."""
    return [pytest.param(attack, id=attack.id) for attack in attacks]


_names = itertools.count(1)


def unique_name(prefix: str) -> str:
    """A fresh agent name (agents cannot be re-added, so every test enrols its own)."""
    return f"{prefix}-{next(_names)}-{secrets.token_hex(2)}"


def marker(prefix: str = "hx") -> str:
    """A random, distinctive string to plant in a payload and then look for in every output."""
    return f"{prefix}{secrets.token_hex(6)}"


# -- the guardian ----------------------------------------------------------------------------------


def assert_serving(guardian: Guardian) -> None:
    """The guardian process is alive and its agent socket answers health checks with SERVING."""
    assert guardian.process is not None and guardian.process.poll() is None, "the guardian process died"
    with grpc.insecure_channel(f"unix:{guardian.agent_socket}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@contextmanager
def hostile_guardian(**policy_changes: Any) -> Iterator[Guardian]:
    """A guardian for one module (anomaly detectors only log, unless the policy says otherwise).

    When the module ends it must still be alive and serving; then the harness checks
    that every call made through its channels has its audit row.
    """
    with running_guardian(**{"anomaly": LOG_ONLY_ANOMALIES, **policy_changes}) as guardian:
        yield guardian
        assert_serving(guardian)


# -- agents ------------------------------------------------------------------------------------------


@dataclass
class Agent:
    """An enrolled agent with an open session, on a channel whose calls the harness records."""

    name: str
    token: str
    session: str
    channel: grpc.Channel
    stub: agent_pb2_grpc.AgentServiceStub
    opened: list[str] = field(default_factory=list)

    def store(self, content: str, **draft: Any) -> agent_pb2.Memory:
        """Store one memory through the agent's session."""
        request = pb.StoreRequest(session_id=self.session, memory=pb.MemoryDraft(content=content, **draft))
        return self.stub.Store(request, timeout=20).memory

    def open_session(self) -> str:
        """Open another session with the agent's token."""
        session = self.stub.OpenSession(pb.OpenSessionRequest(agent_token=self.token), timeout=20).session_id
        self.opened.append(session)
        return session

    def listed_ids(self, session: str | None = None) -> set[str]:
        """Every memory id List shows this session, all pages."""
        ids: set[str] = set()
        cursor = ""
        while True:
            page = self.stub.List(pb.ListRequest(session_id=session or self.session, cursor=cursor), timeout=20)
            ids.update(memory.id for memory in page.memories)
            cursor = page.next_cursor
            if not cursor:
                return ids

    def close(self) -> None:
        """Close the channel (sessions end with the guardian)."""
        self.channel.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def enrol(guardian: Guardian, prefix: str, *, exact: bool = False) -> Agent:
    """Add a fresh agent (named prefix-N-XXXX, or prefix itself when exact) and open a session for it."""
    name = prefix if exact else unique_name(prefix)
    token = guardian.add_agent(name)
    channel, stub = guardian.agent_stub()
    session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token), timeout=20).session_id
    return Agent(name=name, token=token, session=session, channel=channel, stub=stub)


def raw_call(guardian: Guardian, method: str, payload: bytes, *, timeout: float = 20) -> bytes:
    """Send payload as the request bytes of an agent-socket method (recorded for the audit cross-check)."""
    path = method if method.startswith("/") else f"/guardian.v1.AgentService/{method}"
    with guardian.channel() as channel:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        reply: bytes = call(payload, timeout=timeout)
        return reply


def memory_row(guardian: Guardian, memory_id: str) -> dict[str, Any] | None:
    """A memory's stored row, every column, read with the database key (None if it is gone)."""
    with guardian.keyed_db() as db:
        cursor = db.execute("SELECT * FROM memories WHERE id = ?", (memory_id,))
        names = [column[0] for column in cursor.description]
        row = cursor.fetchone()
    return None if row is None else dict(zip(names, row, strict=True))


# -- the audit trail -----------------------------------------------------------------------------


class AuditWatch:
    """The audit rows written since it was made (alerts and the security team's own calls left out)."""

    def __init__(self, guardian: Guardian) -> None:
        self._guardian = guardian
        with guardian.keyed_db() as db:
            self.since = int(db.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0])

    def rows(self) -> list[dict[str, Any]]:
        """New request rows, in order."""
        with self._guardian.keyed_db() as db:
            cursor = db.execute("SELECT * FROM audit WHERE seq > ? ORDER BY seq", (self.since,))
            names = [column[0] for column in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        return [row for row in rows if not row["operation"].startswith("anomaly.") and not row["agent"].startswith("@")]

    def only_row(self) -> dict[str, Any]:
        """The one new request row (fails if there is none or more than one)."""
        rows = self.rows()
        assert len(rows) == 1, f"expected exactly one audit row, got {len(rows)}: {rows}"
        return rows[0]


def _assert_no_echo(text: str, payloads: Sequence[str], where: str) -> None:
    """Fail if text holds any payload (case-insensitively); where names the output."""
    folded = text.lower()
    for payload in payloads:
        assert payload.lower() not in folded, f"{where} echoes the attack payload {payload[:40]!r}: {text[:200]!r}"


def trailers(error: grpc.RpcError) -> dict[str, str]:
    """The trailing metadata of a failed call, as a mapping."""
    items: Any = error.trailing_metadata() or ()
    return {str(name): str(value) for name, value in items}


@dataclass(frozen=True)
class Refusal:
    """What a refused attack got back, and the audit row it left."""

    error: grpc.RpcError
    row: dict[str, Any]

    @property
    def details(self) -> str:
        """The error message the attacker saw."""
        return self.error.details() or ""


def refused(
    guardian: Guardian,
    attempt: Callable[[], object],
    code: grpc.StatusCode,
    operation: str,
    *,
    payloads: Sequence[str] = (),
    agent: str | None = None,
) -> Refusal:
    """Run attempt, which must fail with code and leave one deny row for operation.

    payloads: distinctive strings of the attack (markers, secrets) that must appear neither in the
    error nor in the audit row. agent: the agent the row must name ("" for a request that never
    resolved one); None to skip that check.
    """
    assert code not in NEVER and code in ERROR_KIND, f"{code} is not a status an attack may get"
    watch = AuditWatch(guardian)
    with pytest.raises(grpc.RpcError) as caught:
        attempt()
    error = caught.value
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()!r}"
    details = error.details() or ""
    _assert_no_echo(details, payloads, "the error message")
    _assert_no_echo(details, _INTERNAL_TELLS, "the error message")
    names = set(trailers(error))
    assert names <= _ALLOWED_TRAILERS, f"unexpected trailing metadata: {names}"
    row = watch.only_row()
    assert (row["operation"], row["decision"]) == (operation, "deny"), row
    assert row["reason"].startswith(ERROR_KIND[code] + ":"), row
    if agent is not None:
        assert row["agent"] == agent, row
    _assert_no_echo(repr(row), payloads, "the audit row")
    return Refusal(error, row)


def served(
    guardian: Guardian, attempt: Callable[[], T], operation: str, *, payloads: Sequence[str] = ()
) -> tuple[T, dict[str, Any]]:
    """Run attempt, an attack whose payload must be treated as plain data: it succeeds with one allow row."""
    watch = AuditWatch(guardian)
    result = attempt()
    row = watch.only_row()
    assert (row["operation"], row["decision"]) == (operation, "allow"), row
    _assert_no_echo(repr(row), payloads, "the audit row")
    return result, row
