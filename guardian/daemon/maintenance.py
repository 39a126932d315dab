"""The guardian's housekeeping thread: audit chain heads, retention purges, forgetting idle state.

At the audit head interval it signs the chain's head with the audit-signing key
(the public chain's link up to it, stored in the database: what an exported trail
is verified against) and publishes the head (sequence and mac) to the security
log and the head file, so a truncated or rolled-back trail is detectable from
outside the database.

Every tick it forgets expired sessions, full rate-limit buckets, stale
anomaly windows (so memory stays bounded) and idempotency records past their
24 hours (housekeeping of the guardian's own records: no audit row), and, when the policy sets a
retention and its interval has passed, deletes memories older than the
retention in small batches. Each batch is one transaction with its audit row
(operation ``retention.purge``, the ids purged), so a purge is never silent
and never holds the writer for long.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from guardian.daemon.background import Background
from guardian.state.core import GuardianCore, now_ms
from guardian.store import idempotency
from shared.errors import Unavailable

__all__ = ["RETENTION_CALLER", "Maintenance"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

#: The audit trail's name for the retention purge.
RETENTION_CALLER: Final = "@retention"
_PURGE_BATCH: Final = 50  # ids of a batch fit the audit row's object_id


class Maintenance(Background):
    """Runs :meth:`tick` every interval on a daemon thread until stopped."""

    def __init__(self, core: GuardianCore, interval_s: float = 5.0, head_interval_s: float = 60.0) -> None:
        super().__init__("guardian-maintenance")
        self._core = core
        self._interval_s = min(interval_s, head_interval_s)
        self._head_interval_s = head_interval_s
        self._next_head = time.monotonic()
        self._last_purge_ms = 0

    def run(self) -> None:
        """Tick every interval until stopped."""
        while not self._stop.wait(self._interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("housekeeping failed; will retry on the next tick")

    def tick(self) -> None:
        """One round: sign and publish the audit chain head if due, forget idle state, purge expired memories if due."""
        if time.monotonic() >= self._next_head:
            self._next_head = time.monotonic() + self._head_interval_s
            self._core.publish_audit_head("interval")
        now = now_ms()
        self._core.sessions.sweep(now)
        self._core.rates.sweep()
        self._core.anomalies.sweep(now)
        try:
            self.forget_old_answers(now)
        except Unavailable as fault:  # e.g. a full disk: the records wait for the next tick
            log.warning("idempotency records not purged: %s", fault.message)
        retention = self._core.policy.retention
        if retention.max_age_ms is not None and now - self._last_purge_ms >= retention.purge_every_ms:
            self._last_purge_ms = now
            purged = self.purge_expired(now)
            if purged:
                security_log.info("retention purge", extra={"event": "retention_purge", "purged": purged})

    def forget_old_answers(self, now: int) -> int:
        """Delete idempotency records past their retention (a few at a time); how many."""
        with self._core.database.write() as connection:
            return idempotency.purge_older_than(connection, now - idempotency.RETENTION_MS, _PURGE_BATCH * 10)

    def purge_expired(self, now: int) -> int:
        """Delete memories older than the policy's retention, batch by batch; how many."""
        policy = self._core.policy
        if policy.retention.max_age_ms is None:
            return 0
        cutoff = now - policy.retention.max_age_ms
        total = 0
        while not self._stop.is_set():
            with self._core.database.write() as connection:
                ids = self._core.memories.purge_older_than(connection, cutoff, _PURGE_BATCH)
                if not ids:
                    return total
                self._core.audit.record(
                    connection,
                    ts_ms=now,
                    agent=RETENTION_CALLER,
                    operation="retention.purge",
                    object_id=",".join(ids),
                    decision="allow",
                    reason=f"ok: {len(ids)} memories older than the retention of {policy.retention.max_age_ms} ms",
                    policy_version=policy.version,
                )
            total += len(ids)
        return total
