"""The gateway's long-lived resources: one guardian client, one session broker, their metrics.

``open_gateway`` is the async context manager that owns them; the MCP server's
lifespan yields the ``GatewayState`` it made, so tool handlers reach them as
``ctx.request_context.lifespan_context`` and nothing lives in a global.
Leaving ``open_gateway`` closes every guardian session (best effort) and then
the channel.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.client import DEFAULT_DEADLINE_S, GuardianClient
from gateway.metrics import GatewayMetrics
from gateway.sessions import SessionBroker

__all__ = ["GatewayState", "open_gateway"]


@dataclass(frozen=True)
class GatewayState:
    """What every tool call needs, made once per gateway process."""

    client: GuardianClient
    broker: SessionBroker
    #: The agent token of a stdio gateway (from its environment). None over HTTP,
    #: where every request carries its own bearer token.
    token: str | None = field(default=None, repr=False)

    @property
    def metrics(self) -> GatewayMetrics:
        """The gateway's metrics (the client's, which the broker shares)."""
        return self.client.metrics


@asynccontextmanager
async def open_gateway(
    socket_path: str | os.PathLike[str],
    *,
    token: str | None = None,
    deadline_s: float = DEFAULT_DEADLINE_S,
) -> AsyncIterator[GatewayState]:
    """Connect to the guardian's agent socket; on exit close its sessions and the channel."""
    client = GuardianClient(socket_path, deadline_s=deadline_s)
    broker = SessionBroker(client)
    try:
        yield GatewayState(client=client, broker=broker, token=token)
    finally:
        try:
            await broker.aclose()
        finally:
            await client.close()
