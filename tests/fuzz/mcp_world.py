"""A real stdio gateway and a real MCP client to it, usable from synchronous hypothesis tests.

The client runs in an anyio blocking portal (an event loop on its own thread)
for the whole session, so each example is one ``tools/call`` over the same
MCP session, as an agent would make them. The gateway process is the one the
SDK's stdio transport starts from ``tests/mcp_harness.stdio_params``, and it
stops it when the client closes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import Client
from mcp.types import CallToolResult, Tool

from tests.fuzz.protogen import Ref
from tests.fuzz.world import AgentWorld, Pool
from tests.support.harness import Guardian
from tests.support.mcp_harness import stdio_params

__all__ = ["McpWorld", "mcp_world", "open_client"]


@dataclass(repr=False)
class McpWorld:
    """The MCP fuzzer's client, its gateway's tools, and pools of what the tools returned."""

    agent: AgentWorld
    portal: BlockingPortal
    client: Client
    tools: list[Tool]
    own_ids: Pool = field(default_factory=Pool)
    cursors: Pool = field(default_factory=Pool)

    def __repr__(self) -> str:
        """Briefly: which guardian it fuzzes."""
        return f"McpWorld({self.agent.guardian.state_dir})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints this in a failing example: briefly."""
        printer.text(repr(self))

    def call(self, name: str, arguments: dict[str, Any] | None, timeout_s: float) -> CallToolResult:
        """One tools/call through the real client and gateway."""
        return self.portal.call(
            functools.partial(self.client.call_tool, name, arguments, read_timeout_seconds=timeout_s)
        )

    def list_tool_names(self) -> list[str]:
        """The names tools/list gives now (proves the gateway still serves)."""
        listed = self.portal.call(self.client.list_tools)
        return [tool.name for tool in listed.tools]

    def resolve(self, ref: Ref) -> str:
        """The text a Ref stands for, from what the tools returned and what was planted."""
        if ref.kind == "memory_id":
            if ref.choice == "forbidden":
                return self.agent.forbidden_ids[ref.index % len(self.agent.forbidden_ids)]
            return self.agent.own_id(self.own_ids, self.agent.mcp_session, ref.index)
        if ref.kind == "cursor":
            if ref.choice == "foreign":
                return self.agent.foreign_cursor
            cursor = self.cursors.pick(ref.index, self.agent.foreign_cursor)
            if ref.choice == "tampered":
                cut = ref.index % len(cursor)
                return cursor[:cut] + ("A" if cursor[cut] != "A" else "B") + cursor[cut + 1 :]
            return cursor
        return self.agent.resolve(ref)


@contextmanager
def open_client(portal: BlockingPortal, guardian: Guardian, token: str) -> Iterator[tuple[Client, list[Tool]]]:
    """A real MCP client connected to a new stdio gateway, and the tools it lists."""
    with portal.wrap_async_context_manager(Client(stdio_params(guardian, token))) as client:
        tools = portal.call(client.list_tools).tools
        yield client, tools


@contextmanager
def mcp_world(agent: AgentWorld) -> Iterator[McpWorld]:
    """The gateway of ``mcp-fuzzer`` on the agent world's guardian."""
    with (
        start_blocking_portal(backend="asyncio") as portal,
        open_client(portal, agent.guardian, agent.tokens["mcp-fuzzer"]) as (client, tools),
    ):
        yield McpWorld(agent=agent, portal=portal, client=client, tools=tools)
