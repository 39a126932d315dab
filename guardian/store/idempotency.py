"""Idempotency keys: a retried write gets the first answer instead of writing twice.

A write request (Store, StoreBatch, Update, Delete) may carry an
``idempotency_key`` its client made. The first request with a key runs as
usual, and its answer is recorded in the same transaction as the change (so
the record exists exactly when the change does). A later request of the same
agent with the same key and the same request (its bytes, without the session
id, which a retry after a guardian restart does not share) gets the recorded
answer and changes nothing; with a different request it is refused. Records
are kept :data:`RETENTION_MS` and then purged by the housekeeping thread.

The recorded answer can hold memory content; it stays inside the encrypted
database, like the memory itself.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import Message

from guardian.store.database import Connection
from shared.errors import InvalidArgument

__all__ = ["RETENTION_MS", "Prior", "check_key", "find", "purge_older_than", "record", "request_digest"]

#: How long an answer is kept for retries.
RETENTION_MS: Final = 24 * 3600 * 1000
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")


@dataclass(frozen=True)
class Prior:
    """The recorded first request with a key."""

    operation: str
    request_digest: str
    object_id: str
    response: bytes


def check_key(key: str) -> str:
    """A well-formed idempotency key ("" when none was sent)."""
    if key and _KEY_RE.fullmatch(key) is None:
        raise InvalidArgument("idempotency_key: 16-64 letters, digits, '_' or '-'")
    return key


def request_digest(request: Message) -> str:
    """sha256 of the request's bytes without its session id (a retry may come on a new session)."""
    copy = type(request)()
    copy.CopyFrom(request)
    if "session_id" in copy.DESCRIPTOR.fields_by_name:
        copy.ClearField("session_id")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def find(connection: Connection, agent: str, key: str) -> Prior | None:
    """The recorded request of agent with key, if any."""
    row = connection.execute(
        "SELECT operation, request_digest, object_id, response FROM idempotency WHERE agent = ? AND key = ?",
        (agent, key),
    ).fetchone()
    return Prior(str(row[0]), str(row[1]), str(row[2]), bytes(row[3])) if row else None


def record(connection: Connection, agent: str, key: str, first: Prior, now_ms: int) -> None:
    """Record the answer to agent's first request with key (inside that request's transaction)."""
    connection.execute(
        "INSERT INTO idempotency (agent, key, operation, request_digest, object_id, response, created_at_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (agent, key, first.operation, first.request_digest, first.object_id, first.response, now_ms),
    )


def purge_older_than(connection: Connection, cutoff_ms: int, limit: int) -> int:
    """Forget up to limit records made before cutoff_ms; how many."""
    cursor = connection.execute(
        "DELETE FROM idempotency WHERE (agent, key) IN"
        " (SELECT agent, key FROM idempotency WHERE created_at_ms < ? LIMIT ?)",
        (cutoff_ms, limit),
    )
    return int(cursor.rowcount)
