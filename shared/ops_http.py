"""The operations endpoint each process serves on loopback: ``/healthz``, ``/readyz``, ``/metrics``.

- ``/healthz``: 200 while the process can answer at all (liveness).
- ``/readyz``: 200 when the process can do its job, else 503; the body is JSON
  naming each check and what is wrong with it.
- ``/metrics``: the process's Prometheus registry in the text exposition format.

Only loopback addresses are accepted: the endpoint has no authentication, so
it must not be reachable from another host. Nothing served here holds memory
content, a token or a key: readiness says which check failed, and metrics
carry only bounded labels (operations, decisions, reason kinds, rule ids).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, disable_created_metrics, generate_latest

from shared.errors import ConfigError

__all__ = ["OpsServer", "Readiness", "new_registry", "parse_listen"]

log = logging.getLogger("agent_guardian")

_JSON: Final = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Readiness:
    """Whether a process can do its job, and each check's finding ("ok" or what is wrong)."""

    checks: Mapping[str, str] = field(default_factory=dict)
    #: What an operator should fix although the process serves (shown by /readyz; never makes it unready).
    warnings: Mapping[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        """True when every check passed."""
        return all(finding == "ok" for finding in self.checks.values())


def new_registry() -> CollectorRegistry:
    """A process's own metrics registry (not the library's global one), without ``_created`` series."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return CollectorRegistry(auto_describe=True)


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6) and insist the host is a loopback address."""
    host, separator, port_text = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not port_text.isdigit() or not host:
        raise ConfigError(f"{what}: expected HOST:PORT such as 127.0.0.1:9464, got {value!r}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"{what}: port {port} is out of range (0-65535; 0 picks a free port)")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{what}: the host must be a loopback IP address such as 127.0.0.1, got {host!r}") from None
    if not address.is_loopback:
        raise ConfigError(
            f"{what}: {host} is not a loopback address; the endpoint has no authentication,"
            " so it only listens on 127.0.0.1 or ::1"
        )
    return host, port


class _Server(HTTPServer):
    """One thread serves requests in turn: scrapes are rare and quick, and the checks
    run on one long-lived thread (so per-thread resources, like a database reader, stay one)."""

    def __init__(
        self,
        address: tuple[str, int],
        readiness: Callable[[], Readiness],
        registry: CollectorRegistry,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.readiness = readiness
        self.registry = registry
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "agent-guardian-ops"
    sys_version = ""
    timeout = 5  # seconds a client may take to send its request; a stalled one does not hold the endpoint

    def do_GET(self) -> None:
        """Serve one of the three paths; anything else is 404."""
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(HTTPStatus.OK, _JSON, b'{"alive": true}\n')
        elif path == "/readyz":
            try:
                readiness = self.server.readiness()
            except Exception:
                log.exception("the readiness check failed")
                readiness = Readiness({"readiness_check": "the check itself failed; see the log"})
            answer = {"ready": readiness.ready, "checks": dict(readiness.checks), "warnings": dict(readiness.warnings)}
            body = json.dumps(answer, sort_keys=True)
            status = HTTPStatus.OK if readiness.ready else HTTPStatus.SERVICE_UNAVAILABLE
            self._send(status, _JSON, body.encode() + b"\n")
        elif path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        else:
            self._send(HTTPStatus.NOT_FOUND, _JSON, b'{"error": "not found: use /healthz, /readyz or /metrics"}\n')

    def do_HEAD(self) -> None:
        """Like GET, without the body."""
        self.do_GET()

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are frequent and carry nothing worth a log line."""


class OpsServer:
    """Serves the three paths on a daemon thread until stopped."""

    def __init__(self, host: str, port: int, readiness: Callable[[], Readiness], registry: CollectorRegistry) -> None:
        try:
            self._server = _Server((host, port), readiness, registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} for /healthz, /readyz and /metrics: {exc.strerror}"
            ) from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()
