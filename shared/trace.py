"""W3C trace context (``traceparent``, version 00): one trace from the MCP client through the gateway to the guardian.

The gateway takes the ``traceparent`` the client put in the request's ``_meta`` (MCP
2026-07-28 reserves it there), or starts a trace when there is none or it is malformed,
and sends its own span's ``traceparent`` to the guardian as gRPC metadata. The guardian
checks it again (the gateway is the untrusted side: a bad value starts a new trace
there) and records the trace id in its log and the request's audit row. A trace id is
random and says nothing about the request: it carries no content.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Final

__all__ = ["METADATA_KEY", "TraceContext", "continue_or_start"]

#: The gRPC metadata key (and the ``_meta`` key) that carries it.
METADATA_KEY: Final = "traceparent"
#: Version 00 exactly (https://www.w3.org/TR/trace-context/#traceparent-header); a later version's
#: extra fields after the flags are allowed, as the spec asks.
_TRACEPARENT_RE: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    """A trace id, this hop's span id, and the sampled flag."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @property
    def traceparent(self) -> str:
        """The ``traceparent`` value for a call this span makes."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    @classmethod
    def parse(cls, value: object) -> TraceContext | None:
        """The context a ``traceparent`` value names; None when it is absent or not a valid one."""
        if not isinstance(value, str) or len(value) > 512:
            return None
        match = _TRACEPARENT_RE.fullmatch(value.strip())
        if match is None:
            return None
        version, trace_id, span_id, flags, rest = match.groups()
        if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            return None
        return cls(trace_id, span_id, bool(int(flags, 16) & 1))


def continue_or_start(value: object) -> TraceContext:
    """A new span in the trace value names, or the first span of a new trace when it names none."""
    parent = TraceContext.parse(value)
    span_id = secrets.token_hex(8)
    if parent is None:
        return TraceContext(secrets.token_hex(16), span_id)
    return TraceContext(parent.trace_id, span_id, parent.sampled)
