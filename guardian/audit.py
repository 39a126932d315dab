"""The audit trail: one row for every request, allowed or denied.

Rows hold who, what, which object, the decision, the reason and the policy
version: never memory content, tokens or keys. A row is appended inside the
transaction of the change it records, so no change exists without its row;
if the row cannot be written the request fails (fail closed). The table
refuses UPDATE and DELETE (triggers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from guardian.database import Connection

__all__ = ["AuditRecord", "append"]

Decision = Literal["allow", "deny", "error", "alert"]
_MAX_FIELD: Final = 200


@dataclass(frozen=True)
class AuditRecord:
    """What one request did."""

    ts_ms: int
    agent: str
    session: str
    operation: str
    object_id: str
    decision: Decision
    reason: str
    policy_version: str


def append(connection: Connection, record: AuditRecord) -> None:
    """Append record inside the caller's transaction."""
    connection.execute(
        "INSERT INTO audit (ts_ms, agent, session, operation, object_id, decision, reason, policy_version)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.ts_ms,
            record.agent[:_MAX_FIELD],
            record.session[:_MAX_FIELD],
            record.operation,
            record.object_id[: _MAX_FIELD * 10],
            record.decision,
            record.reason[:_MAX_FIELD],
            record.policy_version,
        ),
    )
