"""GuardianClient against a fake guardian on a real Unix socket."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from gateway.client import UNAVAILABLE_MESSAGE, GuardianClient
from gateway.models import MemoryDraft
from shared.errors import (
    DataLoss,
    FailedPrecondition,
    GuardianError,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from shared.rpc.guardian.v1 import agent_pb2 as pb
from tests.support.fake_guardian import (
    LIMITS,
    OTHER_TOKEN,
    QUARANTINE_TRIGGER,
    READ_WINDOW_MS,
    TOKEN,
    UNKNOWN_TOKEN,
    FakeGuardian,
    fake_guardian,
)

pytestmark = pytest.mark.anyio


async def test_every_rpc_round_trips_plain_values() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        info = await client.open_session(TOKEN)
        assert info.agent == "agent-a"
        assert info.limits.max_batch == LIMITS.max_batch
        assert info.limits.max_metadata_depth == LIMITS.max_metadata_depth == 6
        assert info.idle_timeout_ms == 600_000
        assert info.namespaces == ("agent-a", "news", "team") and info.read_window_ms == READ_WINDOW_MS
        sid = info.session_id

        stored = await client.store(sid, MemoryDraft("the sky is blue", ("colour",), '{"k":1}'))
        assert stored.id.startswith("mem_") and stored.tags == ("colour",) and stored.metadata_json == '{"k":1}'
        assert (stored.namespace, stored.author, stored.status) == ("agent-a", "agent-a", "active")
        batch = await client.store_batch(sid, [MemoryDraft("grass is green"), MemoryDraft("blue whale")])
        assert [m.content for m in batch] == ["grass is green", "blue whale"]
        assert {(m.namespace, m.author, m.status) for m in batch} == {("agent-a", "agent-a", "active")}

        got = await client.get(sid, stored.id)
        assert got.content == "the sky is blue" and got == stored
        hits = (await client.search(sid, "blue", limit=5)).hits
        assert {h.memory.id for h in hits} == {stored.id, batch[1].id}
        assert all(isinstance(h.score, float) for h in hits)

        first = await client.list(sid, page_size=2)
        assert len(first.memories) == 2 and first.next_cursor is not None
        rest = await client.list(sid, page_size=2, cursor=first.next_cursor)
        assert len(rest.memories) == 1 and rest.next_cursor is None

        updated = await client.update(sid, stored.id, tags=["sky"])
        assert updated.tags == ("sky",) and updated.content == "the sky is blue"
        updated = await client.update(sid, stored.id, content="the sky is grey", metadata_json="")
        assert updated.content == "the sky is grey" and updated.metadata_json == ""

        await client.delete(sid, stored.id)
        with pytest.raises(NotFound, match="no memory with that id"):
            await client.get(sid, stored.id)
        await client.close_session(sid)
        assert guardian.fake.closed == [sid]


async def test_namespaces_go_out_with_the_draft_and_come_back_with_the_memory() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        sid = (await client.open_session(TOKEN)).session_id
        shared = await client.store(sid, MemoryDraft("standup at ten", namespace="team"))
        assert (shared.namespace, shared.author) == ("team", "agent-a")
        batch = await client.store_batch(sid, [MemoryDraft("mine"), MemoryDraft("ours", namespace="team")])
        assert [m.namespace for m in batch] == ["agent-a", "team"]
        with pytest.raises(PermissionDenied, match="namespace news"):  # readable, not writable
            await client.store(sid, MemoryDraft("x", namespace="news"))
        with pytest.raises(PermissionDenied):  # all or none
            await client.store_batch(sid, [MemoryDraft("y"), MemoryDraft("z", namespace="elsewhere")])
        assert len(guardian.fake.memories) == 3

        other = await client.open_session(OTHER_TOKEN)
        assert other.namespaces == ("agent-b",) and other.read_window_ms == READ_WINDOW_MS
        with pytest.raises(NotFound):
            await client.get(other.session_id, shared.id)


async def test_a_quarantined_store_says_so_and_reads_never_show_it() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        sid = (await client.open_session(TOKEN)).session_id
        held = await client.store(sid, MemoryDraft(f"{QUARANTINE_TRIGGER} notes"))
        assert held.status == "quarantined"
        batch = await client.store_batch(sid, [MemoryDraft("fine"), MemoryDraft(QUARANTINE_TRIGGER)])
        assert [m.status for m in batch] == ["active", "quarantined"]
        updated = await client.update(sid, batch[0].id, content=f"now {QUARANTINE_TRIGGER}")
        assert updated.status == "quarantined"
        with pytest.raises(NotFound):
            await client.get(sid, held.id)
        assert not (await client.search(sid, "notes")).hits and not (await client.list(sid)).memories


class _Misfiling(FakeGuardian):
    """A buggy guardian: stores into the agent's own namespace whatever the draft asked."""

    async def Store(self, request: pb.StoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.StoreResponse:
        request.memory.namespace = ""
        return await super().Store(request, context)


class _NoNamespaces(FakeGuardian):
    """A buggy guardian: opens sessions that name no namespace."""

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.OpenSessionResponse:
        response = await super().OpenSession(request, context)
        response.ClearField("namespaces")
        return response


async def test_answers_that_do_not_fit_the_request_are_internal_errors() -> None:
    leaky = FakeGuardian(leak_quarantined=True)
    async with fake_guardian(leaky) as guardian, GuardianClient(guardian.path) as client:
        sid = (await client.open_session(TOKEN)).session_id
        held = await client.store(sid, MemoryDraft(QUARANTINE_TRIGGER))
        for read in (client.get(sid, held.id), client.search(sid, "script"), client.list(sid)):
            with pytest.raises(InternalError):  # a read that shows a quarantined memory: fail closed
                await read
    async with fake_guardian(_Misfiling()) as guardian, GuardianClient(guardian.path) as client:
        sid = (await client.open_session(TOKEN)).session_id
        assert (await client.store(sid, MemoryDraft("own"))).namespace == "agent-a"
        with pytest.raises(InternalError):
            await client.store(sid, MemoryDraft("shared", namespace="team"))
    async with fake_guardian(_NoNamespaces()) as guardian, GuardianClient(guardian.path) as client:
        with pytest.raises(InternalError):
            await client.open_session(TOKEN)


def test_values_hide_content_and_session_ids_from_repr() -> None:
    draft = MemoryDraft("a secret plan", ("t",), '{"secret": 1}')
    assert "secret" not in repr(draft)


STATUS_TABLE = [
    (grpc.StatusCode.INVALID_ARGUMENT, "content is over 4096 bytes", InvalidArgument, "content is over 4096 bytes"),
    (grpc.StatusCode.PERMISSION_DENIED, "refused by policy", PermissionDenied, "refused by policy"),
    (grpc.StatusCode.UNAUTHENTICATED, "unknown session", Unauthenticated, "unknown session"),
    (grpc.StatusCode.NOT_FOUND, "no memory with that id", NotFound, "no memory with that id"),
    (grpc.StatusCode.FAILED_PRECONDITION, "not now", FailedPrecondition, "not now"),
    (grpc.StatusCode.DATA_LOSS, "integrity check failed", DataLoss, "integrity check failed"),
    (grpc.StatusCode.UNAVAILABLE, "shutting down", Unavailable, UNAVAILABLE_MESSAGE),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "slow", Unavailable, UNAVAILABLE_MESSAGE),
    (grpc.StatusCode.CANCELLED, "server shutting down", Unavailable, UNAVAILABLE_MESSAGE),
    (grpc.StatusCode.INTERNAL, "a stack trace /var/lib/x", InternalError, "internal error"),
    (grpc.StatusCode.UNKNOWN, "boom", InternalError, "internal error"),
    (grpc.StatusCode.UNIMPLEMENTED, "", InternalError, "internal error"),
]


@pytest.mark.parametrize(("code", "details", "error", "message"), STATUS_TABLE)
async def test_each_status_code_maps_to_one_shared_error(
    code: grpc.StatusCode, details: str, error: type[GuardianError], message: str
) -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        sid = (await client.open_session(TOKEN)).session_id
        guardian.fake.inject("Store", code, details, times=10)  # retryable codes too: every retry fails
        with pytest.raises(GuardianError) as caught:
            await client.store(sid, MemoryDraft("x"))
        assert type(caught.value) is error
        assert caught.value.message == message


async def test_rate_limit_carries_retry_after_from_trailing_metadata() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        sid = (await client.open_session(TOKEN)).session_id
        guardian.fake.inject(
            "Store", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many writes", trailing=(("retry-after-ms", "1200"),)
        )
        with pytest.raises(RateLimited) as caught:
            await client.store(sid, MemoryDraft("x"))
        assert caught.value.retry_after_ms == 1200
        assert caught.value.message == "too many writes"
        guardian.fake.inject("Store", grpc.StatusCode.RESOURCE_EXHAUSTED, "")  # no trailer: a safe default
        with pytest.raises(RateLimited) as caught:
            await client.store(sid, MemoryDraft("x"))
        assert caught.value.retry_after_ms == 1000


async def test_open_session_with_a_refused_token_is_unauthenticated() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        with pytest.raises(Unauthenticated):
            await client.open_session(UNKNOWN_TOKEN)


async def test_calls_are_retried_on_unavailable_and_a_write_keeps_its_idempotency_key() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        sid = (await client.open_session(TOKEN)).session_id
        memory = await client.store(sid, MemoryDraft("x"))

        guardian.fake.inject("Get", grpc.StatusCode.UNAVAILABLE, "busy", times=2)
        assert (await client.get(sid, memory.id)).id == memory.id
        assert guardian.fake.calls["Get"] == 3

        guardian.fake.inject("Search", grpc.StatusCode.UNAVAILABLE, "busy", times=10)
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await client.search(sid, "x")
        assert guardian.fake.calls["Search"] == 4  # bounded: 4 attempts
        assert time.monotonic() - started < 2.5

        # A write whose answer was lost is sent again with the same key, so the guardian can
        # answer it from its record instead of storing it twice; a new write gets a new key.
        guardian.fake.inject("Store", grpc.StatusCode.UNAVAILABLE, "busy")
        await client.store(sid, MemoryDraft("y"))
        first, failed, retried = guardian.fake.store_keys
        assert guardian.fake.calls["Store"] == 3
        assert failed == retried and len(failed) >= 16 and first != failed
        await client.store(sid, MemoryDraft("z"), idempotency_key="k" * 20)
        assert guardian.fake.store_keys[-1] == "k" * 20


async def test_a_stopped_guardian_is_reported_quickly_not_after_the_deadline() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path, deadline_s=5.0) as client:
        sid = (await client.open_session(TOKEN)).session_id
        await guardian.stop()
        for call in (client.store(sid, MemoryDraft("x")), client.get(sid, "mem_" + "0" * 32)):
            started = time.monotonic()
            with pytest.raises(Unavailable, match="retry in a few seconds"):
                await call
            assert time.monotonic() - started < 3.0


async def test_a_hung_guardian_hits_the_deadline() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path, deadline_s=0.3) as client:
        sid = (await client.open_session(TOKEN)).session_id
        guardian.fake.delay_s = 2.0
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await client.get(sid, "mem_" + "0" * 32)
        assert time.monotonic() - started < 1.0


async def test_the_client_reconnects_after_a_guardian_restart() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        await client.open_session(TOKEN)
        await guardian.stop()
        await guardian.start()
        await asyncio.sleep(0)
        # A read rides out the reconnect with its retries.
        assert (await client.open_session(TOKEN)).agent == "agent-a"


def test_only_absolute_filesystem_socket_paths() -> None:
    for bad in ("agent.sock", "unix-abstract:agent", "./agent.sock"):
        with pytest.raises(ValueError, match="absolute"):
            GuardianClient(bad)


async def test_a_closed_client_reports_unavailable() -> None:
    async with fake_guardian() as guardian:
        client = GuardianClient(guardian.path)
        await client.close()
        with pytest.raises(Unavailable):
            await client.open_session(TOKEN)
