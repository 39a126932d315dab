"""The gateway's Prometheus metrics, in a registry of its own (served on ``/metrics``).

::

    agent_gateway_tool_calls_total{tool, outcome}        counter    every tool call that reached a handler
    agent_gateway_tool_call_duration_seconds{tool}       histogram  its wall time, guardian call included
    agent_gateway_guardian_errors_total{code}            counter    failed guardian calls, by gRPC status code
    agent_gateway_guardian_reconnects_total              counter    guardian sessions re-opened after the
                                                                    guardian forgot them (restart, expiry)
    agent_gateway_sessions_open                          gauge      guardian sessions the gateway holds
    agent_gateway_guardian_up                            gauge      1 if the last readiness probe found the
                                                                    guardian's agent service SERVING

Invariant: every label value comes from a bounded set the code defines: a tool
name the gateway registered, ``ok`` or an error kind of ``shared.errors``, a
``grpc.StatusCode`` name. Nothing an agent sends (content, ids, queries,
tokens, agent names) ever becomes a label, so the series stay few and hold
nothing worth stealing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.errors import (
    DataLoss,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from shared.ops_http import new_registry

__all__ = ["CANCELLED", "OK", "OUTCOMES", "GatewayMetrics"]

#: The outcome of a tool call that succeeded.
OK: Final = "ok"
#: A tool call whose caller went away before it finished (the agent saw no answer).
CANCELLED: Final = "cancelled"
#: Every value of the ``outcome`` label: ``ok``, an error kind the agent saw, or ``cancelled``.
OUTCOMES: Final = frozenset(
    {
        OK,
        CANCELLED,
        *(
            kind.kind
            for kind in (
                InvalidArgument,
                PermissionDenied,
                RateLimited,
                Unauthenticated,
                NotFound,
                FailedPrecondition,
                Unavailable,
                DataLoss,
                InternalError,
            )
        ),
    }
)


class GatewayMetrics:
    """The gateway's metrics; ``registry`` is what ``/metrics`` serves.

    Methods are called on the event loop; a scrape reads the values from the
    ops endpoint's thread (prometheus_client's metrics are thread-safe).
    """

    def __init__(self) -> None:
        self.registry: Final[CollectorRegistry] = new_registry()
        self._tool_calls = Counter(
            "agent_gateway_tool_calls",
            "Tool calls that reached a handler, by tool and outcome (ok or the error kind the agent saw).",
            ("tool", "outcome"),
            registry=self.registry,
        )
        self._tool_seconds = Histogram(
            "agent_gateway_tool_call_duration_seconds",
            "Wall time of a tool call, the guardian call included, by tool.",
            ("tool",),
            registry=self.registry,
        )
        self._guardian_errors = Counter(
            "agent_gateway_guardian_errors",
            "Guardian calls made for tool calls that failed, by gRPC status code name.",
            ("code",),
            registry=self.registry,
        )
        self._reconnects = Counter(
            "agent_gateway_guardian_reconnects",
            "Guardian sessions re-opened because the guardian no longer knew them (a restart or an expiry).",
            registry=self.registry,
        )
        self._sessions_open = Gauge(
            "agent_gateway_sessions_open",
            "Guardian sessions the gateway holds.",
            registry=self.registry,
        )
        self._guardian_up = Gauge(
            "agent_gateway_guardian_up",
            "1 if the last readiness probe found the guardian's agent service SERVING, else 0.",
            registry=self.registry,
        )

    def declare_tools(self, tools: Iterable[str]) -> None:
        """Create the series of each tool at zero, so a scrape shows them before the first call."""
        for tool in tools:
            self._tool_calls.labels(tool, OK)
            self._tool_seconds.labels(tool)

    def tool_call(self, tool: str, outcome: str, seconds: float) -> None:
        """Count one tool call and its duration; an outcome outside ``OUTCOMES`` counts as ``internal``."""
        label = outcome if outcome in OUTCOMES else InternalError.kind
        self._tool_calls.labels(tool, label).inc()
        self._tool_seconds.labels(tool).observe(max(seconds, 0.0))

    def guardian_error(self, code: str) -> None:
        """Count one failed guardian call; ``code`` is a ``grpc.StatusCode`` name such as ``UNAVAILABLE``."""
        self._guardian_errors.labels(code).inc()

    def guardian_reconnect(self) -> None:
        """Count one guardian session re-opened after the guardian no longer knew it."""
        self._reconnects.inc()

    def count_sessions_with(self, count: Callable[[], int]) -> None:
        """Read ``agent_gateway_sessions_open`` from ``count()`` at each scrape (from the scraping thread)."""
        self._sessions_open.set_function(count)

    def set_guardian_up(self, up: bool) -> None:
        """Record what the last readiness probe found."""
        self._guardian_up.set(1 if up else 0)
