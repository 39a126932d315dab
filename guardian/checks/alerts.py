"""The optional alert webhook: anomaly events POSTed as JSON, off the request path.

Off by default: a :class:`WebhookAlerter` exists only when the policy names a
``webhook_url`` (there is no default or placeholder URL). Every anomaly goes to
the security log whatever happens here; the webhook is an extra copy.

Design
    :meth:`WebhookAlerter.__call__` (the :class:`~guardian.checks.anomaly.AnomalyMonitor`'s
    alert callback) only enqueues, so a slow or dead receiver never delays a
    request. One daemon worker thread POSTs each event with ``urllib.request``:
    ``{"source": "agent-guardian", "event": "anomaly", ...the AnomalyEvent's fields}``.
    The queue is bounded: when it is full the event is dropped and counted, and
    the first drop of each spell is logged (a flood of alerts must not become a
    flood of log lines). A failed POST (unreachable host, timeout, a status that
    is not 2xx, a redirect) is logged and counted, never raised or retried: the
    security log holds the event anyway.

URLs
    Only ``http://`` and ``https://`` URLs with a host are accepted
    (``ValueError`` otherwise; the policy parser reports it as a ConfigError).
    Credentials in the URL's userinfo are sent as HTTP Basic authentication, not
    as part of the address. Log lines name the URL without its userinfo, query
    or fragment, where receivers usually keep their secrets. Redirects are not
    followed (urllib would replay a POST as a GET elsewhere). Proxies follow the
    standard ``*_proxy`` environment variables, read once when the alerter is
    built.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Final

from guardian.checks.anomaly import AnomalyEvent

__all__ = ["WebhookAlerter"]

security_log = logging.getLogger("agent_guardian.security")

#: The most of a receiver's answer read (and discarded) before the connection is closed.
_MAX_RESPONSE_BYTES: Final = 64 * 1024


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turns every redirect into an HTTPError: an alert goes to the configured address or nowhere."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: object,
        code: int,
        msg: str,
        headers: object,
        newurl: str,
    ) -> urllib.request.Request | None:
        """Follow no redirect."""
        return None


def _describe(error: Exception) -> str:
    """A failure in a few words, without the URL."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP status {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"{type(error.reason).__name__}: {error.reason}"[:200]
    return f"{type(error).__name__}: {error}"[:200]


class WebhookAlerter:
    """Posts anomaly events to a webhook from a background thread; never blocks or raises on the request path."""

    def __init__(self, url: str, timeout_s: float = 5.0, queue_size: int = 100) -> None:
        """An alerter posting to url (http or https), each POST bounded by timeout_s, holding at most queue_size."""
        if any(char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F for char in url):
            raise ValueError("the alert webhook URL must not contain spaces or control characters")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the alert webhook must be an http:// or https:// URL with a host")
        _ = parts.port  # raises ValueError for a port that is not a number in range
        if not timeout_s > 0:
            raise ValueError("the alert webhook timeout must be > 0 seconds")
        if queue_size < 1:
            raise ValueError("the alert webhook queue size must be >= 1")
        self._url = url
        host = parts.netloc.rpartition("@")[2]
        self._target = urllib.parse.urlunsplit((parts.scheme, host, parts.path or "/", parts.query, ""))
        #: What log lines name: no userinfo, query or fragment.
        self._safe_url = urllib.parse.urlunsplit((parts.scheme, host, parts.path or "/", "", ""))
        self._headers = {"Content-Type": "application/json", "User-Agent": "agent-guardian-alerts"}
        if parts.username is not None:
            userinfo = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")
        self._timeout_s = timeout_s
        self._queue_size = queue_size
        self._opener = urllib.request.build_opener(_RefuseRedirects())
        # Unbounded underneath; __call__ enforces queue_size under the lock, so close() can always enqueue its stop.
        self._queue: queue.SimpleQueue[AnomalyEvent | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._drop_logged = False
        self._abandon = threading.Event()
        self._sent = 0
        self._failed = 0
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="guardian-alert-webhook", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The configured URL, as given (it may hold credentials: compare it, never log it)."""
        return self._url

    @property
    def sent(self) -> int:
        """Events the receiver accepted (a 2xx answer)."""
        with self._lock:
            return self._sent

    @property
    def failed(self) -> int:
        """Events whose POST failed."""
        with self._lock:
            return self._failed

    @property
    def dropped(self) -> int:
        """Events never posted: the queue was full, the alerter was closed, or close() gave up on them."""
        with self._lock:
            return self._dropped

    def __call__(self, event: AnomalyEvent) -> None:
        """Queue event for posting; drop it (counted) if the queue is full or the alerter closed. Never blocks."""
        log_drop = False
        with self._lock:
            if self._closed or self._pending >= self._queue_size:
                self._dropped += 1
                log_drop = not self._closed and not self._drop_logged
                self._drop_logged = self._drop_logged or log_drop
            else:
                self._pending += 1
                self._drop_logged = False
                self._queue.put(event)
        if log_drop:
            security_log.warning(
                "alert webhook queue full; dropping alerts (they are in the security log)",
                extra={"event": "alert_dropped", "url": self._safe_url, "queue_size": self._queue_size},
            )

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the worker: post what is queued for up to timeout_s, then drop (and count) the rest."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(max(0.0, timeout_s))
        if self._thread.is_alive():
            # The in-flight POST ends within its own timeout; everything after it is dropped.
            self._abandon.set()

    # -- the worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            with self._lock:
                self._pending -= 1
            if self._abandon.is_set():
                with self._lock:
                    self._dropped += 1
                continue
            try:
                self._post(event)
            except Exception as error:  # never let the worker die: later alerts still matter
                self._failure(error)

    def _post(self, event: AnomalyEvent) -> None:
        body = json.dumps(
            {"source": "agent-guardian", "event": "anomaly", **dataclasses.asdict(event)}, ensure_ascii=False
        ).encode()
        # The scheme was checked in __init__ (only http and https reach here).
        request = urllib.request.Request(self._target, data=body, headers=self._headers, method="POST")  # noqa: S310
        started = time.monotonic()
        with self._opener.open(request, timeout=self._timeout_s) as response:
            response.read(_MAX_RESPONSE_BYTES)
            status = int(response.status)
        if not 200 <= status < 300:
            raise urllib.error.HTTPError(self._safe_url, status, "not a 2xx status", response.headers, None)
        with self._lock:
            self._sent += 1
        security_log.debug(
            "alert posted",
            extra={"event": "alert_sent", "url": self._safe_url, "ms": round((time.monotonic() - started) * 1000)},
        )

    def _failure(self, error: Exception) -> None:
        if isinstance(error, urllib.error.HTTPError):
            error.close()
        with self._lock:
            self._failed += 1
        described = _describe(error)
        for secret in (self._url, self._target):  # in case an error message quotes the address
            described = described.replace(secret, self._safe_url)
        security_log.warning(
            "could not post an alert to the webhook (it is in the security log)",
            extra={"event": "alert_failed", "url": self._safe_url, "error": described},
        )
