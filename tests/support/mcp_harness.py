"""Reaching the real gateway with the real MCP client, for the end-to-end tests.

``stdio_params`` runs the stdio gateway as an MCP client launches it (its
stderr kept in the state dir, for the tests that grep logs); ``http_client``
connects to a streamable HTTP gateway with a bearer token; ``call`` and
``call_error`` make a tool call that must succeed or must be refused.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.support.harness import ROOT, Guardian

__all__ = ["call", "call_error", "http_client", "stdio_params"]


@asynccontextmanager
async def http_client(url: str, token: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


def stdio_params(guardian: Guardian, token: str) -> StdioServerParameters:
    """The stdio gateway, its stderr appended to a file under the state dir (the marker check reads it)."""
    stderr_file = guardian.state_dir / "gateway-stdio.log"
    gateway = [sys.executable, "-m", "gateway.cli", "--transport", "stdio", "--socket", str(guardian.agent_socket)]
    return StdioServerParameters(
        command="/bin/sh",
        args=["-c", 'exec "$@" 2>>"$GATEWAY_STDERR"', "gateway", *gateway],
        env={
            "AGENT_GUARDIAN_TOKEN": token,
            "GATEWAY_STDERR": str(stderr_file),
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
        },
        cwd=str(ROOT),
    )


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    content: dict[str, Any] = result.structured_content
    return content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return " ".join(getattr(block, "text", "") for block in result.content)
