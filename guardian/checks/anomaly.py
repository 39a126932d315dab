"""Anomaly detection: sliding-window counters per agent, and the locks they impose.

The pipeline's last stage reports what each request amounted to, and the
session stage of the next request asks whether the caller is locked:

* ``burst``: every request (the pipeline records one per request);
* ``denials``: a request refused for any reason but a failed authentication;
* ``filter_hits``: a content filter matched;
* ``unknown_ids``: a lookup answered NOT_FOUND (id enumeration);
* ``outside_hours``: a request refused for being outside the allowed hours.

The policy's :class:`AnomalySpec` holds at most one :class:`DetectorSpec` per
kind: ``threshold`` events within ``window_ms`` fire it, and its ``response``
is to log only, to lock the session, or to lock the agent for ``lock_ms``.
A kind without a detector is not counted at all.

Windows
    Per (kind, agent) a deque of event times (ms), pruned to the window on
    every event and never longer than the threshold, so a check is O(threshold)
    at worst and memory per agent is bounded by the policy. The windows are
    per *agent*, so spreading events over many sessions does not hide them.
    An event at ``t`` is within the window of an event at ``now`` when
    ``now - t < window_ms``. When a detector fires its window is cleared: it
    fires again only after ``threshold`` more events, not on every one.

Locks
    A lock is an expiry time (ms) on an agent name or on an opaque session key.
    :meth:`AnomalyMonitor.check_locked` refuses a locked agent or session with
    :class:`~shared.errors.PermissionDenied`. ``lock_session`` for an event
    that has no session (``session_key=None``, e.g. OpenSession) locks the
    agent instead: there is nothing narrower to lock. A lock that is already
    running is extended, never shortened. ``unlock_agent`` (the security team)
    clears the agent's lock, its sessions' locks and its windows.

Every detection writes one security-log line (``event="anomaly"``) and is
passed to the optional alert callback (see :mod:`guardian.checks.alerts`); a failing
callback is logged and never breaks the request path.

Memory bound
    Windows and session locks together are capped at ``max_keys`` entries;
    :meth:`AnomalyMonitor.sweep`, called periodically by the daemon, drops
    windows with no event left in them and expired locks. When the table is
    full, an event that needs a new window is not counted (logged once per
    spell), and a session lock that needs a new entry becomes a lock on the
    agent: detection may be lost, but a lock never is (agent locks are keyed
    by agent names, which already hold a window, so they add at most one
    entry per agent). :meth:`record` never raises for a full table: the
    pipeline calls it after the outcome is decided.

Across restarts
    Every agent whose lock or windows changed is named by :meth:`AnomalyMonitor.take_changed`;
    the guardian keeps its state (:meth:`AnomalyMonitor.export_agent`) in the
    database (a lock the moment it is set, in the transaction of its audit row;
    windows in the next request's transaction: guardian/state/limits.py) and puts it
    back at start, so a lock set before a ``kill -9`` is still in force after it.
    Times are Unix ms, so nothing needs converting. Session locks are not kept:
    sessions do not survive a restart.

Session keys are bearer credentials: they are used only as dictionary keys,
never logged or returned; log lines carry the ``session_ref`` digest the
caller passes.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, get_args

from shared.errors import PermissionDenied

__all__ = [
    "ANOMALY_KINDS",
    "ANOMALY_RESPONSES",
    "AgentAnomalies",
    "AnomalyEvent",
    "AnomalyKind",
    "AnomalyMonitor",
    "AnomalyResponse",
    "AnomalySpec",
    "DetectorSpec",
]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

#: What a detector counts.
AnomalyKind = Literal["denials", "filter_hits", "burst", "unknown_ids", "outside_hours"]
#: Every detector kind, for the policy parser.
ANOMALY_KINDS: Final[frozenset[str]] = frozenset(get_args(AnomalyKind))

#: What a detector does when it fires (it always logs).
AnomalyResponse = Literal["log", "lock_session", "lock_agent"]
#: Every response, for the policy parser.
ANOMALY_RESPONSES: Final[frozenset[str]] = frozenset(get_args(AnomalyResponse))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class DetectorSpec:
    """One detector: ``threshold`` events of ``kind`` within ``window_ms`` trigger ``response``."""

    kind: AnomalyKind
    #: Events within the window that trigger the detector; at least 1.
    threshold: int
    #: The window's length in ms; at least 1.
    window_ms: int
    response: AnomalyResponse
    #: How long a lock lasts, in ms: at least 1 for a lock, ignored for "log".
    lock_ms: int

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"DetectorSpec.kind must be one of {', '.join(sorted(ANOMALY_KINDS))}, got {self.kind!r}")
        if self.response not in ANOMALY_RESPONSES:
            known = ", ".join(sorted(ANOMALY_RESPONSES))
            raise ValueError(f"DetectorSpec.response must be one of {known}, got {self.response!r}")
        if not _positive_int(self.threshold):
            raise ValueError(f"DetectorSpec.threshold must be an integer >= 1, got {self.threshold!r}")
        if not _positive_int(self.window_ms):
            raise ValueError(f"DetectorSpec.window_ms must be an integer >= 1, got {self.window_ms!r}")
        if self.response != "log" and not _positive_int(self.lock_ms):
            raise ValueError(f"DetectorSpec.lock_ms must be an integer >= 1 for a lock, got {self.lock_ms!r}")
        if isinstance(self.lock_ms, bool) or not isinstance(self.lock_ms, int) or self.lock_ms < 0:
            raise ValueError(f"DetectorSpec.lock_ms must be an integer >= 0, got {self.lock_ms!r}")


@dataclass(frozen=True)
class AnomalySpec:
    """A profile's detectors, at most one per kind."""

    detectors: tuple[DetectorSpec, ...]

    def __post_init__(self) -> None:
        kinds = [detector.kind for detector in self.detectors]
        duplicates = sorted({kind for kind in kinds if kinds.count(kind) > 1})
        if duplicates:
            raise ValueError(f"AnomalySpec has more than one detector for: {', '.join(duplicates)}")

    def detector(self, kind: AnomalyKind) -> DetectorSpec | None:
        """The detector for kind, or None if the policy does not watch it."""
        return next((detector for detector in self.detectors if detector.kind == kind), None)


@dataclass(frozen=True)
class AnomalyEvent:
    """A detector that fired, and what was done about it."""

    kind: AnomalyKind
    agent: str
    #: The session's digest (never its id); "" when the event had no session.
    session_ref: str
    #: Events counted within the window when it fired.
    count: int
    window_ms: int
    #: The response applied: "lock_agent" where a lock_session had no session to lock.
    response: AnomalyResponse
    #: When the lock ends (Unix ms); 0 for "log".
    locked_until_ms: int


@dataclass(frozen=True)
class AgentAnomalies:
    """An agent's lock and recent events as kept across restarts (Unix ms)."""

    locked_until_ms: int
    #: Kind -> (window, the event times in it).
    windows: dict[str, tuple[int, list[int]]]


@dataclass
class _Window:
    """The recent event times of one (kind, agent). Mutable only under the monitor's lock."""

    events: deque[int]
    window_ms: int


@dataclass(frozen=True)
class _SessionLock:
    agent: str
    until_ms: int


def _seconds_left(until_ms: int, now_ms: int) -> int:
    return max(1, math.ceil((until_ms - now_ms) / 1000))


class AnomalyMonitor:
    """Sliding-window detectors and the locks they impose; safe to use from many threads."""

    def __init__(self, alert: Callable[[AnomalyEvent], None] | None = None, max_keys: int = 100_000) -> None:
        """A monitor calling alert (if given) for every detection, holding at most max_keys windows and locks."""
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._alert = alert
        self._max_keys = max_keys
        self._windows: dict[tuple[AnomalyKind, str], _Window] = {}
        self._agent_locks: dict[str, int] = {}
        self._session_locks: dict[str, _SessionLock] = {}
        self._lock = threading.Lock()
        self._full_logged = False
        #: Agents whose lock or windows changed since take_changed last ran.
        self._changed: set[str] = set()

    def record(
        self,
        kind: AnomalyKind,
        *,
        agent: str,
        session_key: str | None,
        session_ref: str,
        now_ms: int,
        spec: AnomalySpec,
    ) -> AnomalyEvent | None:
        """Count one event; when a detector's threshold is reached within its window, apply its response.

        A detection writes a security-log line (``event="anomaly"`` with kind, agent,
        session_ref, count, window_ms, response, locked_until_ms), calls the alert
        callback if any, and is returned; otherwise None.
        """
        detector = spec.detector(kind)
        if detector is None:
            return None
        log_full = False
        event: AnomalyEvent | None = None
        with self._lock:
            self._changed.add(agent)
            key = (kind, agent)
            window = self._windows.get(key)
            if window is None and self._entries() >= self._max_keys:
                log_full, self._full_logged = not self._full_logged, True
            else:
                if window is None:
                    window = self._windows[key] = _Window(deque(maxlen=detector.threshold), detector.window_ms)
                elif window.events.maxlen != detector.threshold:  # the policy changed
                    window.events = deque(window.events, maxlen=detector.threshold)
                window.window_ms = detector.window_ms
                events = window.events
                horizon = now_ms - detector.window_ms
                while events and events[0] <= horizon:
                    events.popleft()
                events.append(now_ms)
                if len(events) >= detector.threshold:
                    count = len(events)
                    events.clear()
                    response, until_ms = self._respond(detector, agent, session_key, now_ms)
                    event = AnomalyEvent(kind, agent, session_ref, count, detector.window_ms, response, until_ms)
        if log_full:
            security_log.warning(
                "anomaly monitor table full; events of new agents are not counted until a sweep frees room",
                extra={"event": "anomaly_table_full", "max_keys": self._max_keys},
            )
        if event is not None:
            self._report(event)
        return event

    def check_locked(self, *, agent: str, session_key: str | None, now_ms: int) -> None:
        """Raise PermissionDenied if the agent or this session is locked by a detector."""
        with self._lock:
            agent_until = self._agent_locks.get(agent, 0)
            session_lock = self._session_locks.get(session_key) if session_key is not None else None
        if agent_until > now_ms:
            scope, until_ms = "agent", agent_until
        elif session_lock is not None and session_lock.until_ms > now_ms:
            scope, until_ms = "session", session_lock.until_ms
        else:
            return
        raise PermissionDenied(
            f"this {scope} is locked by the anomaly detector for another {_seconds_left(until_ms, now_ms)} s; "
            f"the security team can unlock it (guardianctl agents unlock {agent})"
        )

    def unlock_agent(self, agent: str) -> bool:
        """Clear the agent's lock, its sessions' locks and its windows; whether any lock was held.

        A lock that had expired but was not yet swept counts as held.
        """
        with self._lock:
            self._changed.add(agent)
            held = self._agent_locks.pop(agent, None) is not None
            sessions = [key for key, lock in self._session_locks.items() if lock.agent == agent]
            for key in sessions:
                del self._session_locks[key]
            for kind in get_args(AnomalyKind):
                self._windows.pop((kind, agent), None)
        if held or sessions:
            security_log.info(
                "anomaly lock cleared",
                extra={"event": "anomaly_unlock", "agent": agent, "agent_locked": held, "sessions": len(sessions)},
            )
        return held or bool(sessions)

    def take_changed(self) -> set[str]:
        """The agents whose lock or windows changed since the last call (and forget them)."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return changed

    def export_agent(self, agent: str) -> AgentAnomalies:
        """One agent's lock and windows (kept the moment a lock is set)."""
        with self._lock:
            return self._export(agent)

    def restore_agents(self, kept: dict[str, AgentAnomalies]) -> None:
        """Put back what :meth:`export_agent` kept; a lock never ends earlier than it would have."""
        known = set(get_args(AnomalyKind))
        with self._lock:
            for agent, anomalies in kept.items():
                if anomalies.locked_until_ms:
                    self._agent_locks[agent] = max(self._agent_locks.get(agent, 0), anomalies.locked_until_ms)
                for kind, (window_ms, events) in anomalies.windows.items():
                    if kind in known and events:
                        restored = deque(sorted(events), maxlen=max(1, len(events)))
                        self._windows[(kind, agent)] = _Window(restored, window_ms)  # type: ignore[index]

    def locks(self, now_ms: int) -> list[tuple[str, str, int]]:
        """The locks in force, as (scope "agent" or "session", agent name, until_ms); never a session id."""
        with self._lock:
            found = [("agent", agent, until) for agent, until in self._agent_locks.items() if until > now_ms]
            found += [("session", lock.agent, lock.until_ms) for lock in self._session_locks.values()]
        return sorted(entry for entry in found if entry[2] > now_ms)

    def forget_session(self, session_key: str) -> None:
        """Drop a closed session's lock (a lock on a session that no longer exists protects nothing)."""
        with self._lock:
            self._session_locks.pop(session_key, None)

    def sweep(self, now_ms: int) -> int:
        """Drop expired locks and windows with no event left in them; how many entries were dropped."""
        with self._lock:
            agents = [agent for agent, until in self._agent_locks.items() if until <= now_ms]
            for agent in agents:
                del self._agent_locks[agent]
            sessions = [key for key, lock in self._session_locks.items() if lock.until_ms <= now_ms]
            for key in sessions:
                del self._session_locks[key]
            windows = [
                key
                for key, window in self._windows.items()
                if not window.events or window.events[-1] <= now_ms - window.window_ms
            ]
            for window_key in windows:
                del self._windows[window_key]
            if self._entries() < self._max_keys:
                self._full_logged = False
            return len(agents) + len(sessions) + len(windows)

    # -- internals --------------------------------------------------------------------------------

    def _export(self, agent: str) -> AgentAnomalies:
        return AgentAnomalies(
            locked_until_ms=self._agent_locks.get(agent, 0),
            windows={
                kind: (window.window_ms, list(window.events))
                for (kind, owner), window in self._windows.items()
                if owner == agent and window.events
            },
        )

    def _entries(self) -> int:
        return len(self._windows) + len(self._session_locks)

    def _respond(
        self, detector: DetectorSpec, agent: str, session_key: str | None, now_ms: int
    ) -> tuple[AnomalyResponse, int]:
        """Apply detector's response (under the lock): the response applied and the lock's end (0 for none)."""
        if detector.response == "log":
            return "log", 0
        until_ms = now_ms + detector.lock_ms
        if detector.response == "lock_session" and session_key is not None:
            existing = self._session_locks.get(session_key)
            if existing is not None or self._entries() < self._max_keys:
                until_ms = max(until_ms, existing.until_ms if existing is not None else 0)
                self._session_locks[session_key] = _SessionLock(agent, until_ms)
                return "lock_session", until_ms
        # lock_agent, or lock_session with no session (or no room for one): lock the agent.
        until_ms = max(until_ms, self._agent_locks.get(agent, 0))
        self._agent_locks[agent] = until_ms
        return "lock_agent", until_ms

    def _report(self, event: AnomalyEvent) -> None:
        security_log.warning(
            "anomaly detected",
            extra={
                "event": "anomaly",
                "kind": event.kind,
                "agent": event.agent,
                "session_ref": event.session_ref,
                "count": event.count,
                "window_ms": event.window_ms,
                "response": event.response,
                "locked_until_ms": event.locked_until_ms,
            },
        )
        if self._alert is None:
            return
        try:
            self._alert(event)
        except Exception:
            log.exception("the anomaly alert callback failed")
