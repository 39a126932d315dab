"""SessionBroker: one guardian session per MCP session, re-opened transparently."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.client import GuardianClient
from gateway.models import MemoryDraft
from gateway.sessions import TOKEN_REJECTED_MESSAGE, SessionBroker, token_fingerprint
from shared.errors import NotFound, RateLimited, Unauthenticated, Unavailable
from tests.support.fake_guardian import OTHER_TOKEN, TOKEN, UNKNOWN_TOKEN, fake_guardian

pytestmark = pytest.mark.anyio


async def test_parallel_calls_share_one_session() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        used = await asyncio.gather(*(broker.run(None, TOKEN, lambda sid: asyncio.sleep(0, sid)) for _ in range(10)))
        assert len(set(used)) == 1
        assert guardian.fake.calls["OpenSession"] == 1


async def test_scopes_and_tokens_get_their_own_sessions() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)

        async def session_of(scope: str | None, token: str) -> str:
            return await broker.run(scope, token, lambda sid: asyncio.sleep(0, sid))

        a = await session_of(None, TOKEN)
        assert await session_of(None, TOKEN) == a
        b = await session_of("mcp-session-1", TOKEN)
        c = await session_of(None, OTHER_TOKEN)
        assert len({a, b, c}) == 3
        assert guardian.fake.sessions[c] == "agent-b"


async def test_a_restart_is_invisible_the_call_is_repeated_once_on_a_new_session() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        memory = await broker.run(None, TOKEN, lambda sid: client.store(sid, MemoryDraft("kept")))
        guardian.fake.restart()
        got = await broker.run(None, TOKEN, lambda sid: client.get(sid, memory.id))
        assert got.content == "kept"
        assert guardian.fake.calls["OpenSession"] == 2
        assert guardian.fake.calls["Get"] == 2  # refused once, then done


async def test_parallel_calls_after_a_restart_reopen_only_once() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        await broker.run(None, TOKEN, lambda sid: asyncio.sleep(0))
        guardian.fake.restart()
        await asyncio.gather(*(broker.run(None, TOKEN, client.list) for _ in range(5)))
        assert guardian.fake.calls["OpenSession"] == 2


async def test_a_refused_token_says_so_and_is_not_retried() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        with pytest.raises(Unauthenticated) as caught:
            await broker.run(None, UNKNOWN_TOKEN, client.list)
        assert caught.value.message == TOKEN_REJECTED_MESSAGE
        assert UNKNOWN_TOKEN not in str(caught.value)
        assert guardian.fake.calls["OpenSession"] == 1


async def test_a_token_revoked_while_in_use_is_reported_as_refused() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        await broker.run(None, TOKEN, client.list)
        del guardian.fake.tokens[TOKEN]
        guardian.fake.restart()  # revocation ends the agent's sessions
        with pytest.raises(Unauthenticated, match="not accepted"):
            await broker.run(None, TOKEN, client.list)
        assert not await broker.verify(TOKEN)  # the stale session no longer vouches for the token


async def test_other_errors_pass_through_unchanged_and_are_not_retried() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        with pytest.raises(NotFound):
            await broker.run(None, TOKEN, lambda sid: client.get(sid, "mem_" + "0" * 32))
        assert guardian.fake.calls["Get"] == 1


async def test_verify_opens_a_spare_session_the_first_mcp_session_takes() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        assert await broker.verify(TOKEN)
        assert await broker.verify(TOKEN)  # cached: no second OpenSession
        spare = next(iter(guardian.fake.sessions))
        used = await broker.run("mcp-1", TOKEN, lambda sid: asyncio.sleep(0, sid))
        assert used == spare
        assert guardian.fake.calls["OpenSession"] == 1
        assert await broker.verify(TOKEN)  # a live session vouches for the token
        assert guardian.fake.calls["OpenSession"] == 1


async def test_concurrent_verifies_share_one_open_session() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        assert all(await asyncio.gather(*(broker.verify(TOKEN) for _ in range(8))))
        assert guardian.fake.calls["OpenSession"] == 1


async def test_verify_expires_after_its_ttl() -> None:
    now = [1000.0]
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client, clock=lambda: now[0])
        assert await broker.verify(TOKEN)
        await broker.run("mcp-1", TOKEN, lambda sid: asyncio.sleep(0))  # takes the spare
        await broker.aclose()  # no live session left
        broker = SessionBroker(client, clock=lambda: now[0])
        assert await broker.verify(OTHER_TOKEN)
        broker._spares.clear()  # as if the spare were gone: only the TTL vouches now
        now[0] += 30
        assert await broker.verify(OTHER_TOKEN)
        assert guardian.fake.calls["OpenSession"] == 2
        now[0] += 31
        assert await broker.verify(OTHER_TOKEN)
        assert guardian.fake.calls["OpenSession"] == 3


async def test_verify_refused_unavailable_and_rate_limited() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        assert not await broker.verify(UNKNOWN_TOKEN)
        assert not await broker.verify(UNKNOWN_TOKEN)  # refusals are not cached
        assert guardian.fake.calls["OpenSession"] == 2
        guardian.fake.inject(
            "OpenSession", grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", trailing=(("retry-after-ms", "500"),)
        )
        with pytest.raises(RateLimited):
            await broker.verify(TOKEN)
        await guardian.stop()
        with pytest.raises(Unavailable):
            await broker.verify(TOKEN)


async def test_aclose_closes_every_session_and_spare() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        assert await broker.verify(TOKEN)  # a spare
        await broker.run("mcp-2", OTHER_TOKEN, lambda sid: asyncio.sleep(0))
        assert await broker.verify(OTHER_TOKEN)  # vouched by the live session: no spare
        assert len(guardian.fake.sessions) == 2
        await broker.aclose()
        assert not guardian.fake.sessions
        assert len(guardian.fake.closed) == 2
        with pytest.raises(Unavailable, match="shutting down"):
            await broker.run("new", TOKEN, lambda sid: asyncio.sleep(0))


async def test_aclose_with_the_guardian_gone_is_quick_and_quiet() -> None:
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client)
        await broker.run(None, TOKEN, lambda sid: asyncio.sleep(0))
        await guardian.stop()
        await asyncio.wait_for(broker.aclose(), timeout=3)


async def test_idle_scoped_entries_are_forgotten() -> None:
    now = [0.0]
    async with fake_guardian() as guardian, GuardianClient(guardian.path) as client:
        broker = SessionBroker(client, clock=lambda: now[0], max_entries=3)
        for i in range(3):
            await broker.run(f"mcp-{i}", TOKEN, lambda sid: asyncio.sleep(0))
        now[0] += 601  # past the fake's 600 s idle timeout
        await broker.run("mcp-new", TOKEN, lambda sid: asyncio.sleep(0))
        assert [scope for scope, _ in broker._entries] == ["mcp-new"]
        for i in range(5):
            await broker.run(f"more-{i}", TOKEN, lambda sid: asyncio.sleep(0))
        assert len(broker._entries) <= 3


def test_fingerprints_are_sha256_and_never_the_token() -> None:
    assert token_fingerprint(TOKEN) != TOKEN and len(token_fingerprint(TOKEN)) == 64
    assert token_fingerprint(TOKEN) != token_fingerprint(OTHER_TOKEN)
