"""agent-guardian's gateway: the unprivileged MCP server in front of the guardian.

It holds no data, no key and no policy, and is assumed compromised: every tool
call is forwarded over gRPC on the guardian's agent socket, on a guardian
session opened with the agent's token. It imports nothing from ``guardian``.

Modules, one concept each::

    models      plain values exchanged with the guardian
    metrics     GatewayMetrics: the gateway's Prometheus metrics, in a registry of its own
    client      GuardianClient: the only user of the gRPC stubs; gRPC errors -> shared.errors
    sessions    SessionBroker: one guardian session per MCP session, re-opened transparently
    state       GatewayState and open_gateway(): the long-lived resources
    schemas     pydantic shapes of the tools' inputs and outputs
    outcomes    shared.errors -> tool error or MCPError, in one place
    tools       build_server(): the MCPServer and its seven memory tools
    http_auth   the bearer-token gate and DNS-rebinding settings for HTTP
    ops         /healthz, /readyz (the guardian's health check) and /metrics on loopback
    cli         the agent-gateway command
"""

from gateway.client import GuardianClient
from gateway.http_auth import BearerAuth, build_http_app
from gateway.models import Limits, Memory, MemoryDraft, Page, SearchHit, SessionInfo
from gateway.outcomes import mcp_outcome
from gateway.sessions import SessionBroker
from gateway.state import GatewayState, open_gateway
from gateway.tools import build_server

__all__ = [
    "BearerAuth",
    "GatewayState",
    "GuardianClient",
    "Limits",
    "Memory",
    "MemoryDraft",
    "Page",
    "SearchHit",
    "SessionBroker",
    "SessionInfo",
    "build_http_app",
    "build_server",
    "mcp_outcome",
    "open_gateway",
]
