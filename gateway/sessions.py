"""One guardian session per MCP session, opened lazily and re-opened transparently.

The broker maps *(scope, token fingerprint)* to a guardian session. The scope
names the MCP session the call belongs to:

- ``None``: the one session of a stdio gateway (the process serves one client),
  and every sessionless request of the 2026-07-28 protocol over HTTP (there is
  no MCP session to key by; the token's requests share one guardian session).
- a transport session id (``Mcp-Session-Id``) for a stateful HTTP client.

The MCP SDK's ``ServerSession`` cannot be the key: in ``mcp`` 2.x it is a
per-request proxy, so keying by it would open a guardian session per tool call.

The fingerprint is sha256 of the token and lives in memory only; the token
itself is passed in by the caller on every call (stdio: from the environment;
HTTP: from the request's bearer header) and is kept nowhere here.

Invariants:

- At most one OpenSession is in flight per entry (an ``asyncio.Lock`` each).
- A call that fails with ``Unauthenticated`` did nothing (the guardian checks the
  session first), so it is repeated once, on a freshly opened session. That is
  how a guardian restart (sessions live in its memory) stays invisible.
- An agent token the guardian refuses is reported as such, never retried.

Metrics (``client.metrics``): a re-open of a session the guardian no longer
knew counts as ``agent_gateway_guardian_reconnects_total``; the sessions held
(entries with a session, plus spares) are read at each scrape as
``agent_gateway_sessions_open``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

from gateway.client import GuardianClient
from gateway.models import SessionInfo
from shared.errors import Unauthenticated, Unavailable

__all__ = ["TOKEN_REJECTED_MESSAGE", "SessionBroker", "token_fingerprint"]

TOKEN_REJECTED_MESSAGE: Final = (
    "the agent token was not accepted (wrong or revoked); check the token the gateway was given"  # noqa: S105
)
#: How long a bearer token the guardian accepted passes the HTTP gate without asking again.
VERIFY_TTL_S: Final = 60.0
#: Bound on scoped entries (HTTP sessions); the least recently used are forgotten beyond it.
MAX_ENTRIES: Final = 1024
#: How long a best-effort CloseSession may take at shutdown.
_CLOSE_DEADLINE_S: Final = 2.0

_T = TypeVar("_T")
_log = logging.getLogger(__name__)


def token_fingerprint(token: str) -> str:
    """The sha256 hex of a token: how the broker tells tokens apart without keeping them."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    info: SessionInfo | None = None
    last_used: float = 0.0


class SessionBroker:
    """Opens, shares, re-opens and finally closes guardian sessions for the gateway."""

    def __init__(
        self,
        client: GuardianClient,
        *,
        verify_ttl_s: float = VERIFY_TTL_S,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._verify_ttl_s = verify_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[tuple[str | None, str], _Entry] = {}
        #: Sessions opened by ``verify`` and not yet taken by an MCP session, by fingerprint.
        self._spares: dict[str, SessionInfo] = {}
        #: When each fingerprint was last accepted by the guardian.
        self._verified_at: dict[str, float] = {}
        self._verifying: dict[str, asyncio.Task[bool]] = {}
        self._closed = False
        self._metrics = client.metrics
        self._metrics.count_sessions_with(self._sessions_held)

    async def run(self, scope: str | None, token: str, call: Callable[[str], Awaitable[_T]]) -> _T:
        """Run ``call(session_id)`` on the session of (scope, token), opening or re-opening it as needed.

        Raises:
            Unauthenticated: the token was refused (message ``TOKEN_REJECTED_MESSAGE``), or the
                session was refused again right after it was re-opened.
            GuardianError: whatever ``call`` raised otherwise.
        """
        fingerprint = token_fingerprint(token)
        entry = self._entry(scope, fingerprint)
        session_id = await self._ensure(entry, token, fingerprint, stale=None)
        try:
            return await call(session_id)
        except Unauthenticated:
            # The session is unknown or expired (e.g. the guardian restarted): nothing was done.
            _log.info("guardian session expired; re-opening", extra={"agent_fp": fingerprint[:12]})
            session_id = await self._ensure(entry, token, fingerprint, stale=session_id)
            return await call(session_id)

    async def open(self, scope: str | None, token: str) -> SessionInfo:
        """Open (or reuse) the session of (scope, token) now, e.g. to learn its limits at start."""
        fingerprint = token_fingerprint(token)
        entry = self._entry(scope, fingerprint)
        await self._ensure(entry, token, fingerprint, stale=None)
        assert entry.info is not None  # set by _ensure
        return entry.info

    async def verify(self, token: str) -> bool:
        """Whether the guardian accepts ``token`` (cached for a minute).

        A session opened to check the token is kept as a spare for the first MCP
        session with that token, so no session is wasted. Concurrent checks of one
        token share a single OpenSession, which a caller hanging up does not cancel.

        Raises:
            Unavailable: the guardian could not be asked.
            GuardianError: another failure of OpenSession (e.g. ``RateLimited``).
        """
        fingerprint = token_fingerprint(token)
        if self._recently_verified(fingerprint):
            return True
        task = self._verifying.get(fingerprint)
        if task is None:
            task = asyncio.create_task(self._open_spare(token, fingerprint))
            self._verifying[fingerprint] = task
            task.add_done_callback(lambda done: self._verify_done(fingerprint, done))
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        """Close every guardian session the broker holds (best effort, bounded in time)."""
        self._closed = True
        for task in list(self._verifying.values()):
            task.cancel()
        sessions = [e.info for e in self._entries.values() if e.info is not None]
        sessions.extend(self._spares.values())
        self._entries.clear()
        self._spares.clear()
        failed = await self._close_quietly(sessions)
        if sessions:
            _log.info("closed guardian sessions", extra={"closed": len(sessions) - failed, "failed": failed})

    # -- internals -------------------------------------------------------------

    def _sessions_held(self) -> int:
        """How many guardian sessions the broker holds; called from the scraping thread.

        ``tuple()`` copies each dict in one step under the GIL, so a concurrent change
        on the event loop cannot break the iteration; the count may be a moment old.
        """
        entries = tuple(self._entries.values())
        return sum(entry.info is not None for entry in entries) + len(self._spares)

    def _recently_verified(self, fingerprint: str) -> bool:
        if fingerprint in self._spares:
            return True
        if any(fp == fingerprint and e.info is not None for (_, fp), e in self._entries.items()):
            return True
        verified_at = self._verified_at.get(fingerprint)
        return verified_at is not None and self._clock() - verified_at < self._verify_ttl_s

    def _entry(self, scope: str | None, fingerprint: str) -> _Entry:
        key = (scope, fingerprint)
        entry = self._entries.get(key)
        if entry is None:
            if self._closed:
                raise Unavailable("the gateway is shutting down; retry in a few seconds")
            self._forget_idle()
            entry = self._entries[key] = _Entry()
        entry.last_used = self._clock()
        return entry

    def _forget_idle(self) -> None:
        """Drop scoped entries whose guardian session has idled out, then the oldest beyond the bound."""
        now = self._clock()
        for key, entry in list(self._entries.items()):
            idle_s = (entry.info.idle_timeout_ms / 1000) if entry.info is not None else 600.0
            if key[0] is not None and not entry.lock.locked() and now - entry.last_used > idle_s:
                del self._entries[key]
        for key, _ in sorted(self._entries.items(), key=lambda item: item[1].last_used)[
            : max(len(self._entries) - self._max_entries + 1, 0)
        ]:
            # Not closed here: the guardian ends an unused session after its idle timeout.
            del self._entries[key]
        for fingerprint, at in list(self._verified_at.items()):
            if now - at >= self._verify_ttl_s:
                del self._verified_at[fingerprint]

    async def _ensure(self, entry: _Entry, token: str, fingerprint: str, *, stale: str | None) -> str:
        """The entry's session id, opening one if it has none or still has the ``stale`` one."""
        async with entry.lock:
            if entry.info is None:
                entry.info = self._spares.pop(fingerprint, None) or await self._open(token, fingerprint)
            elif entry.info.session_id == stale:
                entry.info = await self._open(token, fingerprint)
                self._metrics.guardian_reconnect()
            return entry.info.session_id

    async def _open(self, token: str, fingerprint: str) -> SessionInfo:
        try:
            info = await self._client.open_session(token)
        except Unauthenticated:
            # Revoked or wrong: nothing may vouch for this token any more (the HTTP gate asks again).
            self._verified_at.pop(fingerprint, None)
            self._spares.pop(fingerprint, None)
            for (_, fp), entry in self._entries.items():
                if fp == fingerprint:
                    entry.info = None
            _log.warning("agent token refused by the guardian", extra={"agent_fp": fingerprint[:12]})
            raise Unauthenticated(TOKEN_REJECTED_MESSAGE) from None
        self._verified_at[fingerprint] = self._clock()
        _log.info("guardian session opened", extra={"agent": info.agent, "agent_fp": fingerprint[:12]})
        return info

    async def _open_spare(self, token: str, fingerprint: str) -> bool:
        try:
            info = await self._open(token, fingerprint)
        except Unauthenticated:
            return False
        if self._closed or fingerprint in self._spares:
            await self._close_quietly([info])
        else:
            self._spares[fingerprint] = info
        return True

    def _verify_done(self, fingerprint: str, task: asyncio.Task[bool]) -> None:
        self._verifying.pop(fingerprint, None)
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter re-raises it, nobody else must log it

    async def _close_quietly(self, sessions: list[SessionInfo]) -> int:
        """Close sessions best effort within a short deadline; the number that failed."""
        if not sessions:
            return 0
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(self._client.close_session(s.session_id) for s in sessions), return_exceptions=True),
                timeout=_CLOSE_DEADLINE_S,
            )
        except TimeoutError:
            return len(sessions)
        return sum(isinstance(r, BaseException) for r in results)
