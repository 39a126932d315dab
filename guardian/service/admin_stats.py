"""The admin Stats handler: the counts a security team looks at, from the audit trail, the memories and the keys.

Requests are counted from the audit trail (every request has its row) over a time
range, by agent, operation and decision, through the trail's time index; memories
by namespace and status; open incidents; and the age of each ring's primary key.
Counts only: no content, no ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from guardian.service.call import Call
from guardian.state.core import GuardianCore
from guardian.store.database import Connection
from shared.errors import InvalidArgument
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = ["StatsRange", "check_stats", "stats"]

_DAY_MS: Final = 24 * 3600 * 1000


@dataclass(frozen=True)
class StatsRange:
    """The time range of a Stats request, checked (Unix ms, until exclusive)."""

    since_ms: int
    until_ms: int


def check_stats(core: GuardianCore, call: Call, request: pb.StatsRequest) -> StatsRange:
    """A time range: since before until, neither negative; none given is the last 24 hours."""
    if request.since_ms < 0 or request.until_ms < 0:
        raise InvalidArgument("since_ms and until_ms are Unix milliseconds, not negative")
    until = request.until_ms or call.now_ms + 1
    since = request.since_ms or (until - _DAY_MS if not request.until_ms else 0)
    if since >= until:
        raise InvalidArgument("until_ms must be after since_ms")
    return StatsRange(since, until)


def stats(core: GuardianCore, call: Call, window: StatsRange, connection: Connection) -> pb.StatsResponse:
    """The counts (see the module docstring)."""
    requests = [
        pb.RequestCount(agent=agent, operation=operation, decision=decision, count=count)
        for agent, operation, decision, count in connection.execute(
            "SELECT agent, operation, decision, count(*) AS n FROM audit WHERE ts_ms >= ? AND ts_ms < ?"
            " GROUP BY agent, operation, decision ORDER BY n DESC, agent, operation, decision",
            (window.since_ms, window.until_ms),
        ).fetchall()
    ]
    namespaces = [
        pb.NamespaceCount(namespace=namespace, active=active, quarantined=held)
        for namespace, active, held in connection.execute(
            "SELECT namespace, sum(status = 'active'), sum(status <> 'active') FROM memories"
            " GROUP BY namespace ORDER BY namespace"
        ).fetchall()
    ]
    open_incidents = connection.execute("SELECT count(*) FROM incidents WHERE closed_at_ms = 0").fetchone()[0]
    keys = [
        pb.KeyAge(
            ring=version.ring,
            key_id=version.key_id,
            created_at_ms=version.created_at_ms,
            age_ms=call.now_ms - version.created_at_ms if version.created_at_ms else 0,
        )
        for version in core.keystore.versions()
        if version.primary
    ]
    call.object_id = f"{window.since_ms}..{window.until_ms}"
    return pb.StatsResponse(
        since_ms=window.since_ms,
        until_ms=window.until_ms,
        requests=requests,
        namespaces=namespaces,
        quarantined=sum(namespace.quarantined for namespace in namespaces),
        open_incidents=int(open_incidents),
        primary_keys=keys,
    )
