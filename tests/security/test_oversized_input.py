"""Too much: messages over the server's receive limit, and fields over the policy's limits.

Size is shape, so the contract's answer is INVALID_ARGUMENT (UNAUTHENTICATED for a
token, which is checked first), with a message that names the field and its limit,
never the content; the attempt is audited and nothing is stored. The guardian runs
the shipped limits: content 64 KiB, metadata 4 KiB and 8 levels, 16 tags of 64
bytes, batches of 20, pages of 100, queries of 512 bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import grpc
import pytest

from tests.security.hostile import Agent, Attack, AuditWatch, enrol, marker, refused
from tests.security.wire import field, message
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
MARK: Final = marker()
MIB: Final = 1 << 20
#: The guardian's grpc.max_receive_message_length (guardian/daemon/server.py).
SERVER_MAX_RECEIVE: Final = 64 * MIB


@dataclass
class World:
    """The attacker's agent and one memory of its own to update."""

    agent: Agent
    memory_id: str


@pytest.fixture(scope="module")
def world(guardian: Guardian) -> Iterator[World]:
    """The attacker's agent, with one memory of its own."""
    with enrol(guardian, "bulky") as agent:
        yield World(agent, agent.store("a memory to update").id)


def _draft(**fields: Any) -> pb.MemoryDraft:
    """A draft with a marked content, fields overriding."""
    return pb.MemoryDraft(**{"content": f"note {MARK}", **fields})


def _store(**fields: Any) -> Callable[[World], object]:
    """A Store of a draft with these fields."""
    return lambda w: w.agent.stub.Store(
        pb.StoreRequest(session_id=w.agent.session, memory=_draft(**fields)), timeout=30
    )


def _update(**fields: Any) -> Callable[[World], object]:
    """An Update of the agent's memory setting these fields."""
    return lambda w: w.agent.stub.Update(
        pb.UpdateRequest(session_id=w.agent.session, id=w.memory_id, **fields), timeout=30
    )


def _nested(depth: int) -> str:
    """Metadata whose value is nested depth arrays deep (depth + 1 levels in all)."""
    return '{"a": ' + "[" * depth + f'"{MARK}"' + "]" * depth + "}"


@dataclass(frozen=True)
class Case:
    """One oversized field: the attack, the call, the status, the audit operation, what the message names."""

    attack: Attack
    attempt: Callable[[World], object]
    operation: str
    names: str
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


FIELD_CASES: Final = (
    Case(
        Attack("oversize.content", "content one byte over max_content_bytes"),
        _store(content=MARK + "x" * (65_537 - len(MARK))),
        "memory.store",
        "over the limit of 65536 bytes",
    ),
    Case(
        Attack("oversize.content-multibyte", "content under the limit in characters but over it in UTF-8 bytes"),
        _store(content=MARK + "\U0001f600" * 16_384),
        "memory.store",
        "over the limit of 65536 bytes",
    ),
    Case(
        Attack("oversize.content-10mib", "10 MiB of content"),
        _store(content=MARK + "x" * (10 * MIB)),
        "memory.store",
        "memory.content",
    ),
    Case(
        Attack("oversize.update-content", "an Update with 1 MiB of content"),
        _update(content=MARK + "x" * MIB),
        "memory.update",
        "content",
    ),
    Case(
        Attack("oversize.batch-item", "a StoreBatch whose second memory is over the content limit"),
        lambda w: w.agent.stub.StoreBatch(
            pb.StoreBatchRequest(session_id=w.agent.session, memories=[_draft(), _draft(content=MARK + "x" * 70_000)]),
            timeout=30,
        ),
        "memory.store_batch",
        "memories[1].content",
    ),
    Case(
        Attack("oversize.batch-count", "a StoreBatch of 10,000 memories"),
        lambda w: w.agent.stub.StoreBatch(
            pb.StoreBatchRequest(session_id=w.agent.session, memories=[_draft()] * 10_000), timeout=30
        ),
        "memory.store_batch",
        "batch limit of 20",
    ),
    Case(
        Attack("oversize.tag-count", "17 tags where 16 are allowed"),
        _store(tags=[f"{MARK}{index}" for index in range(17)]),
        "memory.store",
        "17 tags is over the limit of 16",
    ),
    Case(
        Attack("oversize.tag-count-100k", "100,000 distinct tags"),
        _store(tags=[f"t{index}" for index in range(100_000)]),
        "memory.store",
        "over the limit of 16",
    ),
    Case(
        Attack("oversize.tag-bytes", "a tag of 33 two-byte characters (66 bytes, limit 64)"),
        _store(tags=[MARK + "\u00e9" * 33]),
        "memory.store",
        "memory.tags[0]",
    ),
    Case(
        Attack("oversize.update-tags", "an Update with 17 tags"),
        _update(tags=pb.TagList(tags=[f"{MARK}{index}" for index in range(17)])),
        "memory.update",
        "tags",
    ),
    Case(
        Attack("oversize.metadata-bytes", "metadata over max_metadata_bytes"),
        _store(metadata_json=json.dumps({"a": MARK + "y" * 5000})),
        "memory.store",
        "memory.metadata",
    ),
    Case(
        Attack("oversize.metadata-10mib", "10 MiB of metadata"),
        _store(metadata_json=json.dumps({"a": MARK + "y" * (10 * MIB)})),
        "memory.store",
        "memory.metadata",
    ),
    Case(
        Attack("oversize.metadata-many-keys", "metadata with 2,000 small keys"),
        _store(metadata_json=json.dumps({f"k{index}": index for index in range(2000)})),
        "memory.store",
        "memory.metadata",
    ),
    Case(
        Attack("oversize.metadata-depth", "metadata nested 9 levels (limit 8)"),
        _store(metadata_json=_nested(8)),
        "memory.store",
        "nested 9 levels deep",
    ),
    Case(
        Attack("oversize.metadata-recursion", "metadata nested 5,000 levels, to overflow a recursive parser"),
        _store(metadata_json=_nested(5000)),
        "memory.store",
        "nested",
    ),
    Case(
        Attack("oversize.query", "a search query one byte over max_query_bytes"),
        lambda w: w.agent.stub.Search(pb.SearchRequest(session_id=w.agent.session, query=MARK + "q" * 513), timeout=30),
        "memory.search",
        "query",
    ),
    Case(
        Attack("oversize.query-1mib", "a 1 MiB search query of many words"),
        lambda w: w.agent.stub.Search(
            pb.SearchRequest(session_id=w.agent.session, query=(MARK + " word") * (MIB // 20)), timeout=30
        ),
        "memory.search",
        "query",
    ),
    Case(
        Attack("oversize.search-limit", "a search limit of 2^32-1 results"),
        lambda w: w.agent.stub.Search(
            pb.SearchRequest(session_id=w.agent.session, query="note", limit=2**32 - 1), timeout=30
        ),
        "memory.search",
        "limit",
    ),
    Case(
        Attack("oversize.page-size", "a list page size of 2^32-1"),
        lambda w: w.agent.stub.List(pb.ListRequest(session_id=w.agent.session, page_size=2**32 - 1), timeout=30),
        "memory.list",
        "page_size",
    ),
    Case(
        Attack("oversize.id", "a 1 MiB memory id"),
        lambda w: w.agent.stub.Get(
            pb.GetRequest(session_id=w.agent.session, id="mem_" + MARK * (MIB // 14)), timeout=30
        ),
        "memory.get",
        "id",
    ),
    Case(
        Attack("oversize.namespace", "a 1 MiB namespace name"),
        _store(namespace=MARK * (MIB // 14)),
        "memory.store",
        "namespace",
    ),
    Case(
        Attack("oversize.cursor", "a 1 MiB list cursor"),
        lambda w: w.agent.stub.List(pb.ListRequest(session_id=w.agent.session, cursor=MARK * (MIB // 14)), timeout=30),
        "memory.list",
        "cursor",
    ),
    Case(
        Attack("oversize.token", "a 1 MiB agent token"),
        lambda w: w.agent.stub.OpenSession(pb.OpenSessionRequest(agent_token="agt_" + MARK * (MIB // 14)), timeout=30),
        "session.open",
        "token",
        grpc.StatusCode.UNAUTHENTICATED,
    ),
)

MESSAGE_ATTACKS: Final = (
    Attack("oversize.message-over-server-max", "one request message over the server's 64 MiB receive limit"),
    Attack(
        "oversize.compressed-bomb", "a gzip-compressed request (about 64 KiB on the wire) that inflates past 64 MiB"
    ),
)

ATTACKS: Final = tuple(case.attack for case in FIELD_CASES) + MESSAGE_ATTACKS


def nothing_stored(guardian: Guardian, world: World) -> None:
    """The agent still has only its one memory, and no memory anywhere holds the marker."""
    with guardian.keyed_db() as db:
        count = db.execute("SELECT count(*) FROM memories WHERE agent = ?", (world.agent.name,)).fetchone()[0]
        planted = db.execute(
            "SELECT count(*) FROM memories WHERE content LIKE ? OR tags LIKE ? OR metadata LIKE ?", (f"%{MARK}%",) * 3
        ).fetchone()[0]
    assert (count, planted) == (1, 0)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.attack.id) for case in FIELD_CASES])
def test_oversized_fields_are_refused(guardian: Guardian, world: World, case: Case) -> None:
    refusal = refused(
        guardian,
        lambda: case.attempt(world),
        case.code,
        case.operation,
        payloads=[MARK],
        agent="" if case.code == grpc.StatusCode.UNAUTHENTICATED else world.agent.name,
    )
    if case.code == grpc.StatusCode.INVALID_ARGUMENT:
        assert case.names in refusal.details
    assert len(refusal.details) < 300
    nothing_stored(guardian, world)


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.id) for a in MESSAGE_ATTACKS])
def test_messages_over_the_receive_limit_are_refused_and_audited(
    guardian: Guardian, world: World, attack: Attack
) -> None:
    # What the request holds matters only if the guardian ever reads it: 64 MiB of content for this session.
    fill = b"\x00" if attack.id == "oversize.compressed-bomb" else b"x"
    payload = message(
        field(1, world.agent.session.encode()),
        field(2, field(1, MARK.encode() + fill * (SERVER_MAX_RECEIVE + 1024))),
    )
    compression = grpc.Compression.Gzip if attack.id == "oversize.compressed-bomb" else None
    watch = AuditWatch(guardian)
    # A channel of its own, outside the harness's records: this test checks the audit row itself.
    with grpc.insecure_channel(f"unix:{guardian.agent_socket}") as channel:
        call = channel.unary_unary(
            "/guardian.v1.AgentService/Store", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(payload, timeout=60, compression=compression)
    del payload
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code().name}: {error.details()}"
    assert MARK not in (error.details() or "")
    rows = watch.rows()
    assert rows, "an oversized request left no audit row"
    assert (rows[0]["operation"], rows[0]["decision"]) == ("memory.store", "deny")
    assert rows[0]["reason"].startswith("invalid_argument:")
    nothing_stored(guardian, world)
