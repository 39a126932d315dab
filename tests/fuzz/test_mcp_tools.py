"""Fuzz every MCP tool's arguments through the real stdio gateway with the real MCP client.

The tools are the ones tools/list gives, with the input schemas it gives, so
a tool added to the gateway is fuzzed without change here. For each tool,
one hypothesis run draws arguments from its schema (conforming mostly, one
rule broken sometimes) and one draws arbitrary JSON objects over its
property names (wrong types included). The properties are in
tests/fuzz/tool_checks.py. A last test stops the guardian under a gateway and
checks that every call then ends in a retryable ``unavailable`` protocol
error or an argument error, and that the gateway keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from anyio.from_thread import start_blocking_portal
from hypothesis import given, settings
from hypothesis import strategies as st
from mcp.types import CallToolResult, Tool

from tests.fuzz import counting
from tests.fuzz.mcp_world import McpWorld, open_client
from tests.fuzz.schemagen import arbitrary_arguments, resolve_refs, schema_arguments
from tests.fuzz.tool_checks import check_down_outcome, check_tool_outcome, memories_of
from tests.fuzz.world import fuzz_policy
from tests.support.harness import running_guardian

#: A tool call answers within this long, plus 16 s per MiB of arguments, or it hangs.
_BUDGET_S = 5.0


def _budget_s(arguments: Any) -> float:
    """How long a call with these arguments may take."""
    return _BUDGET_S + 16.0 * len(json.dumps(arguments, ensure_ascii=False)) / 2**20


def _attempt(world_call: Callable[[], CallToolResult]) -> CallToolResult | BaseException:
    """The call's result, or what it raised (the properties decide whether that is allowed)."""
    try:
        return world_call()
    except Exception as error:  # an MCPError, a timeout, a validation failure in the client
        return error


def _each_tool(tools: list[Tool], run: Callable[[Tool], None]) -> None:
    """Run one hypothesis property per tool; report every tool that failed, not only the first."""
    assert tools, "the gateway lists no tools"
    failures: list[Exception] = []
    for tool in tools:
        try:
            run(tool)
        except Exception as error:
            error.add_note(f"tool: {tool.name}")
            failures.append(error)
    if failures:
        raise ExceptionGroup(f"{len(failures)} of {len(tools)} tools failed", failures)


def _fuzz_tool(world: McpWorld, tool: Tool, prop: str, arguments: dict[str, Any] | None) -> None:
    """Call one tool with arguments (Refs resolved), hold the outcome to the properties, learn from it."""
    counting.tried(prop)
    resolved = resolve_refs(arguments, world.resolve)
    outcome = _attempt(lambda: world.call(tool.name, resolved, _budget_s(resolved)))
    result = check_tool_outcome(
        prop,
        tool,
        resolved,
        outcome,
        forbidden=world.agent.forbidden,
        namespaces=world.agent.namespaces,
        forbidden_ids=world.agent.forbidden_ids,
    )
    if result is None or result.structured_content is None:
        return
    for memory in memories_of(result.structured_content):
        world.own_ids.add(memory["id"])
    cursor = result.structured_content.get("next_cursor")
    if isinstance(cursor, str):
        world.cursors.add(cursor)
    deleted = result.structured_content.get("deleted")
    if isinstance(deleted, str):
        world.own_ids.discard(deleted)


def test_mcp_schema_arguments(mcp: McpWorld) -> None:
    """Each tool, with arguments drawn from its input schema."""

    def run(tool: Tool) -> None:
        """Fuzz one tool."""

        @given(arguments=schema_arguments(tool.input_schema))
        def prop(arguments: dict[str, Any]) -> None:
            """One input."""
            _fuzz_tool(mcp, tool, f"mcp_schema[{tool.name}]", arguments)

        prop()

    _each_tool(mcp.tools, run)


def test_mcp_arbitrary_arguments(mcp: McpWorld) -> None:
    """Each tool, with any JSON object (or none) as its arguments."""

    def run(tool: Tool) -> None:
        """Fuzz one tool."""

        @given(arguments=arbitrary_arguments(tool.input_schema))
        def prop(arguments: dict[str, Any] | None) -> None:
            """One input."""
            _fuzz_tool(mcp, tool, f"mcp_arbitrary[{tool.name}]", arguments)

        prop()

    _each_tool(mcp.tools, run)


def test_mcp_guardian_down() -> None:
    """With the guardian stopped, each call is a retryable unavailable protocol error or an argument error."""
    examples = max(2, settings().max_examples // 50)  # each read retries for about 2 s first
    with (
        running_guardian(**fuzz_policy()) as guardian,
        start_blocking_portal(backend="asyncio") as portal,
        open_client(portal, guardian, guardian.add_agent("mcp-fuzzer")) as (client, tools),
    ):
        guardian.stop()

        def run(tool: Tool) -> None:
            """Fuzz one tool."""

            @settings(max_examples=examples)
            @given(arguments=st.one_of(schema_arguments(tool.input_schema), arbitrary_arguments(tool.input_schema)))
            def prop(arguments: dict[str, Any] | None) -> None:
                """One input."""
                name = f"mcp_guardian_down[{tool.name}]"
                counting.tried(name)
                resolved = resolve_refs(arguments, lambda ref: "mem_" + "0" * 32)
                call = client.call_tool
                outcome = _attempt(lambda: portal.call(call, tool.name, resolved, _budget_s(resolved)))
                check_down_outcome(name, tool, outcome)

            prop()

        _each_tool(tools, run)
        assert portal.call(client.list_tools).tools, "the gateway stopped serving after the guardian went down"
