"""agent-gateway as a process: usage errors, stdio hygiene, and clean stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client, StdioServerParameters

from tests.support.fake_guardian import TOKEN, UNKNOWN_TOKEN, fake_guardian

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = [sys.executable, "-m", "gateway.cli"]


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GUARDIAN_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run_gateway(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)


def test_help_is_enough_to_use_it() -> None:
    result = run_gateway("--help", env=env_with())
    assert result.returncode == 0
    for needle in (
        "--transport",
        "--socket",
        "--host",
        "--port",
        "--log-level",
        "AGENT_GUARDIAN_TOKEN",
        "AGENT_GUARDIAN_SOCKET",
        "Authorization: Bearer",
        "exit status",
    ):
        assert needle in result.stdout, needle


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--transport", "stdio"], {}, "set AGENT_GUARDIAN_TOKEN"),
        (
            ["--transport", "stdio"],
            {"AGENT_GUARDIAN_TOKEN": "agt_not-a-real-token-SECRETVALUE"},
            "is not an agent token",
        ),
        (["--transport", "stdio", "--socket", "agent.sock"], {"AGENT_GUARDIAN_TOKEN": TOKEN}, "absolute path"),
        (["--transport", "carrier-pigeon"], {}, "invalid choice"),
        (["--transport", "http", "--host", "0.0.0.0"], {}, "put a TLS-terminating reverse proxy in front"),
        (["--transport", "http", "--oauth-issuer", "https://auth.example"], {}, "go together"),
        (
            ["--transport", "http", "--oauth-issuer", "ftp://a", "--resource-url", "https://m.example/mcp"],
            {},
            "--oauth-issuer must be an https:// URL",
        ),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message_and_never_print_the_token(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_gateway(*args, env=env_with(**env))
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert "SECRETVALUE" not in result.stderr and TOKEN not in result.stderr


@asynccontextmanager
async def gateway_process(*args: str, env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        *GATEWAY,
        *args,
        env=env,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_log_until(process: asyncio.subprocess.Process, msg: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
        assert line, f"gateway exited before logging {msg!r}: {seen}"
        entry: dict[str, Any] = json.loads(line)  # every stderr line is a JSON object
        seen.append(entry)
        if entry["message"] == msg:
            return entry


async def stop(process: asyncio.subprocess.Process, seen: list[dict[str, Any]]) -> int:
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    rest = await asyncio.wait_for(process.stderr.read(), timeout=10)
    seen.extend(json.loads(line) for line in rest.splitlines() if line.strip())
    return await asyncio.wait_for(process.wait(), timeout=10)


@pytest.mark.anyio
async def test_stdio_speaks_only_protocol_on_stdout_and_stops_cleanly_on_sigterm() -> None:
    async with fake_guardian() as guardian:
        env = env_with(AGENT_GUARDIAN_TOKEN=TOKEN, AGENT_GUARDIAN_SOCKET=guardian.path)
        async with gateway_process("--transport", "stdio", env=env) as process:
            assert process.stdin is not None and process.stdout is not None
            seen: list[dict[str, Any]] = []
            await read_log_until(process, "serving MCP on stdio", seen)
            request = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            }
            process.stdin.write((json.dumps(request) + "\n").encode())
            await process.stdin.drain()
            answer = json.loads(await asyncio.wait_for(process.stdout.readline(), timeout=10))
            assert answer["id"] == 1 and "result" in answer
            # stdin stays open: the SDK's reader thread is blocked, and SIGTERM must still stop it.
            assert await stop(process, seen) == 0
            assert await process.stdout.read() == b""
    assert len(guardian.fake.closed) == 1  # the session opened at start was closed
    assert all(TOKEN not in json.dumps(entry) for entry in seen)
    assert any(entry["message"] == "closed guardian sessions" for entry in seen)


@pytest.mark.anyio
async def test_stdio_refused_token_exits_3_without_printing_it() -> None:
    async with fake_guardian() as guardian:
        env = env_with(AGENT_GUARDIAN_TOKEN=UNKNOWN_TOKEN, AGENT_GUARDIAN_SOCKET=guardian.path)
        async with gateway_process("--transport", "stdio", env=env) as process:
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 3
    assert stdout == b""
    assert b"not accepted" in stderr and UNKNOWN_TOKEN.encode() not in stderr


@pytest.mark.anyio
async def test_stdio_through_the_real_mcp_client() -> None:
    async with fake_guardian() as guardian:
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "gateway.cli", "--transport", "stdio", "--socket", guardian.path, "--log-level", "warning"],
            env={"AGENT_GUARDIAN_TOKEN": TOKEN, "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
            cwd=str(ROOT),
        )
        async with Client(params) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert "4096 bytes" in (tools["memory_store"].description or "")
            # The session opened at start also names the namespaces and the read window.
            assert "Namespaces you see: agent-a (yours), news, team." in (tools["memory_search"].description or "")
            assert "older than 30 days" in (tools["memory_search"].description or "")
            result = await client.call_tool("memory_store", {"content": "over stdio"})
            assert not result.is_error and result.structured_content is not None
            assert result.structured_content["memory"]["content"] == "over stdio"


@pytest.mark.anyio
async def test_http_logs_one_listening_line_serves_and_stops_cleanly_on_sigterm() -> None:
    async with fake_guardian() as guardian:
        env = env_with(AGENT_GUARDIAN_SOCKET=guardian.path)
        async with gateway_process("--transport", "http", "--port", "0", env=env) as process:
            seen: list[dict[str, Any]] = []
            listening = await read_log_until(process, "listening", seen)
            assert listening["host"] == "127.0.0.1" and listening["url"].endswith("/mcp")
            async with httpx.AsyncClient(timeout=10) as http:
                response = await http.post(
                    listening["url"],
                    json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
                    headers={
                        "Authorization": f"Bearer {TOKEN}",
                        "Accept": "application/json, text/event-stream",
                        "MCP-Protocol-Version": "2026-07-28",
                    },
                )
                assert response.status_code != 401
                assert (await http.post(listening["url"], json={})).status_code == 401
            assert await stop(process, seen) == 0
    assert guardian.fake.closed  # the session the gate opened was closed
    assert [entry["message"] for entry in seen].count("listening") == 1
    assert all(TOKEN not in json.dumps(entry) for entry in seen)
