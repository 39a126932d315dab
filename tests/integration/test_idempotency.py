"""Idempotency keys on a real guardian: a retried write is answered from its record, never applied twice.

A retry after a lost answer may come on a new session (the gateway re-opens one after a
guardian restart), so the record is keyed by agent and key, and the request is compared
without its session id.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from tests.support.harness import Guardian, agent_pb2, running_guardian

pb = agent_pb2
KEY = "retry-key-0123456789"


def open_session(guardian: Guardian, token: str) -> tuple[grpc.Channel, Any, str]:
    channel, stub = guardian.agent_stub()
    return channel, stub, stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id


def rows_of(guardian: Guardian, operation: str) -> list[dict[str, Any]]:
    return [row for row in guardian.audit_rows() if row["operation"] == operation]


def count(guardian: Guardian, content: str) -> int:
    with guardian.keyed_db() as db:
        return int(db.execute("SELECT count(*) FROM memories WHERE content = ?", (content,)).fetchone()[0])


def test_a_store_sent_twice_with_one_key_stores_once_and_answers_the_same(guardian: Guardian) -> None:
    token = guardian.add_agent("idem-store")
    channel, stub, session = open_session(guardian, token)
    with channel:
        request = pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="once only"), idempotency_key=KEY)
        first = stub.Store(request).memory
        again = stub.Store(request).memory
    assert again == first
    assert count(guardian, "once only") == 1
    store_rows = [row for row in rows_of(guardian, "memory.store") if row["agent"] == "idem-store"]
    assert [row["object_id"] for row in store_rows] == [first.id, first.id]
    assert store_rows[0]["reason"] == "ok"
    assert store_rows[1]["reason"].startswith("ok: a retry with the same idempotency key")


def test_a_retry_on_a_new_session_after_a_restart_gets_the_first_answer() -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("idem-restart")
        channel, stub, session = open_session(guardian, token)
        with channel:
            draft = pb.MemoryDraft(content="survives a restart", tags=["t"])
            first = stub.StoreBatch(pb.StoreBatchRequest(session_id=session, memories=[draft], idempotency_key=KEY))
        guardian.stop()
        guardian.start()
        channel, stub, session = open_session(guardian, token)  # the old session died with the guardian
        with channel:
            again = stub.StoreBatch(pb.StoreBatchRequest(session_id=session, memories=[draft], idempotency_key=KEY))
            deleted = stub.Delete(
                pb.DeleteRequest(session_id=session, id=first.memories[0].id, idempotency_key=KEY * 2)
            )
            deleted_again = stub.Delete(
                pb.DeleteRequest(session_id=session, id=first.memories[0].id, idempotency_key=KEY * 2)
            )
        assert again == first and deleted == deleted_again  # the second delete is answered, not NOT_FOUND
        assert count(guardian, "survives a restart") == 0


def test_a_key_used_for_another_request_is_refused_and_changes_nothing(guardian: Guardian) -> None:
    token = guardian.add_agent("idem-clash")
    channel, stub, session = open_session(guardian, token)
    with channel:
        stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="first"), idempotency_key=KEY))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="other"), idempotency_key=KEY))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already used for a different request" in (caught.value.details() or "")
    assert count(guardian, "other") == 0
    denied = [row for row in rows_of(guardian, "memory.store") if row["agent"] == "idem-clash"][-1]
    assert denied["decision"] == "deny" and denied["reason"].startswith("invalid_argument: idempotency_key")


def test_another_agent_cannot_replay_a_key(guardian: Guardian) -> None:
    owner, other = guardian.add_agent("idem-owner"), guardian.add_agent("idem-other")
    channel, stub, session = open_session(guardian, owner)
    with channel:
        mine = stub.Store(
            pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="mine"), idempotency_key=KEY)
        )
    channel, stub, session = open_session(guardian, other)
    with channel:
        theirs = stub.Store(
            pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="mine"), idempotency_key=KEY)
        )
    assert theirs.memory.id != mine.memory.id and theirs.memory.namespace == "idem-other"


@pytest.mark.parametrize("key", ["short", "x" * 65, "has space in it!!", "ünïcödé-key-0123456"])
def test_a_malformed_key_is_an_invalid_argument(guardian: Guardian, key: str) -> None:
    token = guardian.add_agent(f"idem-bad-{len(key)}-{key[:2].encode().hex()}")
    channel, stub, session = open_session(guardian, token)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="x"), idempotency_key=key))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "idempotency_key: 16-64 letters, digits, '_' or '-'"
