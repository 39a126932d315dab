"""Running N concurrent clients against one operation and timing every call.

Each client is an async callable; :func:`measure` runs one loop per client,
each issuing its next call as soon as the previous one returns (closed loop,
no think time), first for a short warm-up that is not recorded, then until the
budget is spent: a duration, or a total number of calls. Throughput is the
calls completed divided by the wall time from the first timed call to the
last answer; latency percentiles are over every timed call (nearest rank).

A call that raises counts as an error (its time is not in the latencies); the
first error's text is kept so the report can say what failed.
:func:`measure_sync` does the same for one synchronous caller (the SQLCipher floor).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["AsyncCall", "Budget", "Measurement", "Meter", "measure", "measure_sync"]

#: One client's next call.
AsyncCall = Callable[[], Awaitable[None]]


class Meter(Protocol):
    """Something started when the timed calls begin and stopped when they end (e.g. a CPU meter)."""

    def start(self) -> None:
        """The timed calls begin."""

    def stop(self) -> None:
        """The timed calls have ended."""


@dataclass(frozen=True)
class Budget:
    """How long to measure: ``ops`` calls in total when set, else ``duration_s`` seconds."""

    duration_s: float = 3.0
    ops: int | None = None
    warmup_s: float = 0.5
    warmup_ops: int | None = None

    def __post_init__(self) -> None:
        if self.ops is not None and self.ops < 1:
            raise ValueError("ops must be at least 1")
        if self.duration_s <= 0:
            raise ValueError("duration must be positive")


@dataclass(frozen=True)
class Measurement:
    """The outcome of one measured operation."""

    clients: int
    ops: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    first_error: str = ""

    @property
    def ops_per_s(self) -> float:
        """Completed calls per second (0 when none completed)."""
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The figures as a JSON-ready mapping."""
        return {
            "clients": self.clients,
            "ops": self.ops,
            "errors": self.errors,
            "seconds": round(self.seconds, 4),
            "ops_per_s": round(self.ops_per_s, 2),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "first_error": self.first_error,
        }


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


class _Tally:
    """Latencies of the calls that succeeded; the number of failures and the first one's text."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""

    def failed(self, error: BaseException) -> None:
        if not self.errors:
            self.first_error = f"{type(error).__name__}: {error}"[:300]
        self.errors += 1


def _summary(clients: int, tally: _Tally, seconds: float) -> Measurement:
    ordered = sorted(tally.latencies)
    return Measurement(
        clients=clients,
        ops=len(ordered),
        errors=tally.errors,
        seconds=seconds,
        p50_ms=_percentile(ordered, 0.50) * 1000,
        p99_ms=_percentile(ordered, 0.99) * 1000,
        mean_ms=(sum(ordered) / len(ordered) * 1000) if ordered else math.nan,
        max_ms=(ordered[-1] * 1000) if ordered else math.nan,
        first_error=tally.first_error,
    )


class _Ticket:
    """Hands out call numbers until the budget is spent (shared by one run's loops)."""

    def __init__(self, ops: int | None, deadline: float) -> None:
        self._left = ops
        self._deadline = deadline

    def take(self) -> bool:
        if self._left is not None:
            if self._left <= 0:
                return False
            self._left -= 1
            return True
        return time.perf_counter() < self._deadline


async def _run(calls: Sequence[AsyncCall], ops: int | None, seconds: float) -> tuple[_Tally, float]:
    tally = _Tally()
    started = time.perf_counter()
    ticket = _Ticket(ops, started + seconds)

    async def loop(call: AsyncCall) -> None:
        while ticket.take():
            begun = time.perf_counter()
            try:
                await call()
            except Exception as error:
                tally.failed(error)
                continue
            tally.latencies.append(time.perf_counter() - begun)

    await asyncio.gather(*(loop(call) for call in calls))
    return tally, time.perf_counter() - started


async def measure(calls: Sequence[AsyncCall], budget: Budget, meter: Meter | None = None) -> Measurement:
    """Warm up, then time the calls, one closed loop per client (meter runs around the timed part)."""
    if not calls:
        raise ValueError("no clients to measure")
    await _run(calls, budget.warmup_ops, budget.warmup_s)
    if meter is not None:
        meter.start()
    tally, seconds = await _run(calls, budget.ops, budget.duration_s)
    if meter is not None:
        meter.stop()
    return _summary(len(calls), tally, seconds)


def measure_sync(call: Callable[[], None], budget: Budget, meter: Meter | None = None) -> Measurement:
    """The same for one synchronous caller."""

    def run(ops: int | None, seconds: float) -> tuple[_Tally, float]:
        tally = _Tally()
        started = time.perf_counter()
        ticket = _Ticket(ops, started + seconds)
        while ticket.take():
            begun = time.perf_counter()
            try:
                call()
            except Exception as error:
                tally.failed(error)
                continue
            tally.latencies.append(time.perf_counter() - begun)
        return tally, time.perf_counter() - started

    run(budget.warmup_ops, budget.warmup_s)
    if meter is not None:
        meter.start()
    tally, seconds = run(budget.ops, budget.duration_s)
    if meter is not None:
        meter.stop()
    return _summary(1, tally, seconds)
