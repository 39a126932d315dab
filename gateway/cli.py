"""``agent-gateway``: serve the memory tools over stdio or streamable HTTP.

stdio: the agent token comes from ``AGENT_GUARDIAN_TOKEN``; the gateway opens
its guardian session at start, so the tool descriptions carry the session's
limits, namespaces and read window. Stdout carries only the MCP protocol; logs
are JSON lines on stderr.

HTTP: ``/mcp`` on 127.0.0.1:8765 by default; every request needs
``Authorization: Bearer <agent token>``.

With ``--ops-listen HOST:PORT`` either mode also serves ``/healthz``,
``/readyz`` and ``/metrics`` on that loopback address (``gateway.ops``).

SIGTERM and SIGINT stop either mode after closing the guardian sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, Final

import uvicorn

from gateway.client import DEFAULT_DEADLINE_S
from gateway.http_auth import DEFAULT_MAX_BODY_BYTES, MCP_PATH, OAuthResource, build_http_app
from gateway.ops import serving_ops
from gateway.state import open_gateway
from gateway.tools import build_server
from shared.errors import ConfigError, GuardianError, Unauthenticated
from shared.formats import is_agent_token
from shared.jsonlog import configure_logging
from shared.ops_http import parse_listen
from shared.otlp import check_endpoint, export_spans
from shared.sdnotify import Watchdog, notify

__all__ = ["main"]

SOCKET_ENV: Final = "AGENT_GUARDIAN_SOCKET"
TOKEN_ENV: Final = "AGENT_GUARDIAN_TOKEN"  # noqa: S105 (a variable's name, not a secret)
DEFAULT_SOCKET: Final = "/run/agent-guardian/agent.sock"
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_TOKEN_REFUSED: Final = 3
_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
_log = logging.getLogger("gateway")

_EPILOG = f"""\
environment:
  {TOKEN_ENV}   the agent token (agt_...), required with --transport stdio;
                          never printed. Over HTTP each client sends its own token.
  {SOCKET_ENV}  default for --socket

examples:
  {TOKEN_ENV}=agt_... agent-gateway --transport stdio
  agent-gateway --transport http --port 8765
      then point an MCP client at http://127.0.0.1:8765{MCP_PATH} with the header
      'Authorization: Bearer agt_...'
  agent-gateway --transport http --ops-listen 127.0.0.1:9465
      also serve http://127.0.0.1:9465/healthz (alive), /readyz (200 when the guardian
      answers its health check, else 503 with JSON saying why) and /metrics (Prometheus)

exit status: 0 stopped cleanly; 1 could not start (e.g. the port is in use);
             2 bad usage or missing/malformed token; 3 the guardian refused the agent token (stdio)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-gateway",
        description="MCP server giving an AI agent a persistent memory kept by the agent-guardian daemon. "
        "It holds no data or keys: every tool call is forwarded to the guardian's agent socket.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--transport", choices=("stdio", "http"), required=True, help="stdio (one client) or streamable HTTP"
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=os.environ.get(SOCKET_ENV, DEFAULT_SOCKET),
        help=f"absolute path of the guardian's agent socket (default: ${SOCKET_ENV} or %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP: address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="HTTP: port to bind, 0 for any (default: %(default)s)")
    parser.add_argument(
        "--allowed-host",
        metavar="NAME",
        action="append",
        default=[],
        help="HTTP: another Host name clients use to reach the gateway (repeatable); "
        "127.0.0.1, localhost and --host are always allowed",
    )
    parser.add_argument(
        "--behind-tls-proxy",
        action="store_true",
        help="HTTP: allow binding an address other than loopback, because a reverse proxy in front terminates TLS"
        " (see the README's Caddy and nginx configs); without it such a bind is refused: tokens would cross the"
        " network in clear",
    )
    parser.add_argument(
        "--oauth-issuer",
        metavar="URL",
        help="HTTP: accept OAuth access tokens from this authorization server (as the guardian's policy"
        " oauth.issuer says; the guardian verifies every token): publish the protected resource metadata"
        " (RFC 9728) and name it in each 401; needs --resource-url",
    )
    parser.add_argument(
        "--resource-url",
        metavar="URL",
        help="HTTP: this MCP endpoint's URL as clients reach it (behind a TLS proxy, its public https URL;"
        " the policy's oauth.audience): the resource the access tokens are for",
    )
    parser.add_argument(
        "--max-request-bytes",
        metavar="BYTES",
        type=_body_limit,
        default=DEFAULT_MAX_BODY_BYTES,
        help="HTTP: the largest request body read; a larger one gets a JSON-RPC error stating this limit "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--deadline",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_DEADLINE_S,
        help="deadline of each guardian call (default: %(default)s)",
    )
    parser.add_argument(
        "--ops-listen",
        metavar="HOST:PORT",
        default=None,
        help="serve /healthz, /readyz and Prometheus /metrics on this loopback address "
        "(127.0.0.1:PORT or [::1]:PORT; port 0 picks a free one, logged as event ops_listening); "
        "default: not served",
    )
    parser.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="export OpenTelemetry spans over OTLP/HTTP to this URL (e.g. http://127.0.0.1:4318/v1/traces);"
        " default: not exported. Spans carry the method, tool and outcome, never memory content or a token",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="least severe level logged to stderr as JSON lines (default: %(default)s)",
    )
    return parser


#: Addresses a bind may use without TLS in front.
_LOOPBACK: Final = ("127.0.0.1", "localhost", "::1")


def _body_limit(text: str) -> int:
    """--max-request-bytes: a whole number of at least 64 KiB (a limit below one memory would refuse everything)."""
    if not text.isdecimal() or int(text) < 65_536:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes of at least 65536, got {text!r}")
    return int(text)


@contextlib.contextmanager
def _stop_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def _until_signal(work: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``work`` until it ends (None) or a stop signal arrives (the cancelled, maybe unfinished, task)."""
    stop = asyncio.Event()
    with _stop_signals(stop):
        task = asyncio.create_task(work)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task.done():
            task.result()
            return None
        _log.info("stopping")
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        return task


@contextlib.asynccontextmanager
async def _systemd_watchdog() -> AsyncIterator[None]:
    """Ping systemd's watchdog from the event loop while the block runs (a stuck loop stops the pings)."""
    watchdog = Watchdog()

    async def feed(interval_s: float) -> None:
        while True:
            watchdog.ping_if_due()
            await asyncio.sleep(interval_s / 2)

    task = asyncio.create_task(feed(watchdog.interval_s)) if watchdog.interval_s else None
    try:
        yield
    finally:
        notify("STOPPING=1")
        if task is not None:
            task.cancel()


async def _serve_stdio(args: argparse.Namespace, token: str, ops_listen: tuple[str, int] | None) -> int:
    async with open_gateway(args.socket, token=token, deadline_s=args.deadline) as state:
        try:
            session = await state.broker.open(None, token)
        except Unauthenticated as err:
            _log.error("agent token refused", extra={"detail": err.message})
            return EXIT_TOKEN_REFUSED
        except GuardianError as err:
            # Serve anyway (e.g. the guardian is restarting): calls report the error until it is back.
            _log.warning(
                "no guardian session at start; tool descriptions state limits generally", extra={"kind": err.kind}
            )
            session = None
        server = build_server(state, session=session, log_level=args.log_level.upper())
        try:
            async with serving_ops(ops_listen, state), _systemd_watchdog():
                _log.info("serving MCP on stdio", extra={"socket": args.socket})
                notify("READY=1\nSTATUS=serving MCP on stdio")
                unfinished = await _until_signal(server.run_stdio_async())
        except ConfigError as err:
            _log.error("could not start the ops endpoint", extra={"detail": err.message})
            return EXIT_FAILED
    _log.info("stopped")
    if unfinished is not None and not unfinished.done():
        # The SDK reads stdin in a worker thread that no cancellation can interrupt, and
        # the interpreter would wait for it at exit; the sessions are closed, so leave now.
        logging.shutdown()
        os._exit(0)
    return 0


class _Uvicorn(uvicorn.Server):
    """uvicorn that logs one line when listening and lets the gateway finish its own shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a captured signal after serve() returns, which would kill the
        # process before the guardian sessions are closed; handle the signals on the loop instead.
        loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            url = f"http://{host if ':' not in host else f'[{host}]'}:{port}{MCP_PATH}"
            _log.info("listening", extra={"url": url, "host": host, "port": port})
            notify(f"READY=1\nSTATUS=serving MCP on {url}")


async def _serve_http(args: argparse.Namespace, ops_listen: tuple[str, int] | None) -> int:
    if args.host not in _LOOPBACK:
        _log.warning("binding a non-loopback address behind a TLS proxy; any host that can reach it may try tokens")
    async with open_gateway(args.socket, deadline_s=args.deadline) as state:
        server = build_server(state, log_level=args.log_level.upper())
        app = build_http_app(
            server,
            state,
            host=args.host,
            port=args.port,
            extra_hosts=args.allowed_host,
            max_body_bytes=args.max_request_bytes,
            oauth=OAuthResource(args.resource_url, args.oauth_issuer) if args.oauth_issuer else None,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="on",
        )
        try:
            async with serving_ops(ops_listen, state), _systemd_watchdog():
                await _Uvicorn(config).serve()
        except ConfigError as err:
            _log.error("could not start the ops endpoint", extra={"detail": err.message})
            return EXIT_FAILED
        except SystemExit:  # uvicorn's way of failing to start; it logged why (e.g. the port is in use)
            _log.error("could not start the HTTP server", extra={"host": args.host, "port": args.port})
            return EXIT_FAILED
    _log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gateway; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level)
    if not os.path.isabs(args.socket):
        print(f"agent-gateway: error: --socket must be an absolute path, got {args.socket!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        ops_listen = None if args.ops_listen is None else parse_listen(args.ops_listen, "--ops-listen")
    except ConfigError as err:
        print(f"agent-gateway: error: {err.message}", file=sys.stderr)
        return EXIT_USAGE
    if args.transport == "http" and args.host not in _LOOPBACK and not args.behind_tls_proxy:
        print(
            f"agent-gateway: error: --host {args.host} would carry bearer tokens over the network in clear: bind"
            " 127.0.0.1 and put a TLS-terminating reverse proxy in front (the README has Caddy and nginx configs),"
            " or, if one already is in front of this address, say so with --behind-tls-proxy",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.otlp_endpoint:
        try:
            export_spans("agent-gateway", check_endpoint(args.otlp_endpoint, "--otlp-endpoint"))
        except ConfigError as err:
            print(f"agent-gateway: error: {err.message}", file=sys.stderr)
            return EXIT_USAGE
    if bool(args.oauth_issuer) != bool(args.resource_url):
        print("agent-gateway: error: --oauth-issuer and --resource-url go together", file=sys.stderr)
        return EXIT_USAGE
    for flag, url in (("--oauth-issuer", args.oauth_issuer), ("--resource-url", args.resource_url)):
        if url and urllib.parse.urlsplit(url).scheme not in ("https", "http"):
            print(f"agent-gateway: error: {flag} must be an https:// URL (http:// for local tests)", file=sys.stderr)
            return EXIT_USAGE
    if not os.path.exists(args.socket):
        _log.warning(
            "guardian socket not found yet; calls fail as unavailable until it appears", extra={"socket": args.socket}
        )
    if args.log_level != "debug":
        logging.getLogger("uvicorn").setLevel(logging.WARNING)  # the gateway logs its own "listening"
    # The SDK logs MCP session ids (valid ones, and whatever a client sent as one) at info and
    # debug: bearer-like values a log must not hold, whatever the level.
    for name in ("mcp.server.streamable_http_manager", "mcp.server.streamable_http"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.transport == "http":
        return asyncio.run(_serve_http(args, ops_listen))
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        print(f"agent-gateway: error: set {TOKEN_ENV} to the agent token (agt_...)", file=sys.stderr)
        return EXIT_USAGE
    if not is_agent_token(token):
        print(
            f"agent-gateway: error: {TOKEN_ENV} is not an agent token ('agt_' and 43 base64url characters)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return asyncio.run(_serve_stdio(args, token, ops_listen))


if __name__ == "__main__":
    sys.exit(main())
