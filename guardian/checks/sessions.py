"""Agent sessions: issued by OpenSession, held only in the guardian's memory.

A session ends when unused for the policy's idle timeout, at its absolute
lifetime, when closed, or when its agent is revoked. A guardian restart ends
every session; the gateway re-opens one with the agent's token.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from shared.errors import Unauthenticated
from shared.formats import SESSION_ID_RE

__all__ = ["REMEMBER_ENDED_MS", "Session", "SessionTable"]


@dataclass
class Session:
    """One open session. Mutable only under the table's lock."""

    id: str
    agent: str
    created_at_ms: int
    expires_at_ms: int
    idle_timeout_ms: int
    last_used_ms: int
    #: The operations an OAuth access token's scopes grant (guardian/access/oauth.py); None: an agent token's
    #: session, which may do what the agent's profile grants.
    operations: frozenset[str] | None = None


#: How long a session that expired is remembered: its caller is told it expired, not that it is unknown (a
#: sweep that forgot it at once made the answer depend on whether the housekeeping tick came in between).
REMEMBER_ENDED_MS: Final = 60_000


class SessionTable:
    """The open sessions, safe to use from many threads."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(
        self,
        agent: str,
        now_ms: int,
        idle_timeout_ms: int,
        max_lifetime_ms: int,
        *,
        until_ms: int | None = None,
        operations: frozenset[str] | None = None,
    ) -> Session:
        """A new session for agent (ending at until_ms at the latest, limited to operations when given)."""
        expires_at_ms = now_ms + max_lifetime_ms
        session = Session(
            id="ses_" + secrets.token_urlsafe(24),
            agent=agent,
            created_at_ms=now_ms,
            expires_at_ms=expires_at_ms if until_ms is None else min(expires_at_ms, until_ms),
            idle_timeout_ms=idle_timeout_ms,
            last_used_ms=now_ms,
            operations=operations,
        )
        with self._lock:
            self._sessions[session.id] = session
        return session

    def resolve(self, session_id: str, now_ms: int) -> Session:
        """The live session with this id, touched; Unauthenticated if none."""
        if not session_id:
            raise Unauthenticated("no session: open one with an agent token first")
        if SESSION_ID_RE.fullmatch(session_id) is None:
            raise Unauthenticated("unknown session: open a new one with the agent token")
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                raise Unauthenticated("unknown session: open a new one with the agent token")
            if not _live(session, now_ms):
                del self._sessions[session_id]
                raise Unauthenticated("the session expired: open a new one with the agent token")
            session.last_used_ms = now_ms
            return session

    def close(self, session_id: str) -> bool:
        """End a session; whether it existed."""
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def end_agent(self, agent: str) -> int:
        """End every session of agent; how many ended."""
        with self._lock:
            ended = [sid for sid, session in self._sessions.items() if session.agent == agent]
            for sid in ended:
                del self._sessions[sid]
        return len(ended)

    def live(self, now_ms: int, agent: str = "") -> list[Session]:
        """Copies of the live sessions (of agent, if given), oldest first."""
        with self._lock:
            found = [
                Session(**vars(s))
                for s in self._sessions.values()
                if _live(s, now_ms) and (not agent or s.agent == agent)
            ]
        return sorted(found, key=lambda session: session.created_at_ms)

    def end_matching(self, ref: str, ref_of: Callable[[str], str], now_ms: int) -> Session | None:
        """End the live session whose reference (ref_of its id) is ref; the session, or None if none matched."""
        with self._lock:
            for session_id, session in self._sessions.items():
                if ref_of(session_id) == ref and _live(session, now_ms):
                    del self._sessions[session_id]
                    return session
        return None

    def count(self, agent: str, now_ms: int) -> int:
        """How many live sessions agent has."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.agent == agent and _live(s, now_ms))

    def count_all(self, now_ms: int) -> int:
        """How many live sessions there are."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if _live(s, now_ms))

    def next_expiry_ms(self, agent: str, now_ms: int) -> int:
        """Milliseconds until the first of agent's live sessions ends if left unused (at least 1)."""
        with self._lock:
            ends = [
                min(s.expires_at_ms, s.last_used_ms + s.idle_timeout_ms)
                for s in self._sessions.values()
                if s.agent == agent and _live(s, now_ms)
            ]
        return max(1, min(ends, default=now_ms + 1) - now_ms)

    def sweep(self, now_ms: int) -> int:
        """Forget the sessions that ended over :data:`REMEMBER_ENDED_MS` ago; how many."""
        with self._lock:
            expired = [sid for sid, s in self._sessions.items() if not _live(s, now_ms - REMEMBER_ENDED_MS)]
            for sid in expired:
                del self._sessions[sid]
        return len(expired)


def _live(session: Session, now_ms: int) -> bool:
    return now_ms < session.expires_at_ms and now_ms - session.last_used_ms < session.idle_timeout_ms
