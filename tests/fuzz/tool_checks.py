"""The properties every fuzzed MCP tool call is held to.

With the guardian up: a call ends in a result, never in a protocol error
(``MCPError``; those are for the guardian being down) nor a client-side
failure (the client checks a success's structured content against the tool's
output schema). An error is an ``isError`` result with no structured content
whose text starts with the error's kind (``invalid_argument: ...``) or is the
SDK's report of arguments that fail the input schema; any other text means an
exception escaped a tool handler. A success carries structured content, and
its text is that content as JSON (plus the quarantine note, when there is
one), so no success carries error text. No result holds a forbidden string;
every memory in a success is in a namespace the agent may read and never a
planted one, active when a read-only tool returned it; no destructive tool
succeeds on a planted memory.

With the guardian down: every call is either such an argument error or a
protocol error of kind ``unavailable``; never a success, never another error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, Final

from mcp import MCPError
from mcp.types import CallToolResult, TextContent, Tool

from tests.fuzz import counting
from tests.fuzz.checks import fail

__all__ = ["ACTIONABLE_KINDS", "check_down_outcome", "check_tool_outcome", "memories_of", "result_text"]

#: The kinds of error an agent can act on, as the gateway words them (shared/error_table.py, gateway/outcomes.py).
ACTIONABLE_KINDS: Final = ("invalid_argument", "permission_denied", "rate_limited", "not_found", "failed_precondition")
_MEMORY_KEYS: Final = frozenset({"id", "content", "namespace", "status", "author"})


def result_text(result: CallToolResult) -> str:
    """Every text block of a result, joined."""
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def memories_of(value: Any) -> Iterator[dict[str, Any]]:
    """Every memory object anywhere in a tool's structured content."""
    if isinstance(value, dict):
        if value.keys() >= _MEMORY_KEYS:
            yield value
        for item in value.values():
            yield from memories_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from memories_of(item)


def _is_argument_error(tool: str, text: str) -> bool:
    """Whether an isError text is the SDK refusing arguments that fail the input schema."""
    return text.startswith(f"Error executing tool {tool}: ") and "validation error" in text


def _error_kind(tool: str, text: str) -> str:
    """The kind an isError result reports: one of ACTIONABLE_KINDS, 'arguments', or '' for anything else."""
    if _is_argument_error(tool, text):
        return "arguments"
    kind, separator, _ = text.partition(": ")
    return kind if separator and kind in ACTIONABLE_KINDS else ""


def check_tool_outcome(
    prop: str,
    tool: Tool,
    arguments: dict[str, Any] | None,
    outcome: CallToolResult | BaseException,
    *,
    forbidden: Sequence[str],
    namespaces: frozenset[str],
    forbidden_ids: Sequence[str],
) -> CallToolResult | None:
    """Hold one tool call (guardian up) to the properties; return the result when it succeeded."""
    if isinstance(outcome, MCPError):
        counting.outcome(prop, "protocol_error")
        fail(prop, f"{tool.name} raised a protocol error with the guardian up: {outcome.error!r}")
    if isinstance(outcome, BaseException):
        counting.outcome(prop, "client_error")
        fail(prop, f"{tool.name} failed in the client: {outcome!r}")
        return None
    result = outcome
    text = result_text(result)
    dumped = text + json.dumps(result.structured_content, ensure_ascii=False)
    leaked = [marker for marker in forbidden if marker in dumped]
    if result.is_error:
        kind = _error_kind(tool.name, text)
        counting.outcome(prop, f"error:{kind or 'other'}")
        if leaked:
            fail(prop, f"{tool.name}'s error holds forbidden data {leaked}: {text[:300]!r}")
        if result.structured_content is not None:
            fail(prop, f"{tool.name}'s error carries structured content: {result.structured_content!r}")
        if not kind:
            fail(prop, f"{tool.name}'s error is neither an error kind nor an argument error: {text[:500]!r}")
        return None
    counting.outcome(prop, "ok")
    if leaked:
        fail(prop, f"{tool.name} returned forbidden data {leaked}")
    structured = result.structured_content
    if structured is None:
        fail(prop, f"{tool.name} succeeded without structured content: {text[:300]!r}")
        return None
    blocks = [block.text for block in result.content if isinstance(block, TextContent)]
    if len(blocks) != len(result.content) or not blocks or json.loads(blocks[0]) != structured:
        fail(prop, f"{tool.name}'s success text is not its structured content: {text[:300]!r}")
    note = structured.get("note")
    if blocks[1:] != ([note] if note else []):
        fail(prop, f"{tool.name}'s success has text besides its content and note: {blocks[1:]!r}")
    _check_memories(prop, tool, arguments, structured, namespaces, forbidden_ids)
    return result


def _check_memories(
    prop: str,
    tool: Tool,
    arguments: dict[str, Any] | None,
    structured: dict[str, Any],
    namespaces: frozenset[str],
    forbidden_ids: Sequence[str],
) -> None:
    """The data rules for the memories in a successful tool result."""
    read_only = bool(tool.annotations and tool.annotations.read_only_hint)
    for memory in memories_of(structured):
        if memory["namespace"] not in namespaces:
            fail(prop, f"{tool.name} returned memory {memory['id']} of namespace {memory['namespace']!r}, not readable")
        if memory["id"] in forbidden_ids:
            fail(prop, f"{tool.name} returned the planted memory {memory['id']}")
        if read_only and memory["status"] != "active":
            fail(prop, f"{tool.name} returned memory {memory['id']} with status {memory['status']!r}")
    destructive = bool(tool.annotations and tool.annotations.destructive_hint)
    target = (arguments or {}).get("id")
    if destructive and isinstance(target, str) and target in forbidden_ids:
        fail(prop, f"{tool.name} succeeded on the planted memory {target}")


def check_down_outcome(prop: str, tool: Tool, outcome: CallToolResult | BaseException) -> None:
    """Hold one tool call made while the guardian is down to the properties."""
    if isinstance(outcome, MCPError):
        data = outcome.error.data if isinstance(outcome.error.data, dict) else {}
        counting.outcome(prop, f"protocol_error:{data.get('kind')}")
        if data.get("kind") != "unavailable" or data.get("retryable") is not True:
            fail(prop, f"{tool.name} with the guardian down raised {outcome.error!r}, not a retryable unavailable")
        return
    if isinstance(outcome, BaseException):
        counting.outcome(prop, "client_error")
        fail(prop, f"{tool.name} with the guardian down failed in the client: {outcome!r}")
        return
    text = result_text(outcome)
    if not outcome.is_error:
        counting.outcome(prop, "ok")
        fail(prop, f"{tool.name} succeeded with the guardian down: {text[:300]!r}")
    kind = _error_kind(tool.name, text)
    counting.outcome(prop, f"error:{kind or 'other'}")
    if kind not in ("arguments", "invalid_argument"):
        fail(
            prop,
            f"{tool.name} with the guardian down gave a tool error that is not about its arguments: {text[:300]!r}",
        )
