"""The guardian's Prometheus metrics, served on ``/metrics`` (shared/ops_http.py).

Labels come only from bounded sets the guardian defines (operation names,
decisions, error kinds, rate buckets, filter rule ids, anomaly kinds), never
from agent input, agent names, content, tokens or keys. Gauges that describe
state (sessions, database size, chain length, policy version) are read when
scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.ops_http import new_registry

__all__ = ["GuardianMetrics", "StateReading"]

_LATENCY_BUCKETS_S: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class StateReading:
    """What the state gauges show at one scrape."""

    sessions_open: int
    database_size_bytes: int
    audit_chain_rows: int
    policy_version: str
    #: Whether the policy file on disk is refused (the guardian runs on the last policy in force).
    policy_file_refused: bool = False


class _StateCollector(Collector):
    """Reads the state gauges at scrape time."""

    def __init__(self, read: Callable[[], StateReading]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        """One family per gauge."""
        state = self._read()
        yield GaugeMetricFamily("guardian_sessions_open", "Agent sessions open now.", value=state.sessions_open)
        yield GaugeMetricFamily(
            "guardian_database_size_bytes",
            "Size of the encrypted database and its write-ahead log.",
            value=state.database_size_bytes,
        )
        yield GaugeMetricFamily(
            "guardian_audit_chain_rows",
            "Rows in the audit chain (its head's sequence number).",
            value=state.audit_chain_rows,
        )
        yield InfoMetricFamily("guardian_policy", "The policy in force.", value={"version": state.policy_version})
        yield GaugeMetricFamily(
            "guardian_policy_file_refused",
            "1 while the policy file on disk is refused and the last policy in force runs instead.",
            value=int(state.policy_file_refused),
        )


class GuardianMetrics:
    """Every metric the guardian exports, on its own registry."""

    def __init__(self) -> None:
        self.registry: CollectorRegistry = new_registry()
        self.requests = Counter(
            "guardian_requests_total",
            "Requests served, by audited operation and decision (allow, deny, error).",
            ("operation", "decision"),
            registry=self.registry,
        )
        self.denials = Counter(
            "guardian_denials_total",
            "Requests refused, by the kind of error the caller got.",
            ("reason",),
            registry=self.registry,
        )
        self.latency = Histogram(
            "guardian_request_duration_seconds",
            "Time from a request's arrival to its answer, by operation.",
            ("operation",),
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "guardian_rate_limit_hits_total",
            "Requests refused by a rate limit, cooldown or session cap, by bucket (read, write, open).",
            ("bucket",),
            registry=self.registry,
        )
        self.filter_hits = Counter(
            "guardian_filter_hits_total",
            "Content filter matches, by rule and action (reject, redact, quarantine, flag).",
            ("rule", "action"),
            registry=self.registry,
        )
        self.anomalies = Counter(
            "guardian_anomaly_events_total",
            "Anomaly detector events, by kind and the response the policy chose.",
            ("kind", "response"),
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "guardian_audit_write_failures_total",
            "Audit rows that could not be written (the request failed closed).",
            registry=self.registry,
        )

    def watch_state(self, read: Callable[[], StateReading]) -> None:
        """Register the scrape-time state gauges."""
        self.registry.register(_StateCollector(read))
