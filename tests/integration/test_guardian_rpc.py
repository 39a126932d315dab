"""The guardian over real gRPC on its real Unix socket: the contract, allow and deny paths.

A raw gRPC client here is exactly what a compromised gateway would be.
"""

from __future__ import annotations

import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import cast

import grpc
import pytest

from guardian.store import search_index
from shared.rpc.guardian.v1 import admin_pb2, admin_pb2_grpc, agent_pb2_grpc
from tests.support.harness import Guardian, agent_pb2, running_guardian

pb = agent_pb2
Alice = tuple[agent_pb2_grpc.AgentServiceStub, str]


@pytest.fixture(scope="module")
def alice(guardian: Guardian) -> Iterator[Alice]:
    token = guardian.add_agent("alice")
    channel, stub = guardian.agent_stub()
    session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
    yield stub, session
    channel.close()


def store(
    stub: agent_pb2_grpc.AgentServiceStub, session: str, content: str, tags: Iterable[str] = (), metadata: str = ""
) -> pb.Memory:
    request = pb.StoreRequest(
        session_id=session, memory=pb.MemoryDraft(content=content, tags=tags, metadata_json=metadata)
    )
    return stub.Store(request).memory


def count_memories(guardian: Guardian, agent: str) -> int:
    with guardian.keyed_db() as db:
        return cast(int, db.execute("SELECT count(*) FROM memories WHERE agent = ?", (agent,)).fetchone()[0])


def test_store_get_search_update_list_delete(guardian: Guardian, alice: Alice) -> None:
    stub, session = alice
    memory = store(
        stub, session, "The deploy key lives in the vault under ops/deploy", ["ops"], '{"b": 1, "a": [1, 2]}'
    )
    assert memory.id.startswith("mem_")
    assert memory.metadata_json == '{"a":[1,2],"b":1}'
    got = stub.Get(pb.GetRequest(session_id=session, id=memory.id)).memory
    assert got.content == memory.content and list(got.tags) == ["ops"]
    hits = stub.Search(pb.SearchRequest(session_id=session, query="where is the deploy vault?")).hits
    assert hits[0].memory.id == memory.id and hits[0].score > 0
    updated = stub.Update(
        pb.UpdateRequest(session_id=session, id=memory.id, content="moved to ops/keys", tags=pb.TagList(tags=["x"]))
    ).memory
    assert updated.content == "moved to ops/keys" and list(updated.tags) == ["x"]
    assert updated.metadata_json == memory.metadata_json
    assert not stub.Search(pb.SearchRequest(session_id=session, query="deploy vault")).hits
    stub.Delete(pb.DeleteRequest(session_id=session, id=memory.id))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Get(pb.GetRequest(session_id=session, id=memory.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    ops = [(row["operation"], row["decision"]) for row in guardian.audit_rows() if row["agent"] == "alice"]
    assert ops[-7:] == [
        ("memory.store", "allow"),
        ("memory.get", "allow"),
        ("memory.search", "allow"),
        ("memory.update", "allow"),
        ("memory.search", "allow"),
        ("memory.delete", "allow"),
        ("memory.get", "deny"),
    ]
    last = guardian.audit_rows()[-1]
    assert (last["operation"], last["decision"], last["object_id"]) == ("memory.get", "deny", memory.id)
    assert last["reason"].startswith("not_found")


def test_list_pages_with_a_cursor(guardian: Guardian) -> None:
    token = guardian.add_agent("pager")
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        batch = pb.StoreBatchRequest(
            session_id=session, memories=[pb.MemoryDraft(content=f"note {i}") for i in range(7)]
        )
        stored = [m.id for m in stub.StoreBatch(batch).memories]
        seen: list[str] = []
        cursor = ""
        pages = 0
        while True:
            page = stub.List(pb.ListRequest(session_id=session, page_size=3, cursor=cursor))
            seen += [m.id for m in page.memories]
            pages += 1
            cursor = page.next_cursor
            if not cursor:
                break
        assert pages == 3 and sorted(seen) == sorted(stored) and len(set(seen)) == 7
        with pytest.raises(grpc.RpcError) as caught:
            stub.List(pb.ListRequest(session_id=session, page_size=3, cursor="forged.cursor"))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_agents_see_only_their_own_memories(guardian: Guardian, alice: Alice) -> None:
    stub, session_a = alice
    secret = store(stub, session_a, "alice's private plan")
    token_b = guardian.add_agent("bob")
    session_b = stub.OpenSession(pb.OpenSessionRequest(agent_token=token_b)).session_id
    attempts: dict[str, Callable[[], object]] = {
        "get": lambda: stub.Get(pb.GetRequest(session_id=session_b, id=secret.id)),
        "update": lambda: stub.Update(pb.UpdateRequest(session_id=session_b, id=secret.id, content="pwned")),
        "delete": lambda: stub.Delete(pb.DeleteRequest(session_id=session_b, id=secret.id)),
    }
    for name, attempt in attempts.items():
        with pytest.raises(grpc.RpcError) as caught:
            attempt()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, name
        row = guardian.audit_rows()[-1]
        assert (row["agent"], row["decision"], row["object_id"]) == ("bob", "deny", secret.id)
    assert not stub.Search(pb.SearchRequest(session_id=session_b, query="private plan")).hits
    assert not stub.List(pb.ListRequest(session_id=session_b)).memories
    assert stub.Get(pb.GetRequest(session_id=session_a, id=secret.id)).memory.content == "alice's private plan"


BAD_STORES = [
    ("empty content", pb.MemoryDraft(content=""), "content: must not be empty"),
    ("blank content", pb.MemoryDraft(content="  \n "), "content: must not be empty"),
    ("content over limit", pb.MemoryDraft(content="x" * 65_537), "over the limit of 65536 bytes"),
    ("metadata not an object", pb.MemoryDraft(content="a", metadata_json="[1]"), "must be a JSON object"),
    ("metadata not JSON", pb.MemoryDraft(content="a", metadata_json="{nope"), "not valid JSON"),
    ("metadata NaN", pb.MemoryDraft(content="a", metadata_json='{"a": NaN}'), "not valid JSON"),
    ("metadata over limit", pb.MemoryDraft(content="a", metadata_json='{"a":"' + "y" * 5000 + '"}'), "over the limit"),
    ("too many tags", pb.MemoryDraft(content="a", tags=[f"t{i}" for i in range(17)]), "over the limit of 16"),
    ("tag too long", pb.MemoryDraft(content="a", tags=["t" * 65]), "over the limit of 64"),
    ("empty tag", pb.MemoryDraft(content="a", tags=[""]), "must not be empty"),
]


@pytest.mark.parametrize(("name", "draft", "message"), BAD_STORES, ids=[case[0] for case in BAD_STORES])
def test_bad_store_is_refused_audited_and_stores_nothing(
    guardian: Guardian, alice: Alice, name: str, draft: pb.MemoryDraft, message: str
) -> None:
    stub, session = alice
    before = count_memories(guardian, "alice")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Store(pb.StoreRequest(session_id=session, memory=draft))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    assert count_memories(guardian, "alice") == before
    row = guardian.audit_rows()[-1]
    assert (row["agent"], row["operation"], row["decision"]) == ("alice", "memory.store", "deny")
    assert row["reason"].startswith("invalid_argument") and len(row["policy_version"]) == 64


def test_batch_is_all_or_nothing(guardian: Guardian, alice: Alice) -> None:
    stub, session = alice
    before = count_memories(guardian, "alice")
    drafts = [pb.MemoryDraft(content="fine"), pb.MemoryDraft(content="")]
    with pytest.raises(grpc.RpcError) as caught:
        stub.StoreBatch(pb.StoreBatchRequest(session_id=session, memories=drafts))
    assert "memories[1].content" in (caught.value.details() or "")
    too_many = [pb.MemoryDraft(content="x")] * 21
    with pytest.raises(grpc.RpcError) as caught:
        stub.StoreBatch(pb.StoreBatchRequest(session_id=session, memories=too_many))
    assert "batch limit of 20" in (caught.value.details() or "")
    assert count_memories(guardian, "alice") == before


@pytest.mark.parametrize(
    "memory_id", ["", "mem_nothex", "mem_" + "0" * 32, "../../etc/passwd", "1 OR 1=1", "mem_" + "a" * 31 + "'"]
)
def test_ids_the_guardian_never_issued(guardian: Guardian, alice: Alice, memory_id: str) -> None:
    stub, session = alice
    with pytest.raises(grpc.RpcError) as caught:
        stub.Get(pb.GetRequest(session_id=session, id=memory_id))
    expected = grpc.StatusCode.NOT_FOUND if memory_id.startswith("mem_0") else grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.code() == expected
    assert guardian.audit_rows()[-1]["decision"] == "deny"


@pytest.mark.parametrize("query", ['"', "*", "NEAR(", "AND", 'fox" OR "', "content:fox", "^fox", "a AND NOT b"])
def test_fts_syntax_is_never_interpreted(guardian: Guardian, alice: Alice, query: str) -> None:
    stub, session = alice
    store(stub, session, "and near the fox there is content")
    try:
        hits = stub.Search(pb.SearchRequest(session_id=session, query=query, mode=pb.SEARCH_MODE_LEXICAL)).hits
    except grpc.RpcError as error:
        # Only a query with no word at all is refused, and clearly.
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs at least one word" in (error.details() or "")
        return
    words = {word for term in search_index.query_terms(query) for word in term}  # stopwords left out
    stored = {w.lower() for w in re.findall(r"\w+", "and near the fox there is content")}
    assert bool(hits) == bool(words & stored), "found exactly when the memory holds one of the query's words"
    for hit in hits:
        assert words & {w.lower() for w in re.findall(r"\w+", hit.memory.content)}


def test_invalid_utf8_and_unknown_fields_are_refused(guardian: Guardian, alice: Alice) -> None:
    _, session = alice
    channel = grpc.insecure_channel(f"unix:{guardian.agent_socket}")
    raw = channel.unary_unary("/guardian.v1.AgentService/Store", request_serializer=None, response_deserializer=None)
    session_field = b"\x0a" + bytes([len(session)]) + session.encode()
    bad_utf8 = session_field + b"\x12\x04\x0a\x02\xff\xfe"
    unknown = session_field + b"\x12\x03\x0a\x01a" + b"\xa0\x06\x01"
    for payload, message in ((bad_utf8, "malformed"), (unknown, "does not know")):
        with pytest.raises(grpc.RpcError) as caught:
            raw(payload)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or "")
        assert guardian.audit_rows()[-1]["decision"] == "deny"
    channel.close()


def test_tokens_and_sessions(guardian: Guardian) -> None:
    channel, stub = guardian.agent_stub()
    with channel:
        for token in ("", "agt_" + "A" * 43, "not-a-token"):
            with pytest.raises(grpc.RpcError) as caught:
                stub.OpenSession(pb.OpenSessionRequest(agent_token=token))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            row = guardian.audit_rows()[-1]
            assert (row["operation"], row["decision"]) == ("session.open", "deny")
        for session in ("", "ses_" + "x" * 32):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="x")))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = guardian.add_agent("carol")
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="before revoke")))
        assert guardian.revoke_agent("carol") == 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="after revoke")))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            stub.OpenSession(pb.OpenSessionRequest(agent_token=token))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert count_memories(guardian, "carol") == 1
    audit_text = repr(guardian.audit_rows())
    assert token not in audit_text and session not in audit_text


def test_expired_session_is_refused() -> None:
    with running_guardian(sessions={"idle_timeout": "1s", "max_lifetime": "1h"}) as guardian:
        token = guardian.add_agent("sleepy")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
            time.sleep(1.2)
            with pytest.raises(grpc.RpcError) as caught:
                stub.List(pb.ListRequest(session_id=session))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "expired" in (caught.value.details() or "")
            assert guardian.audit_rows()[-1]["reason"].startswith("unauthenticated")


def test_policy_denies_operations_a_profile_lacks() -> None:
    with running_guardian(agents={"reader": "read-only"}) as guardian:
        token = guardian.add_agent("reader")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
            with pytest.raises(grpc.RpcError) as caught:
                stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="x")))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            row = guardian.audit_rows()[-1]
            assert (row["decision"], row["operation"]) == ("deny", "memory.store")
            assert stub.List(pb.ListRequest(session_id=session)).next_cursor == ""


def test_tampered_memory_is_data_loss_never_returned(guardian: Guardian, alice: Alice) -> None:
    stub, session = alice
    memory = store(stub, session, "pay the invoice to account 1234")
    with guardian.keyed_db() as db:
        db.execute("UPDATE memories SET content = ? WHERE id = ?", ("pay the invoice to account 9999", memory.id))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Get(pb.GetRequest(session_id=session, id=memory.id))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert "9999" not in (caught.value.details() or "")
    row = guardian.audit_rows()[-1]
    assert (row["decision"], row["object_id"]) == ("deny", memory.id) and row["reason"].startswith("data_loss")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Update(pb.UpdateRequest(session_id=session, id=memory.id, content="launder it"))
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS


def test_admin_service_is_not_on_the_agent_socket(guardian: Guardian) -> None:
    channel = grpc.insecure_channel(f"unix:{guardian.agent_socket}")
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            admin_pb2_grpc.AdminServiceStub(channel).AddAgent(admin_pb2.AddAgentRequest(name="intruder"))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    row = guardian.audit_rows()[-1]
    assert (row["operation"], row["decision"], row["object_id"]) == (
        "rpc.unknown",
        "deny",
        "/guardian.v1.AdminService/AddAgent",
    )
    admin = grpc.insecure_channel(f"unix:{guardian.admin_socket}")
    with admin:
        with pytest.raises(grpc.RpcError) as caught:
            admin.unary_unary(
                "/guardian.v1.AgentService/OpenSession", request_serializer=None, response_deserializer=None
            )(b"")
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_files_and_sockets_are_private(guardian: Guardian) -> None:
    assert stat.S_IMODE(guardian.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((guardian.state_dir / "keys").stat().st_mode) == 0o700
    for key in (guardian.state_dir / "keys").iterdir():
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(guardian.database.stat().st_mode) == 0o600
    for sock in (guardian.agent_socket, guardian.admin_socket):
        info = sock.lstat()
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert stat.S_IMODE(guardian.agent_socket.parent.stat().st_mode) == 0o700
    assert not guardian.database.read_bytes()[:16].startswith(b"SQLite format 3")


def test_health_service_on_both_sockets(guardian: Guardian) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for sock, service in ((guardian.agent_socket, "guardian.v1.AgentService"), (guardian.admin_socket, "")):
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
