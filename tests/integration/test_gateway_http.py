"""The HTTP gate and the streamable HTTP transport, on a real uvicorn on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import httpx2
import pytest
import uvicorn
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from gateway.http_auth import DEFAULT_MAX_BODY_BYTES, bearer_token, build_http_app, transport_security
from gateway.state import open_gateway
from gateway.tools import build_server
from tests.support.fake_guardian import OTHER_TOKEN, TOKEN, UNKNOWN_TOKEN, FakeGuardianServer, fake_guardian

pytestmark = pytest.mark.anyio

TOOLS_LIST = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream"}


class _TestUvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test runner owns the signals
        yield


@contextlib.asynccontextmanager
async def http_gateway(guardian: FakeGuardianServer) -> AsyncIterator[str]:
    async with open_gateway(guardian.path, deadline_s=2.0) as state:
        app = build_http_app(build_server(state), state, host="127.0.0.1", port=0)
        server = _TestUvicorn(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
        task = asyncio.create_task(server.serve())
        try:
            for _ in range(500):
                if server.started or task.done():
                    break
                await asyncio.sleep(0.01)
            assert server.started
            port = server.servers[0].sockets[0].getsockname()[1]
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            server.should_exit = True
            await task


@contextlib.asynccontextmanager
async def mcp_over_http(url: str, token: str, mode: str = "auto") -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=10) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,
    ):
        yield client


async def ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    content: dict[str, Any] = result.structured_content
    return content


async def test_missing_and_malformed_tokens_get_401_without_asking_the_guardian() -> None:
    async with fake_guardian() as guardian, http_gateway(guardian) as url, httpx.AsyncClient(timeout=10) as http:
        response = await http.post(url, json=TOOLS_LIST, headers=ACCEPT)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == 'Bearer realm="agent-guardian"'
        assert response.json()["error"] == "unauthorized"
        for header in ("Bearer nope", "Basic " + TOKEN, "Bearer agt_short", TOKEN, "Bearer " + TOKEN + "x"):
            response = await http.post(url, json=TOOLS_LIST, headers={**ACCEPT, "Authorization": header})
            assert response.status_code == 401, header
            assert response.headers["www-authenticate"] == 'Bearer realm="agent-guardian", error="invalid_token"'
            assert TOKEN not in response.text
    assert guardian.fake.calls["OpenSession"] == 0


async def test_a_token_the_guardian_refuses_gets_401() -> None:
    async with fake_guardian() as guardian, http_gateway(guardian) as url, httpx.AsyncClient(timeout=10) as http:
        response = await http.post(url, json=TOOLS_LIST, headers={**ACCEPT, "Authorization": f"Bearer {UNKNOWN_TOKEN}"})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"] == "invalid_token"
    assert guardian.fake.calls["OpenSession"] == 1


async def test_guardian_down_is_503_and_rate_limit_429_with_retry_after() -> None:
    headers = {**ACCEPT, "Authorization": f"Bearer {TOKEN}"}
    async with fake_guardian() as guardian, http_gateway(guardian) as url, httpx.AsyncClient(timeout=10) as http:
        guardian.fake.inject(
            "OpenSession", grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", trailing=(("retry-after-ms", "1200"),)
        )
        response = await http.post(url, json=INITIALIZE, headers=headers)
        assert response.status_code == 429 and response.headers["retry-after"] == "2"
        await guardian.stop()
        response = await http.post(url, json=INITIALIZE, headers=headers)
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert "retry" in response.json()["message"]


async def test_a_good_token_passes_and_rebinding_protection_stays_on() -> None:
    headers = {**ACCEPT, "Authorization": f"Bearer {TOKEN}"}
    async with fake_guardian() as guardian, http_gateway(guardian) as url, httpx.AsyncClient(timeout=10) as http:
        response = await http.post(url, json=INITIALIZE, headers=headers)
        assert response.status_code == 200, response.text
        for bad in ({"Host": "evil.example:80"}, {"Origin": "http://evil.example"}):
            response = await http.post(url, json=INITIALIZE, headers={**headers, **bad})
            assert response.status_code in (403, 421), bad
    assert guardian.fake.calls["OpenSession"] == 1


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_mcp_over_http_uses_each_callers_own_token(mode: str) -> None:
    async with fake_guardian() as guardian, http_gateway(guardian) as url:
        async with mcp_over_http(url, TOKEN, mode) as alice:
            kept = (await ok(alice, "memory_store", content="alice only"))["memory"]["id"]
            assert (await ok(alice, "memory_get", id=kept))["memory"]["content"] == "alice only"
            guardian.fake.restart()
            assert (await ok(alice, "memory_list"))["memories"][0]["id"] == kept
        async with mcp_over_http(url, OTHER_TOKEN, mode) as bob:
            result = await bob.call_tool("memory_get", {"id": kept})
            assert result.is_error and result.content[0].text.startswith("not_found")  # type: ignore[union-attr]
    # One OpenSession per token (the HTTP gate's check becomes the MCP session's), plus one after the restart.
    assert guardian.fake.opened == ["agent-a", "agent-a", "agent-b"]
    assert not guardian.fake.sessions  # all closed when the gateway stopped


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_an_oversized_request_is_a_json_rpc_error_stating_the_limit(mode: str) -> None:
    async with fake_guardian() as guardian, http_gateway(guardian) as url:
        async with mcp_over_http(url, TOKEN, mode) as client:
            with pytest.raises(MCPError) as caught:
                await client.call_tool("memory_store", {"content": "x" * 10_000_000})
            assert caught.value.error.code == -32600
            assert f"larger than the gateway accepts ({DEFAULT_MAX_BODY_BYTES} bytes per HTTP request)" in str(
                caught.value.error.message
            )
            assert (await ok(client, "memory_store", content="still fine"))["memory"]["content"] == "still fine"
        # Streamed without a Content-Length, the same answer once the limit is passed.
        async with httpx.AsyncClient(timeout=10) as http:

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(5):
                    yield b" " * (DEFAULT_MAX_BODY_BYTES // 4)

            headers = {**ACCEPT, "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            response = await http.post(url, content=chunks(), headers=headers)
            assert response.status_code == 413
            assert response.json()["error"]["code"] == -32600
    assert guardian.fake.calls["Store"] == 1
    assert len(guardian.fake.memories) == 1


async def test_an_unknown_argument_over_http_is_a_tool_error_naming_it() -> None:
    async with fake_guardian() as guardian, http_gateway(guardian) as url, mcp_over_http(url, TOKEN) as client:
        result = await client.call_tool("memory_store", {"content": "x", "contnet_typo": "y"})
        assert result.is_error
        assert "contnet_typo" in " ".join(getattr(block, "text", "") for block in result.content)
    assert guardian.fake.calls["Store"] == 0


def test_bearer_token_parsing() -> None:
    assert bearer_token(f"Bearer {TOKEN}") == TOKEN
    assert bearer_token(f"bearer   {TOKEN}  ") == TOKEN
    for bad in (None, "", "Bearer", f"Basic {TOKEN}", f"Bearer {TOKEN} extra", TOKEN, "Bearer agt_x"):
        assert bearer_token(bad) is None


def test_transport_security_allows_only_the_bound_address_and_localhost() -> None:
    settings = transport_security("127.0.0.1", 8765)
    assert settings.enable_dns_rebinding_protection
    assert settings.allowed_hosts == ["127.0.0.1:8765", "localhost:8765"]
    assert settings.allowed_origins == ["http://127.0.0.1:8765", "http://localhost:8765"]
    assert transport_security("::1", 0, ["gw.internal"]).allowed_hosts == [
        "[::1]:*",
        "127.0.0.1:*",
        "localhost:*",
        "gw.internal:*",
        "gw.internal",
    ]
    assert "https://gw.internal" in transport_security("127.0.0.1", 8765, ["gw.internal"]).allowed_origins
