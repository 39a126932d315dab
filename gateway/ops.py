"""The gateway's operations endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` on loopback.

``serving_ops(listen, state)`` runs ``shared.ops_http.OpsServer`` on its own
thread for as long as the block lasts, serving ``state.metrics.registry``.
Readiness has one check, ``guardian``: the client's gRPC health probe of the
agent service. The probe runs on the gateway's event loop (the channel belongs
to it), handed over from the endpoint's thread and waited for with a bound, so
a scrape never hangs on a stuck loop or guardian.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from gateway.client import HEALTH_DEADLINE_S, GuardianClient
from gateway.state import GatewayState
from shared.ops_http import OpsServer, Readiness

__all__ = ["GUARDIAN_CHECK", "serving_ops"]

#: The name of the readiness check that the guardian answers health checks.
GUARDIAN_CHECK: Final = "guardian"
#: How long past the probe's own deadline the endpoint waits for the event loop to run it.
_LOOP_SLACK_S: Final = 1.0

_log = logging.getLogger(__name__)


def _readiness(loop: asyncio.AbstractEventLoop, client: GuardianClient) -> Readiness:
    """Run the guardian probe on ``loop`` from the endpoint's thread."""
    future = asyncio.run_coroutine_threadsafe(client.check_health(HEALTH_DEADLINE_S), loop)
    try:
        finding = future.result(timeout=HEALTH_DEADLINE_S + _LOOP_SLACK_S)
    except TimeoutError:
        future.cancel()
        finding = "unknown: the gateway did not finish the health check in time"
        client.metrics.set_guardian_up(False)
    return Readiness({GUARDIAN_CHECK: finding})


@asynccontextmanager
async def serving_ops(listen: tuple[str, int] | None, state: GatewayState) -> AsyncIterator[int | None]:
    """Serve the endpoint on ``listen`` (HOST, PORT) while the block runs; yields the bound port.

    ``listen=None`` serves nothing and yields None.

    Raises:
        ConfigError: the address cannot be bound (e.g. the port is in use).
    """
    if listen is None:
        yield None
        return
    loop = asyncio.get_running_loop()
    host, port = listen
    server = OpsServer(host, port, lambda: _readiness(loop, state.client), state.metrics.registry)
    server.start()
    _log.info("ops endpoint listening", extra={"event": "ops_listening", "host": host, "port": server.port})
    try:
        yield server.port
    finally:
        # In a worker thread: a scrape waiting for this loop must not deadlock the stop.
        await asyncio.to_thread(server.stop)
