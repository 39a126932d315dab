"""The one place where a ``shared.errors`` exception becomes an MCP outcome.

STYLE.md's rule: could a smarter model have avoided the error (bad argument,
policy denial, rate limit, unknown id)? Then it is an ordinary tool error: an
``isError`` result whose text starts with the error's kind, e.g.
``rate_limited: too many writes; retry after 1200 ms``. Otherwise (guardian
down, token refused, a memory that fails its integrity check, a bug) it is a
protocol error, ``MCPError``, whose message says what to do, with
``data = {"kind": ..., "retryable": ...}``. Which is which is the
``agent_actionable`` column of ``shared/error_table.py``.

The tool error is returned as a ``CallToolResult`` rather than raised as the
SDK's ``ToolError``, because ``mcp`` 2.x prefixes a raised ``ToolError``'s text
with ``Error executing tool <name>: `` and the kind would no longer lead.

Messages come from the guardian, which writes them to be safe to show an agent;
nothing here adds memory content or a token.
"""

from __future__ import annotations

from mcp import MCPError
from mcp.types import INTERNAL_ERROR, CallToolResult, TextContent

from shared.error_table import error_row
from shared.errors import GuardianError, RateLimited

__all__ = ["mcp_outcome", "tool_error_text"]


def tool_error_text(err: GuardianError) -> str:
    """The text of the tool error for ``err``: its kind first, then what to do."""
    text = f"{err.kind}: {err.message}"
    if isinstance(err, RateLimited):
        text = f"{text}; retry after {err.retry_after_ms} ms"
    return text


def mcp_outcome(err: GuardianError) -> CallToolResult:
    """The ``isError`` result for an agent-actionable ``err``.

    Raises:
        MCPError: for every other error (``Unavailable``, ``Unauthenticated``, ``DataLoss``, ``InternalError``, ...).
    """
    if error_row(err).agent_actionable:
        return CallToolResult(content=[TextContent(type="text", text=tool_error_text(err))], is_error=True)
    message = err.message
    if err.retryable and "retry" not in message:
        message = f"{message}; retry in a few seconds"
    raise MCPError(code=INTERNAL_ERROR, message=message, data={"kind": err.kind, "retryable": err.retryable})
