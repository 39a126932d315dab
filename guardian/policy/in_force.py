"""The one place a policy is put in force: recorded in the history, then swapped in once that has committed.

A policy file loaded at start or on SIGHUP, a ``guardianctl policy apply`` and a
``rollback`` all go the same two steps: :meth:`PolicyInForce.record` adds the
history row inside the transaction that also writes the request's audit row, and
:meth:`PolicyInForce.swap` replaces the one reference every request reads, after
that transaction committed (a reader sees the old or the new policy, never a mix),
and says so in the security log.
"""

from __future__ import annotations

import logging
import threading

from guardian.policy import history
from guardian.policy.compile import Policy
from guardian.store.database import Connection

__all__ = ["PolicyInForce"]

security_log = logging.getLogger("agent_guardian.security")


class PolicyInForce:
    """The policy every request is decided by; swapped atomically."""

    def __init__(self, policy: Policy) -> None:
        """Start with policy (already recorded, or taken from the history)."""
        self._lock = threading.Lock()
        self._policy = policy

    @property
    def current(self) -> Policy:
        """The policy in force now."""
        return self._policy

    @staticmethod
    def record(connection: Connection, policy: Policy, *, at_ms: int, by: str, source: history.Source) -> None:
        """Add policy to the history, inside the caller's transaction (beside the audit row of the change)."""
        history.append(
            connection, version=policy.version, text=policy.text, applied_at_ms=at_ms, applied_by=by, source=source
        )

    def swap(self, policy: Policy, *, by: str, source: history.Source) -> Policy:
        """Put policy in force once its history row has committed; the policy it replaced."""
        with self._lock:
            previous, self._policy = self._policy, policy
        security_log.info(
            "policy in force",
            extra={
                "event": "policy_applied",
                "policy_version": policy.version,
                "previous_version": previous.version,
                "by": by,
                "source": source,
            },
        )
        return previous
