"""Rate limits: token buckets per session and per agent, and a cooldown after a breach.

The pipeline's rate stage calls :meth:`RateLimiter.check` once per request, after
the policy stage and before any content is looked at.

Buckets
    Every request takes ``cost`` tokens (one per memory in a batch) from two
    buckets at once: its session's bucket and its agent's bucket, one pair for
    reads and another for writes, so a reader cannot starve the agent's writes
    and vice versa. Opening a session takes a token from the agent's
    ``session_opens`` bucket only. Budgets are keyed by the agent's *name*, so
    an agent that opens new sessions gets new session buckets but never a
    fresh agent budget. The take is all or nothing: if either bucket is short,
    neither is charged.

Cooldown
    A breach (a bucket short of tokens) starts a cooldown on the key whose
    bucket ran dry: the agent if the agent's bucket did (also when both did),
    else the session. While it lasts every check for that key, of any kind, is
    refused, so hammering a limit does not pay off. The refusal's
    ``retry_after_ms`` is the cooldown left; a breach's own is the longer of the
    cooldown and the time the bucket needs to refill enough. A ``cooldown_ms``
    of 0 means no cooldown (the refusal then only waits for the refill).

Bookkeeping
    Buckets refill lazily: each stores its tokens and when it was last
    updated, and a check adds ``elapsed * refill_per_s`` (up to the capacity)
    before taking, so a check is O(1) whatever the number of keys. A bucket
    also stores the spec it was last used with: when the policy changes, the
    tokens it holds are clamped to the new capacity (a smaller burst applies at
    once; a larger one is earned by refilling, never granted for free).

Memory bound
    State is held per key (an agent name or an opaque session key), at most
    ``max_keys`` of them. :meth:`RateLimiter.sweep`, which the daemon calls
    periodically, drops keys that hold nothing worth remembering (every bucket
    full again, no cooldown running): such a key is indistinguishable from a new
    one. If the table is still full, a request that needs a new key is refused
    with :class:`~shared.errors.RateLimited` rather than let the table grow.

Across restarts
    Every agent whose buckets or cooldown changed is named by :meth:`RateLimiter.take_changed`;
    the guardian keeps those agents' state (:meth:`RateLimiter.export_agent`) in
    the database in the same transaction as the requests that changed it
    (guardian/state/limits.py), and puts it back at start
    (:meth:`RateLimiter.restore_agents`), refilled for the time it was down. Session
    buckets are not kept: sessions do not survive a restart.

Session keys are bearer credentials: they are used only as dictionary keys
here, never logged and never put into a message.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from shared.errors import RateLimited

__all__ = ["TABLE_FULL_RETRY_MS", "AgentRates", "BucketSpec", "RateKind", "RateLimiter", "RateSpec"]

security_log = logging.getLogger("agent_guardian.security")

#: What a request may be charged for: a read, a write, or opening a session.
RateKind = Literal["read", "write", "open"]

#: What a refusal because the key table is full asks the caller to wait (the daemon sweeps meanwhile).
TABLE_FULL_RETRY_MS: Final = 1_000

_Scope = Literal["agent", "session"]
_Key = tuple[_Scope, str]
_BucketName = Literal["reads", "writes", "opens"]

#: Tokens are floats refilled by multiplication; this absorbs rounding (a whole token is never lost to it).
_EPSILON: Final = 1e-9

_NOUNS: Final[dict[_BucketName, str]] = {"reads": "reads", "writes": "writes", "opens": "session opens"}


def _ms(seconds: float) -> int:
    """Seconds as whole milliseconds, rounded up (a caller that waits this long is never early)."""
    return max(0, math.ceil(round(seconds * 1000, 6)))


@dataclass(frozen=True)
class BucketSpec:
    """One token bucket's shape: how many tokens it holds and how fast it refills."""

    #: The burst: the most tokens the bucket holds (it starts full); at least 1.
    capacity: int
    #: Tokens added per second, up to the capacity; greater than 0.
    refill_per_s: float

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"BucketSpec.capacity must be an integer >= 1, got {self.capacity!r}")
        if (
            isinstance(self.refill_per_s, bool)
            or not isinstance(self.refill_per_s, int | float)
            or not math.isfinite(self.refill_per_s)
            or self.refill_per_s <= 0
        ):
            raise ValueError(f"BucketSpec.refill_per_s must be a finite number > 0, got {self.refill_per_s!r}")

    def ms_to_refill(self, tokens: float) -> int:
        """How long, in ms, this bucket takes to gain tokens."""
        return _ms(max(0.0, tokens) / self.refill_per_s)


@dataclass(frozen=True)
class RateSpec:
    """One profile's rate limits, as the policy parser builds them."""

    #: Reads (get, search, list) per session.
    session_reads: BucketSpec
    #: Writes (store, update, delete) per session.
    session_writes: BucketSpec
    #: Reads per agent, across all its sessions.
    agent_reads: BucketSpec
    #: Writes per agent, across all its sessions.
    agent_writes: BucketSpec
    #: Per agent: how fast it may open sessions.
    session_opens: BucketSpec
    #: After a breach the breaching session (or agent) is refused this long; 0 for no cooldown.
    cooldown_ms: int

    def __post_init__(self) -> None:
        if isinstance(self.cooldown_ms, bool) or not isinstance(self.cooldown_ms, int) or self.cooldown_ms < 0:
            raise ValueError(f"RateSpec.cooldown_ms must be an integer >= 0, got {self.cooldown_ms!r}")


@dataclass
class _Bucket:
    """A bucket's state. Mutable only under the limiter's lock."""

    spec: BucketSpec
    tokens: float
    updated: float

    def refill(self, now: float, spec: BucketSpec) -> None:
        """Bring the tokens up to now (at the old rate), then adopt spec, clamping to its capacity."""
        elapsed = now - self.updated
        if elapsed > 0:  # a clock that stepped back refills nothing
            self.tokens = min(float(self.spec.capacity), self.tokens + elapsed * self.spec.refill_per_s)
            self.updated = now
        if spec != self.spec:
            self.tokens = min(self.tokens, float(spec.capacity))
            self.spec = spec

    def full_at(self, now: float) -> bool:
        """Whether the bucket is (or will have refilled to) its capacity at now."""
        elapsed = max(0.0, now - self.updated)
        return self.tokens + elapsed * self.spec.refill_per_s + _EPSILON >= self.spec.capacity


@dataclass(frozen=True)
class AgentRates:
    """An agent's buckets and cooldown as kept across restarts (times in Unix ms)."""

    #: Bucket name -> (tokens, capacity, refill per second, when the tokens were counted).
    buckets: dict[str, tuple[float, int, float, int]]
    cooldown_until_ms: int


@dataclass
class _KeyState:
    """Everything remembered about one agent or one session."""

    #: The agent this key is (or whose session it is), so resetting an agent reaches its sessions.
    agent: str
    buckets: dict[_BucketName, _Bucket] = field(default_factory=dict)
    #: Monotonic seconds until which every check for this key is refused.
    cooldown_until: float = 0.0


class RateLimiter:
    """Token buckets per session and per agent, with cooldowns; safe to use from many threads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        """A limiter reading time (in seconds) from clock and holding state for at most max_keys keys."""
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self._clock = clock
        self._max_keys = max_keys
        self._keys: dict[_Key, _KeyState] = {}
        self._lock = threading.Lock()
        #: Agents whose buckets or cooldown changed since take_changed last ran.
        self._changed: set[str] = set()
        #: Whether the current spell of a full table was logged (logged once, until a sweep frees room).
        self._full_logged = False

    def check(self, *, agent: str, session_key: str | None, kind: RateKind, spec: RateSpec, cost: int = 1) -> None:
        """Take `cost` tokens from every bucket that applies, atomically (all or none), or raise RateLimited.

        kind ``read`` charges the session's and the agent's read buckets, ``write``
        their write buckets, ``open`` only the agent's ``session_opens`` bucket
        (pass ``session_key=None``). With ``session_key=None`` only agent buckets
        are charged. A cooldown on the agent or on the session refuses every kind.
        """
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"cost must be an integer >= 1, got {cost!r}")
        plan = self._plan(agent, session_key, kind, spec)
        breach: dict[str, object] | None = None
        full_table = False
        with self._lock:
            now = self._clock()
            self._refuse_if_cooling(agent, session_key, now)
            for _, _, bucket_spec in plan:
                if cost > bucket_spec.capacity:
                    raise RateLimited(
                        f"this batch of {cost} is larger than the burst allowance of {bucket_spec.capacity}; "
                        "send smaller batches",
                        spec.cooldown_ms,
                    )
            new_keys = {key for key, _, _ in plan if key not in self._keys}
            if len(self._keys) + len(new_keys) > self._max_keys:
                full_table, self._full_logged = not self._full_logged, True
                error: RateLimited | None = RateLimited(
                    "the guardian is tracking too many clients right now",
                    TABLE_FULL_RETRY_MS,
                )
            else:
                error, breach = self._take(agent, plan, spec, cost, now)
        if full_table:
            security_log.warning(
                "rate limiter table full; refusing new agents and sessions until a sweep frees room",
                extra={"event": "rate_table_full", "max_keys": self._max_keys},
            )
        if breach is not None:
            security_log.info("rate limit exceeded", extra={"event": "rate_limited", **breach})
        if error is not None:
            raise error

    def in_cooldown(self, agent: str, session_key: str | None) -> int:
        """Milliseconds of cooldown left for the agent or this session (the longer), 0 if none."""
        with self._lock:
            now = self._clock()
            left = self._cooldown_left(("agent", agent), now)
            if session_key is not None:
                left = max(left, self._cooldown_left(("session", session_key), now))
            return left

    def reset_agent(self, agent: str) -> None:
        """Clear the agent's buckets and cooldown, and those of its sessions (the security team's reset)."""
        with self._lock:
            self._changed.add(agent)
            self._keys.pop(("agent", agent), None)
            for key in [key for key, state in self._keys.items() if key[0] == "session" and state.agent == agent]:
                del self._keys[key]

    def forget_session(self, session_key: str) -> None:
        """Drop a closed session's buckets and cooldown."""
        with self._lock:
            self._keys.pop(("session", session_key), None)

    def sweep(self) -> int:
        """Drop keys with nothing worth remembering (buckets full, no cooldown running); how many were dropped."""
        with self._lock:
            now = self._clock()
            idle = [
                key
                for key, state in self._keys.items()
                if state.cooldown_until <= now and all(bucket.full_at(now) for bucket in state.buckets.values())
            ]
            for key in idle:
                del self._keys[key]
            if len(self._keys) < self._max_keys:
                self._full_logged = False
            return len(idle)

    def take_changed(self) -> set[str]:
        """The agents whose buckets or cooldown changed since the last call (and forget them)."""
        with self._lock:
            changed, self._changed = self._changed, set()
            return changed

    def export_agent(self, agent: str, wall_ms: int) -> AgentRates:
        """The agent's buckets and cooldown, with wall-clock times (wall_ms: now), to keep across a restart."""
        with self._lock:
            now = self._clock()
            state = self._keys.get(("agent", agent))
            if state is None:  # nothing held (never charged, swept, or reset): a fresh budget
                return AgentRates(buckets={}, cooldown_until_ms=0)
            return AgentRates(
                buckets={
                    name: (
                        bucket.tokens,
                        bucket.spec.capacity,
                        bucket.spec.refill_per_s,
                        wall_ms - _ms(now - bucket.updated),
                    )
                    for name, bucket in state.buckets.items()
                },
                cooldown_until_ms=wall_ms + _ms(state.cooldown_until - now) if state.cooldown_until > now else 0,
            )

    def restore_agents(self, kept: dict[str, AgentRates], wall_ms: int) -> None:
        """Put back what :meth:`export_agent` kept (wall_ms: now), refilled for the time since it was kept."""
        with self._lock:
            now = self._clock()
            for agent, rates in kept.items():
                state = self._keys.setdefault(("agent", agent), _KeyState(agent=agent))
                for name, (tokens, capacity, refill_per_s, counted_ms) in rates.buckets.items():
                    if name not in _NOUNS:
                        continue
                    counted = now - max(0, wall_ms - counted_ms) / 1000
                    spec = BucketSpec(capacity=capacity, refill_per_s=refill_per_s)
                    state.buckets[name] = _Bucket(spec, min(tokens, float(capacity)), counted)
                if rates.cooldown_until_ms > wall_ms:
                    state.cooldown_until = max(state.cooldown_until, now + (rates.cooldown_until_ms - wall_ms) / 1000)

    # -- under the lock ---------------------------------------------------------------------------

    @staticmethod
    def _plan(
        agent: str, session_key: str | None, kind: RateKind, spec: RateSpec
    ) -> list[tuple[_Key, _BucketName, BucketSpec]]:
        """The buckets a check charges: (key, bucket name, spec), the session's first."""
        if kind == "open":
            return [(("agent", agent), "opens", spec.session_opens)]
        if kind == "read":
            name: _BucketName = "reads"
            session_spec, agent_spec = spec.session_reads, spec.agent_reads
        elif kind == "write":
            name = "writes"
            session_spec, agent_spec = spec.session_writes, spec.agent_writes
        else:
            raise ValueError(f"unknown rate kind {kind!r}")
        plan: list[tuple[_Key, _BucketName, BucketSpec]] = []
        if session_key is not None:
            plan.append((("session", session_key), name, session_spec))
        plan.append((("agent", agent), name, agent_spec))
        return plan

    def _cooldown_left(self, key: _Key, now: float) -> int:
        state = self._keys.get(key)
        if state is None or state.cooldown_until <= now:
            return 0
        return max(1, _ms(state.cooldown_until - now))

    def _refuse_if_cooling(self, agent: str, session_key: str | None, now: float) -> None:
        agent_left = self._cooldown_left(("agent", agent), now)
        session_left = self._cooldown_left(("session", session_key), now) if session_key is not None else 0
        if agent_left == 0 and session_left == 0:
            return
        scope = "agent" if agent_left >= session_left else "session"
        left = max(agent_left, session_left)
        raise RateLimited(f"this {scope} is cooling down after exceeding its rate limit", left)

    def _take(
        self, agent: str, plan: list[tuple[_Key, _BucketName, BucketSpec]], spec: RateSpec, cost: int, now: float
    ) -> tuple[RateLimited | None, dict[str, object] | None]:
        """Charge every planned bucket, or none and start a cooldown: (error, log fields) on a breach."""
        charged: list[tuple[_Key, _BucketName, _Bucket]] = []
        self._changed.add(agent)
        for key, name, bucket_spec in plan:
            state = self._keys.get(key)
            if state is None:
                state = self._keys[key] = _KeyState(agent=agent)
            bucket = state.buckets.get(name)
            if bucket is None:
                bucket = state.buckets[name] = _Bucket(bucket_spec, float(bucket_spec.capacity), now)
            else:
                bucket.refill(now, bucket_spec)
            charged.append((key, name, bucket))
        short = [entry for entry in charged if entry[2].tokens + _EPSILON < cost]
        if not short:
            for _, _, bucket in charged:
                bucket.tokens = max(0.0, bucket.tokens - cost)
            return None, None
        # The agent's bucket decides when both ran dry: the agent is what must slow down.
        key, name, _ = next((entry for entry in short if entry[0][0] == "agent"), short[0])
        refill_ms = max(bucket.spec.ms_to_refill(cost - bucket.tokens) for _, _, bucket in short)
        retry_ms = max(1, spec.cooldown_ms, refill_ms)
        if spec.cooldown_ms > 0:
            state = self._keys[key]
            state.cooldown_until = max(state.cooldown_until, now + spec.cooldown_ms / 1000)
        error = RateLimited(f"too many {_NOUNS[name]} from this {key[0]}", retry_ms)
        return error, {"agent": agent, "scope": key[0], "bucket": name, "cooldown_ms": spec.cooldown_ms}
