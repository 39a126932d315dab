"""The HTTP gate: every request carries a token the guardian accepts.

A token is an agent token (``agt_...``) or, for remote agents, an OAuth access token
(a JWT) from the issuer the guardian's policy names. The gateway never judges a JWT:
it forwards it, and the guardian verifies it (guardian/access/oauth.py).

``BearerAuth`` is an ASGI middleware in front of the SDK's streamable HTTP app:

- with OAuth configured (:class:`OAuthResource`), the protected resource metadata
  (RFC 9728) is served at ``/.well-known/oauth-protected-resource/mcp`` to anyone;
- no ``Authorization: Bearer <token>``, or a token that has neither shape: 401 with
  ``WWW-Authenticate: Bearer`` (naming the resource metadata and the scopes when
  OAuth is configured, so an OAuth client finds its authorization server), and the
  guardian is not asked;
- otherwise ``SessionBroker.verify``: refused → 401; guardian unreachable → 503
  with ``Retry-After``; rate limited → 429 with ``Retry-After``.

Host and Origin are checked first with the SDK's DNS-rebinding rules (which the
SDK's transport applies again), so a request from a rebound page costs the
guardian nothing. Then the body is read, up to ``max_body_bytes``: a larger one
is answered 413 with a JSON-RPC error whose message states the limit (the MCP
client shows it to the agent; a bare 413 reads as "Server returned an error
response"). Nothing of an oversized request reaches the MCP server.

The gate decides only whether a request may reach the MCP server at all; each
tool call still runs on the caller's own token, which the tool handler reads
from the same header.
"""

from __future__ import annotations

import logging
import math
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from mcp.server.auth.routes import build_resource_metadata_url
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from pydantic import AnyHttpUrl
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.sessions import SessionBroker
from gateway.state import GatewayState
from shared.errors import GuardianError, RateLimited, Unavailable
from shared.formats import is_agent_token, looks_like_jwt

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MCP_PATH",
    "OAUTH_SCOPES",
    "BearerAuth",
    "OAuthResource",
    "bearer_token",
    "build_http_app",
    "transport_security",
]

MCP_PATH: Final = "/mcp"
#: The largest HTTP request body the gateway reads (as the SDK's default): far above any memory the default
#: policy accepts (a batch of 20 memories of 64 KiB), far below what would let a client tie up memory.
DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024
#: JSON-RPC's "Invalid Request".
_INVALID_REQUEST: Final = -32600
_REALM: Final = 'Bearer realm="agent-guardian"'
_UNAVAILABLE_RETRY_AFTER_S: Final = 2
_log = logging.getLogger(__name__)


#: The scopes an OAuth access token may carry here (the guardian's policy maps each to operations).
OAUTH_SCOPES: Final = ("memory:read", "memory:write")


@dataclass(frozen=True)
class OAuthResource:
    """The gateway as an OAuth protected resource: its public URL and the issuer of its tokens."""

    #: The URL clients reach the MCP endpoint at (behind a proxy: its public https URL).
    resource_url: str
    issuer: str

    @property
    def metadata_url(self) -> str:
        """Where the protected resource metadata is (RFC 9728 §3.1)."""
        return str(build_resource_metadata_url(AnyHttpUrl(self.resource_url)))


def _resource_metadata(oauth: OAuthResource) -> JSONResponse:
    """The protected resource metadata (RFC 9728 §2). Written here, not by the SDK's route, whose URL type
    would add a "/" to the issuer: an issuer identifier must be given exactly (RFC 8414 §3.3)."""
    metadata = {
        "resource": oauth.resource_url,
        "authorization_servers": [oauth.issuer],
        "scopes_supported": list(OAUTH_SCOPES),
        "bearer_methods_supported": ["header"],
        "resource_name": "agent-guardian memory",
    }
    return JSONResponse(metadata, headers={"Cache-Control": "public, max-age=3600"})


def bearer_token(authorization: str | None) -> str | None:
    """The token in an ``Authorization`` header value (an agent token or a JWT), or None if absent or malformed."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not (is_agent_token(token) or looks_like_jwt(token)):
        return None
    return token


def _host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def transport_security(host: str, port: int, extra_hosts: Iterable[str] = ()) -> TransportSecuritySettings:
    """DNS-rebinding protection allowing the bound address, 127.0.0.1 and localhost (any port if 0), and the
    extra host names (also bare, as they arrive through a TLS proxy on 443)."""
    port_text = str(port) if port else "*"
    hosts = dict.fromkeys([host, "127.0.0.1", "localhost", *extra_hosts])
    allowed = [_host_port(h, port_text) for h in hosts]
    # A name clients use through a TLS proxy arrives as they typed it: no port (443), and https origins.
    proxied = [name for name in extra_hosts if ":" not in name]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=allowed + proxied,
        allowed_origins=[f"http://{a}" for a in allowed] + [f"https://{name}" for name in proxied],
    )


def _refusal(status: int, error: str, message: str, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse({"error": error, "message": message}, status_code=status, headers=headers)


class BearerAuth:
    """ASGI middleware requiring an accepted agent token on every HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        broker: SessionBroker,
        security: TransportSecuritySettings,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        oauth: OAuthResource | None = None,
    ) -> None:
        self._app = app
        self._broker = broker
        self._rebinding = TransportSecurityMiddleware(security)
        self._max_body_bytes = max_body_bytes
        self._oauth = oauth
        self._metadata_path = urllib.parse.urlsplit(oauth.metadata_url).path if oauth else None
        challenge = _REALM
        if oauth is not None:
            challenge += f', resource_metadata="{oauth.metadata_url}", scope="{" ".join(OAUTH_SCOPES)}"'
        self._challenge = challenge

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events pass through
            await self._app(scope, receive, send)
            return
        refusal = await self._rebinding.validate_request(Request(scope), is_post=False)
        if refusal is None and self._oauth is not None and scope["path"] == self._metadata_path:
            await _resource_metadata(self._oauth)(scope, receive, send)  # public, as RFC 9728 means it
            return
        if refusal is None:
            refusal = await self._check_token(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        body = await self._read_body(scope, receive)
        if body is None:
            await self._too_large(scope, receive, send)
            return
        await self._app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> list[Message] | None:
        """The request's body messages, or None when it is larger than the limit (declared or sent)."""
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdecimal() and int(declared) > self._max_body_bytes:
            return None
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            size += len(message.get("body", b""))
            if size > self._max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        _log.info("http request body over the limit", extra={"peer": f"{client[0]}:{client[1]}" if client else "-"})
        message = (
            f"the request is larger than the gateway accepts ({self._max_body_bytes} bytes per HTTP request);"
            " store less at once (the tool descriptions give each memory's limits)"
        )
        error = {"jsonrpc": "2.0", "id": None, "error": {"code": _INVALID_REQUEST, "message": message}}
        await JSONResponse(error, status_code=413)(scope, receive, send)

    async def _check_token(self, scope: Scope) -> JSONResponse | None:
        header = Headers(scope=scope).get("authorization")
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else "-"
        if header is None:
            _log.info("http request without a bearer token", extra={"peer": peer})
            return _refusal(
                401,
                "unauthorized",
                "send the agent token as 'Authorization: Bearer agt_...'"
                + (" or an OAuth access token (see WWW-Authenticate)" if self._oauth else ""),
                {"WWW-Authenticate": self._challenge},
            )
        token = bearer_token(header)
        invalid = {"WWW-Authenticate": f'{self._challenge}, error="invalid_token"'}
        if token is None:
            _log.info("http request with a malformed bearer token", extra={"peer": peer})
            return _refusal(
                401,
                "invalid_token",
                "the bearer token is neither an agent token (agt_...) nor an access token",
                invalid,
            )
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
            _log.info("http request with a refused token", extra={"peer": peer})
            return _refusal(401, "invalid_token", "the token was not accepted (wrong, expired or revoked)", invalid)
        return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands out messages already read, then reads on."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


def build_http_app(
    server: MCPServer[GatewayState],
    state: GatewayState,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    extra_hosts: Iterable[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    oauth: OAuthResource | None = None,
) -> ASGIApp:
    """The streamable HTTP app (at ``/mcp``) behind the bearer-token gate, rebinding protection on."""
    security = transport_security(host, port, extra_hosts)
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH, transport_security=security, host=host, max_request_body_size=max_body_bytes
    )
    return BearerAuth(app, state.broker, security, max_body_bytes, oauth)
