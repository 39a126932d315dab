"""Where the guardian's CPU goes: each request's thread CPU time, split by pipeline stage.

Off unless the config's ``tracing.profile_stages`` is true (``make profile`` turns it on):
a stage costs two reads of the thread's CPU clock, a few microseconds a request in all.
When on, ``/metrics`` carries ``guardian_stage_cpu_seconds_total{operation,stage}`` and
``guardian_stage_requests_total{operation}``; bench/ divides their growth by the calls it
made, beside the process's CPU per call (what no stage covers is gRPC's own work:
framing, (de)serialising, its threads).

The stages, in the order a write meets them (guardian/service/pipeline.py):

===========  ==========================================================================
receive      the request's trace context, digest and unknown-field check
session      resolving the session (and an admin's signature)
shape        the rule's check: fields, sizes, counts
policy       the profile, the role, the two-person rule, the token buckets
filters      the content filters
embed        asking the embedder for the vectors
review       the review of writes that would change trusted memories
data         the handler's work in the write transaction (SQL, HMACs, index terms)
audit        the audit row, the idempotency record, what a read returned
commit       a group commit's own work (BEGIN, savepoints, the endings, COMMIT, the
             in-memory index after it): one sum for all operations
             (``guardian_group_commit_cpu_seconds_total``)
observe      the anomaly detectors, metrics, the request log line, the span
===========  ==========================================================================

Work that follows the writes in the background is reported under the operation
``background``: ``embed`` (the recall thread embedding what writes queued, and
writing their vectors).

Times are CPU time of the thread that did the work (CLOCK_THREAD_CPUTIME_ID), so waiting
for the writer or for another process costs nothing here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BACKGROUND", "STAGES", "StageClock", "StageProfile"]

#: The operation under which background work is reported.
BACKGROUND: Final = "background"

#: Every stage, in pipeline order.
STAGES: Final = (
    "receive",
    "session",
    "shape",
    "policy",
    "filters",
    "embed",
    "review",
    "data",
    "audit",
    "commit",
    "observe",
)


class StageClock:
    """One request's CPU time by stage; :meth:`mark` ends the stage that was running on this thread."""

    __slots__ = ("_last", "enabled", "spent")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._last = time.thread_time_ns() if enabled else 0
        #: Nanoseconds by stage.
        self.spent: dict[str, int] = {}

    def mark(self, stage: str) -> None:
        """Charge this thread's CPU since the last mark (or restart) to stage."""
        if self.enabled:
            now = time.thread_time_ns()
            self.spent[stage] = self.spent.get(stage, 0) + now - self._last
            self._last = now

    def restart(self) -> None:
        """Charge nothing for this thread's CPU until now (it was measured elsewhere, e.g. by the writer)."""
        if self.enabled:
            self._last = time.thread_time_ns()

    def add(self, stage: str, nanoseconds: int) -> None:
        """Charge nanoseconds measured on another thread to stage."""
        if self.enabled:
            self.spent[stage] = self.spent.get(stage, 0) + nanoseconds


class StageProfile(Collector):
    """The sums of every request's :class:`StageClock`, by operation; a Prometheus collector."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._spent: dict[tuple[str, str], int] = {}
        self._requests: dict[str, int] = {}
        #: Group commits' own CPU (nanoseconds), all operations.
        self._commit_ns = 0

    def clock(self) -> StageClock:
        """A clock for one request, running from now (a no-op one when profiling is off)."""
        return StageClock(self.enabled)

    def commit_done(self, nanoseconds: int) -> None:
        """A group commit took nanoseconds of its own work (its jobs' work is charged to their requests)."""
        if self.enabled:
            with self._lock:
                self._commit_ns += nanoseconds

    def background(self, stage: str, nanoseconds: int) -> None:
        """Work done for the requests in the background (not by any one request): under operation "background"."""
        if self.enabled:
            with self._lock:
                key = (BACKGROUND, stage)
                self._spent[key] = self._spent.get(key, 0) + nanoseconds

    def record(self, operation: str, clock: StageClock) -> None:
        """Add one finished request's clock under operation."""
        if not self.enabled:
            return
        with self._lock:
            for stage, spent in clock.spent.items():
                key = (operation, stage)
                self._spent[key] = self._spent.get(key, 0) + spent
            self._requests[operation] = self._requests.get(operation, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """The sums, when profiling is on."""
        if not self.enabled:
            return
        with self._lock:
            spent, requests, commit_ns = dict(self._spent), dict(self._requests), self._commit_ns
        stages = CounterMetricFamily(
            "guardian_stage_cpu_seconds",
            "Thread CPU time spent in each pipeline stage, by operation (tracing.profile_stages).",
            labels=["operation", "stage"],
        )
        for (operation, stage), nanoseconds in sorted(spent.items()):
            stages.add_metric([operation, stage], nanoseconds / 1e9)
        yield stages
        counted = CounterMetricFamily(
            "guardian_stage_requests", "Requests whose stages were timed, by operation.", labels=["operation"]
        )
        for operation, count in sorted(requests.items()):
            counted.add_metric([operation], count)
        yield counted
        yield CounterMetricFamily(
            "guardian_group_commit_cpu_seconds",
            "CPU time of group commits' own work (BEGIN, savepoints, endings, COMMIT), all operations.",
            value=commit_ns / 1e9,
        )
