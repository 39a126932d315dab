"""The guardian's state, built once at start: database, keys, policy, sessions.

The policy is an immutable object behind one reference, swapped atomically
(a reader sees either the old or the new policy, never a mix).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from guardian.agents import AgentRegistry
from guardian.config import GuardianConfig
from guardian.database import Database
from guardian.keys import Keys, load_keys
from guardian.memories import MemoryStore
from guardian.policy import Policy, load_policy
from guardian.sessions import SessionTable

__all__ = ["GuardianCore", "now_ms", "session_ref"]


def now_ms() -> int:
    """Wall-clock time in Unix milliseconds."""
    return time.time_ns() // 1_000_000


def session_ref(session_id: str) -> str:
    """What the audit trail records of a session: a digest, since the id itself is a bearer credential."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:16] if session_id else ""


class GuardianCore:
    """Everything the services share."""

    def __init__(self, config: GuardianConfig, keys: Keys, policy: Policy) -> None:
        self.config = config
        self.database = Database(config.database, keys.database_hex)
        self.memories = MemoryStore(keys.memory)
        self.agents = AgentRegistry(keys.token)
        self.sessions = SessionTable()
        self._policy = policy
        self._policy_lock = threading.Lock()

    @classmethod
    def open(cls, config: GuardianConfig) -> GuardianCore:
        """Load keys and policy (both validated) and open the database."""
        return cls(config, load_keys(config.keys_dir), load_policy(config.policy))

    @property
    def policy(self) -> Policy:
        """The policy in force now."""
        return self._policy

    def swap_policy(self, path: Path | None = None) -> Policy:
        """Load, validate and compile a policy, then swap it in; the old one stays on any error."""
        new = load_policy(path or self.config.policy)
        with self._policy_lock:
            self._policy = new
        return new

    def close(self) -> None:
        """Close the database."""
        self.database.close()
