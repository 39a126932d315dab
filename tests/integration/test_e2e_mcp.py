"""End to end: the real MCP client → a real gateway process (stdio and streamable HTTP)
→ the guardian's Unix socket → the encrypted store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, MCPError

from tests.support.harness import LOG_ONLY_ANOMALIES, ROOT, Guardian, running_guardian
from tests.support.mcp_harness import call, call_error, http_client, stdio_params

pytestmark = pytest.mark.anyio

MARKER = "zebra-marker-7Q4x9 the walrus hums at midnight"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    with running_guardian(anomaly=LOG_ONLY_ANOMALIES) as guardian:
        yield {"guardian": guardian, "alice": guardian.add_agent("alice"), "bob": guardian.add_agent("bob")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def http_gateway(guardian: Guardian, port: int | None = None, extra: Sequence[str] = ()) -> Iterator[str]:
    """A real HTTP gateway process (on port, else a free one) to guardian's agent socket; its MCP URL."""
    port = port or free_port()
    log = (guardian.state_dir / f"gateway-http-{port}.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "--transport",
            "http",
            "--port",
            str(port),
            "--socket",
            str(guardian.agent_socket),
            *extra,
        ],
        cwd=ROOT,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, "gateway exited early"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def full_flow(client: Client) -> None:
    stored = await call(client, "memory_store", content=MARKER, tags=["e2e"], metadata={"source": "test"})
    memory_id = stored["memory"]["id"]
    hits = (await call(client, "memory_search", query="walrus midnight"))["hits"]
    assert memory_id in [hit["memory"]["id"] for hit in hits]
    got_result = await call(client, "memory_get", id=memory_id)
    got = got_result["memory"]
    assert got["content"] == MARKER and got["metadata"] == {"source": "test"}
    # No source declared: the policy's default (agent), unverified, which the default profile recalls plainly.
    assert (got["provenance"]["source"], got["trust"], got["labelled"], got["notice"]) == (
        "agent",
        "unverified",
        False,
        None,
    )
    assert got["provenance"] == stored["memory"]["provenance"] and got_result["note"] is None
    updated = (await call(client, "memory_update", id=memory_id, tags=["e2e", "updated"]))["memory"]
    assert updated["tags"] == ["e2e", "updated"] and updated["content"] == MARKER
    await call(client, "memory_store_batch", memories=[{"content": f"filler {i}"} for i in range(5)])
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page = await call(client, "memory_list", page_size=2, cursor=cursor)
        seen += [memory["id"] for memory in page["memories"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert memory_id in seen and len(seen) == len(set(seen)) >= 6
    assert (await call(client, "memory_delete", id=memory_id))["deleted"] == memory_id
    assert (await call_error(client, "memory_get", id=memory_id)).startswith("not_found")


async def test_stdio_full_flow(world: dict[str, Any]) -> None:
    async with Client(stdio_params(world["guardian"], world["alice"])) as client:
        await full_flow(client)


async def test_http_full_flow_and_isolation(world: dict[str, Any]) -> None:
    guardian: Guardian = world["guardian"]
    with http_gateway(guardian) as url:
        async with http_client(url, world["alice"]) as alice:
            await full_flow(alice)
            kept = (await call(alice, "memory_store", content="alice only: the vault code"))["memory"]["id"]
        async with http_client(url, world["bob"]) as bob:
            assert (await call_error(bob, "memory_get", id=kept)).startswith("not_found")
            assert (await call_error(bob, "memory_update", id=kept, content="x")).startswith("not_found")
            assert (await call_error(bob, "memory_delete", id=kept)).startswith("not_found")
            assert not (await call(bob, "memory_search", query="vault code"))["hits"]
            assert not (await call(bob, "memory_list"))["memories"]


async def test_http_requires_a_valid_bearer_token(world: dict[str, Any]) -> None:
    guardian: Guardian = world["guardian"]
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    with http_gateway(guardian) as url:
        async with httpx.AsyncClient(timeout=10) as http:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer agt_" + "A" * 43}):
                response = await http.post(url, json=body, headers=headers)
                assert response.status_code == 401, headers
                assert response.headers["www-authenticate"].startswith("Bearer")
            rebinding = await http.post(
                url, json=body, headers={"Authorization": f"Bearer {world['alice']}", "Host": "evil.example:80"}
            )
            assert rebinding.status_code in (400, 403, 421)


async def test_bad_input_through_the_gateway(world: dict[str, Any]) -> None:
    guardian: Guardian = world["guardian"]
    with guardian.keyed_db() as db:
        before = db.execute("SELECT count(*) FROM memories").fetchone()[0]
    async with Client(stdio_params(guardian, world["alice"])) as client:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"content": ""}, "invalid_argument"),
            ({"content": "x" * 70_000}, "invalid_argument"),
            ({"content": "a", "tags": ["t"] * 1 + [f"t{i}" for i in range(20)]}, "invalid_argument"),
            ({"content": "a", "metadata": {"k": "v" * 5000}}, "invalid_argument"),
        ]
        for arguments, kind in cases:
            try:
                text = await call_error(client, "memory_store", **arguments)
            except MCPError as error:  # the SDK may refuse the arguments before the tool runs
                text = str(error)
            assert kind in text
            assert MARKER not in text
        for arguments in ({}, {"content": 5}, {"content": "a", "metadata": [1, 2]}, {"content": "a", "tags": "t"}):
            result = await client.call_tool("memory_store", arguments)
            assert result.is_error
        assert (await call_error(client, "memory_get", id="../../etc/passwd")).startswith("invalid_argument")
        assert (await call_error(client, "memory_search", query='"')).startswith("invalid_argument")
        for query in ("*", "NEAR(", "AND"):
            outcome = await client.call_tool("memory_search", {"query": query})
            assert not outcome.is_error or "invalid_argument" in outcome.content[0].text  # type: ignore[union-attr]
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM memories").fetchone()[0] == before


async def test_lone_surrogates_are_refused_over_raw_http(world: dict[str, Any]) -> None:
    """A JSON escape can carry a lone surrogate that no UTF-8 encoder will: it must be refused, not crash."""
    guardian: Guardian = world["guardian"]
    headers = {
        "Authorization": f"Bearer {world['alice']}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    }
    with http_gateway(guardian) as url:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(url, json=initialize, headers=headers)
            assert response.status_code == 200
            headers["mcp-session-id"] = response.headers["mcp-session-id"]
            headers["mcp-protocol-version"] = "2025-06-18"
            await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
            raw = (
                '{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "memory_store",'
                ' "arguments": {"content": "bad \\ud800 text"}}}'
            )
            response = await http.post(url, content=raw.encode(), headers=headers)
            # The SDK's strict JSON parser refuses it before any tool runs: a protocol error, nothing stored.
            assert response.status_code == 400
            assert response.json()["error"]["code"] == -32700


async def test_guardian_restart_costs_at_most_one_retryable_error(world: dict[str, Any]) -> None:
    guardian: Guardian = world["guardian"]
    with http_gateway(guardian) as url:
        async with http_client(url, world["alice"]) as client:
            kept = (await call(client, "memory_store", content="survives a restart"))["memory"]["id"]
            guardian.stop(signal.SIGKILL)
            guardian.start()
            errors = 0
            for _ in range(2):
                try:
                    result = await client.call_tool("memory_get", {"id": kept})
                except MCPError:
                    errors += 1
                    continue
                if result.is_error:
                    errors += 1
                    continue
                assert result.structured_content["memory"]["content"] == "survives a restart"
                break
            else:
                pytest.fail("no successful call after the restart")
            assert errors <= 1


async def test_guardian_down_is_a_quick_retryable_error(world: dict[str, Any]) -> None:
    guardian: Guardian = world["guardian"]
    async with Client(stdio_params(guardian, world["alice"])) as client:
        guardian.stop()
        try:
            started = time.monotonic()
            with pytest.raises(MCPError) as caught:
                await client.call_tool("memory_store", {"content": "while down"})
            assert time.monotonic() - started < 15
            assert "unavailable" in str(caught.value).lower()
        finally:
            guardian.start()


def test_marker_appears_in_no_file_in_clear(world: dict[str, Any]) -> None:
    """Runs after the flows above stored MARKER: no file under the state dir holds it in clear."""
    guardian: Guardian = world["guardian"]
    needle = MARKER.encode()
    assert not guardian.database.read_bytes().startswith(b"SQLite format 3")
    offenders = [
        str(path)
        for path in Path(guardian.state_dir).rglob("*")
        if path.is_file() and not path.is_socket() and needle in path.read_bytes()
    ]
    assert not offenders
    logs = {path.name for path in guardian.state_dir.rglob("*.log")}
    assert {"gateway-stdio.log", "guardian-test.log"} <= logs, logs
    assert any(name.startswith("gateway-http-") for name in logs), logs
    assert (guardian.state_dir / "gateway-stdio.log").stat().st_size > 0
    for token in (world["alice"], world["bob"]):
        assert not [p for p in guardian.state_dir.rglob("*.log") if token in p.read_text(errors="replace")]
    assert json.dumps(guardian.audit_rows()).find(MARKER) == -1
