"""The HTTP gate: every request carries an agent token the guardian accepts.

``BearerAuth`` is an ASGI middleware in front of the SDK's streamable HTTP app:

- no ``Authorization: Bearer <token>``, or a token that does not have the shape
  of an agent token: 401 with ``WWW-Authenticate: Bearer``, and the guardian is
  not asked;
- otherwise ``SessionBroker.verify``: refused → 401; guardian unreachable → 503
  with ``Retry-After``; rate limited → 429 with ``Retry-After``.

Host and Origin are checked first with the SDK's DNS-rebinding rules (which the
SDK's transport applies again), so a request from a rebound page costs the
guardian nothing. The gate decides only whether a request may reach the MCP
server at all; each tool call still runs on the caller's own token, which the
tool handler reads from the same header.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Final

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.sessions import SessionBroker
from gateway.state import GatewayState
from shared.errors import GuardianError, RateLimited, Unavailable
from shared.formats import is_agent_token

__all__ = ["MCP_PATH", "BearerAuth", "bearer_token", "build_http_app", "transport_security"]

MCP_PATH: Final = "/mcp"
_REALM: Final = 'Bearer realm="agent-guardian"'
_UNAVAILABLE_RETRY_AFTER_S: Final = 2
_log = logging.getLogger(__name__)


def bearer_token(authorization: str | None) -> str | None:
    """The agent token in an ``Authorization`` header value, or None if absent or malformed."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not is_agent_token(token):
        return None
    return token


def _host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def transport_security(host: str, port: int, extra_hosts: Iterable[str] = ()) -> TransportSecuritySettings:
    """DNS-rebinding protection allowing the bound address, 127.0.0.1 and localhost (any port if 0)."""
    port_text = str(port) if port else "*"
    hosts = dict.fromkeys([host, "127.0.0.1", "localhost", *extra_hosts])
    allowed = [_host_port(h, port_text) for h in hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=allowed,
        allowed_origins=[f"http://{a}" for a in allowed],
    )


def _refusal(status: int, error: str, message: str, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status, headers=headers)


class BearerAuth:
    """ASGI middleware requiring an accepted agent token on every HTTP request."""

    def __init__(self, app: ASGIApp, broker: SessionBroker, security: TransportSecuritySettings) -> None:
        self._app = app
        self._broker = broker
        self._rebinding = TransportSecurityMiddleware(security)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events pass through
            await self._app(scope, receive, send)
            return
        refusal = await self._rebinding.validate_request(Request(scope), is_post=False)
        if refusal is None:
            refusal = await self._check_token(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self._app(scope, receive, send)

    async def _check_token(self, scope: Scope) -> JSONResponse | None:
        header = Headers(scope=scope).get("authorization")
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        if header is None:
            _log.info("http request without a bearer token", extra={"peer": peer})
            return _refusal(
                401,
                "unauthorized",
                "send the agent token as 'Authorization: Bearer agt_...'",
                {"WWW-Authenticate": _REALM},
            )
        token = bearer_token(header)
        invalid = {"WWW-Authenticate": f'{_REALM}, error="invalid_token"'}
        if token is None:
            _log.info("http request with a malformed bearer token", extra={"peer": peer})
            return _refusal(401, "invalid_token", "the bearer token is not an agent token (agt_...)", invalid)
        try:
            accepted = await self._broker.verify(token)
        except Unavailable:
            return _refusal(
                503,
                "unavailable",
                "the memory guardian is unavailable; retry in a few seconds",
                {"Retry-After": str(_UNAVAILABLE_RETRY_AFTER_S)},
            )
        except RateLimited as err:
            seconds = max(1, math.ceil(err.retry_after_ms / 1000))
            return _refusal(429, "rate_limited", err.message, {"Retry-After": str(seconds)})
        except GuardianError as err:
            _log.warning("token check failed", extra={"kind": err.kind, "peer": peer})
            return _refusal(500, "internal", "internal error", {})
        if not accepted:
            _log.info("http request with a refused agent token", extra={"peer": peer})
            return _refusal(401, "invalid_token", "the agent token was not accepted (wrong or revoked)", invalid)
        return None


def build_http_app(
    server: MCPServer[GatewayState],
    state: GatewayState,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    extra_hosts: Iterable[str] = (),
) -> ASGIApp:
    """The streamable HTTP app (at ``/mcp``) behind the bearer-token gate, rebinding protection on."""
    security = transport_security(host, port, extra_hosts)
    app = server.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=security, host=host)
    return BearerAuth(app, state.broker, security)
