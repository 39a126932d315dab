"""The agent registry: who may open sessions, and with which token; and each agent's limits kept across restarts.

A token is shown once, when the agent is added; the guardian stores only its
HMAC under the token key ring, so the database alone cannot reveal or forge
one. ``agent_limits`` holds, per agent, the JSON of its rate-limit buckets,
cooldown, anomaly lock and windows (guardian/state/limits.py).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from guardian.keys.ring import KeyRing
from guardian.store.database import Connection
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.formats import AGENT_NAME_RE, is_agent_token

__all__ = ["AgentRecord", "AgentRegistry", "load_limits", "save_limits"]


def save_limits(connection: Connection, states: dict[str, str], saved_at_ms: int) -> None:
    """Keep each agent's limits (JSON text)."""
    connection.executemany(
        "INSERT INTO agent_limits (agent, state, saved_at_ms) VALUES (?, ?, ?)"
        " ON CONFLICT (agent) DO UPDATE SET state = excluded.state, saved_at_ms = excluded.saved_at_ms",
        [(agent, state, saved_at_ms) for agent, state in states.items()],
    )


def load_limits(connection: Connection) -> dict[str, str]:
    """Every kept row: agent -> JSON text."""
    return {str(agent): str(state) for agent, state in connection.execute("SELECT agent, state FROM agent_limits")}


@dataclass(frozen=True)
class AgentRecord:
    """One registered agent."""

    name: str
    created_at_ms: int
    revoked_at_ms: int | None


class AgentRegistry:
    """Adds, lists, revokes and authenticates agents."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    def use_ring(self, ring: KeyRing) -> None:
        """Hash new tokens with ring's primary from now on; tokens hashed with any of its keys still open."""
        self._ring = ring

    def add(self, connection: Connection, name: str, now_ms: int) -> str:
        """Register name and return its new token (the only time it exists in clear)."""
        if AGENT_NAME_RE.fullmatch(name) is None:
            raise InvalidArgument("name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if connection.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone() is not None:
            raise FailedPrecondition(f"an agent named {name!r} already exists")
        token = "agt_" + secrets.token_urlsafe(32)
        key_id, digest = self._ring.sign(token.encode())
        connection.execute(
            "INSERT INTO agents (name, token_key_id, token_hash, created_at_ms) VALUES (?, ?, ?, ?)",
            (name, key_id, digest, now_ms),
        )
        return token

    def authenticate(self, connection: Connection, token: str, now_ms: int) -> str | None:
        """The name of the active agent holding token (its current one, or its previous one in its grace period)."""
        if not is_agent_token(token):
            return None
        for key_id in self._ring.keys:
            _, digest = KeyRing(key_id, self._ring.keys).sign(token.encode())
            row = connection.execute(
                "SELECT name, revoked_at_ms FROM agents WHERE token_hash = ? AND token_key_id = ?",
                (digest, key_id),
            ).fetchone()
            if row is None:
                row = connection.execute(
                    "SELECT name, revoked_at_ms FROM agents WHERE previous_token_hash = ?"
                    " AND previous_token_key_id = ? AND previous_valid_until_ms > ?",
                    (digest, key_id, now_ms),
                ).fetchone()
            if row is not None:
                return None if row[1] is not None else str(row[0])
        return None

    def is_active(self, connection: Connection, name: str) -> bool:
        """Whether an agent named name is registered and not revoked."""
        row = connection.execute("SELECT revoked_at_ms FROM agents WHERE name = ?", (name,)).fetchone()
        return row is not None and row[0] is None

    def rotate_token(self, connection: Connection, name: str, now_ms: int, grace_ms: int) -> str:
        """A new token for name (returned once); the current one stays valid for grace_ms (0: it ends now)."""
        row = connection.execute("SELECT revoked_at_ms FROM agents WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no agent named {name!r}")
        if row[0] is not None:
            raise FailedPrecondition(f"the agent {name!r} is revoked; add a new agent instead")
        token = "agt_" + secrets.token_urlsafe(32)
        key_id, digest = self._ring.sign(token.encode())
        if grace_ms:
            connection.execute(
                "UPDATE agents SET previous_token_key_id = token_key_id, previous_token_hash = token_hash,"
                " previous_valid_until_ms = ?, token_key_id = ?, token_hash = ? WHERE name = ?",
                (now_ms + grace_ms, key_id, digest, name),
            )
        else:
            connection.execute(
                "UPDATE agents SET previous_token_key_id = NULL, previous_token_hash = NULL,"
                " previous_valid_until_ms = NULL, token_key_id = ?, token_hash = ? WHERE name = ?",
                (key_id, digest, name),
            )
        return token

    def tokens_hashed_with(self, connection: Connection, key_id: str, now_ms: int) -> int:
        """How many active agents' tokens (current, or previous in their grace period) key_id hashed."""
        row = connection.execute(
            "SELECT count(*) FROM agents WHERE revoked_at_ms IS NULL AND (token_key_id = ?"
            " OR (previous_token_key_id = ? AND previous_valid_until_ms > ?))",
            (key_id, key_id, now_ms),
        ).fetchone()
        return int(row[0])

    def require(self, connection: Connection, name: str) -> None:
        """NotFound unless an agent of this name is registered (revoked or not)."""
        if connection.execute("SELECT 1 FROM agents WHERE name = ?", (name,)).fetchone() is None:
            raise NotFound(f"no agent named {name!r}")

    def revoke(self, connection: Connection, name: str, now_ms: int) -> None:
        """Refuse name's token from now on."""
        row = connection.execute("SELECT revoked_at_ms FROM agents WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no agent named {name!r}")
        if row[0] is not None:
            raise FailedPrecondition(f"the agent {name!r} is already revoked")
        connection.execute(
            "UPDATE agents SET revoked_at_ms = ?, previous_token_hash = NULL, previous_token_key_id = NULL,"
            " previous_valid_until_ms = NULL WHERE name = ?",
            (now_ms, name),
        )

    def list(self, connection: Connection) -> list[AgentRecord]:
        """Every registered agent, by name."""
        rows = connection.execute("SELECT name, created_at_ms, revoked_at_ms FROM agents ORDER BY name").fetchall()
        return [AgentRecord(name=row[0], created_at_ms=row[1], revoked_at_ms=row[2]) for row in rows]
