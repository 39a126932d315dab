"""The agents' limits kept across restarts: rate-limit buckets, cooldowns, anomaly locks and windows.

A restart, or a crash, must not be a way around a lockout. Each agent's state
(its rate limiter's buckets and cooldown, its anomaly monitor's lock and windows:
guardian/checks/ratelimit.py, anomaly.py) is one JSON row of ``agent_limits`` in
the encrypted database (guardian/store/agents.py), written:

- at the end of each group commit, for the agents whose state changed, in the
  same transaction as the audit rows of the requests that changed it
  (:func:`save_changed`, run by the database before it commits). Every request
  ends in a group commit (its audit row), so what a request took is kept exactly
  when it is acknowledged: no write of its own per request, one upsert per
  changed agent per group, and nothing is lost to a ``kill -9`` but what the
  requests still in flight took (they were never answered);
- an anomaly lock, and the security team's unlock, the moment they happen, with
  their own audit rows (:func:`save_agent`).

At start (:func:`restore`) the rows are put back: locks and cooldowns end when
they would have, buckets are refilled for the time the guardian was down.
Anomaly windows are counted after a request's transaction, so at most the events
of the last requests before a crash are lost (never a lock).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from guardian.checks.anomaly import AgentAnomalies
from guardian.checks.ratelimit import AgentRates
from guardian.state.core import GuardianCore, now_ms
from guardian.store.agents import load_limits, save_limits
from guardian.store.database import Connection

__all__ = ["restore", "save_agent", "save_changed"]

log = logging.getLogger("agent_guardian")


def _row(rates: AgentRates, anomalies: AgentAnomalies) -> str:
    """One agent's state as its row's JSON text."""
    return json.dumps(
        {
            "buckets": {name: list(bucket) for name, bucket in rates.buckets.items()},
            "cooldown_until_ms": rates.cooldown_until_ms,
            "locked_until_ms": anomalies.locked_until_ms,
            "windows": {kind: [window, events] for kind, (window, events) in anomalies.windows.items()},
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def _parsed(text: str) -> tuple[AgentRates, AgentAnomalies]:
    data: dict[str, Any] = json.loads(text)
    rates = AgentRates(
        buckets={
            str(name): (float(tokens), int(capacity), float(refill), int(counted))
            for name, (tokens, capacity, refill, counted) in data["buckets"].items()
        },
        cooldown_until_ms=int(data["cooldown_until_ms"]),
    )
    windows = {
        str(kind): (int(window), [int(at) for at in events]) for kind, (window, events) in data["windows"].items()
    }
    return rates, AgentAnomalies(locked_until_ms=int(data["locked_until_ms"]), windows=windows)


def restore(core: GuardianCore) -> int:
    """Put the kept limits back into core's rate limiter and anomaly monitor; how many agents.

    A row that does not parse is logged and skipped (that agent starts with fresh limits).
    """
    with core.database.read() as reader:
        rows = load_limits(reader)
    rates: dict[str, AgentRates] = {}
    anomalies: dict[str, AgentAnomalies] = {}
    for agent, text in rows.items():
        try:
            rates[agent], anomalies[agent] = _parsed(text)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("an agent's kept limits do not parse", extra={"event": "limits_unreadable", "agent": agent})
    core.rates.restore_agents(rates, now_ms())
    core.anomalies.restore_agents(anomalies)
    log.info("agents' limits restored", extra={"event": "limits_restored", "agents": len(rates)})
    return len(rates)


def save_changed(core: GuardianCore, connection: Connection) -> None:
    """Keep, in connection's transaction, the state of every agent whose limits changed since the last save."""
    changed = core.rates.take_changed() | core.anomalies.take_changed()
    if changed:
        _save(core, connection, changed)


def save_agent(core: GuardianCore, connection: Connection, agent: str) -> None:
    """Keep one agent's state now, in connection's transaction (an anomaly lock, an unlock)."""
    _save(core, connection, {agent})


def _save(core: GuardianCore, connection: Connection, agents: set[str]) -> None:
    wall = now_ms()
    rows = {agent: _row(core.rates.export_agent(agent, wall), core.anomalies.export_agent(agent)) for agent in agents}
    save_limits(connection, rows, wall)
