"""The memories table: the data stage of the pipeline.

Parameterised SQL only. Every query is scoped to one agent, so an agent can
never reach another's memories, and every row read is verified (content
digest and HMAC) before it leaves this module: a mismatch raises DataLoss.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Final

from guardian.database import Connection
from guardian.integrity import SignedFields, canonical_json, content_sha256
from guardian.keys import KeyRing
from shared.errors import DataLoss, InvalidArgument, NotFound

__all__ = ["Draft", "MemoryStore", "StoredMemory", "fts_query"]

security_log = logging.getLogger("agent_guardian.security")

# Interpolated into SQL: a constant of this module, never input.
_COLUMNS: Final = "rowid, id, agent, created_at_ms, updated_at_ms, content, tags, metadata, sha256, key_id, hmac"
_M_COLUMNS: Final = ", ".join("m." + column for column in _COLUMNS.split(", "))
_WORD_RE: Final = re.compile(r"\w+")
_MAX_QUERY_WORDS: Final = 32
_CURSOR_RE: Final = re.compile(r"[A-Za-z0-9_-]{22}\.[0-9a-f]{32}")


@dataclass(frozen=True)
class Draft:
    """A memory to store, already validated by the shape stage."""

    content: str
    tags: tuple[str, ...]
    metadata_json: str


@dataclass(frozen=True)
class StoredMemory:
    """A memory read back and verified."""

    id: str
    agent: str
    content: str
    tags: tuple[str, ...]
    metadata_json: str
    created_at_ms: int
    updated_at_ms: int
    sha256: str


def fts_query(text: str) -> str:
    """Turn an agent's text into an FTS5 query of quoted words joined by OR.

    Agent text is never FTS syntax: only runs of word characters survive and
    each is a quoted string, so ``"``, ``*``, ``NEAR(`` or ``AND`` are plain
    words (or nothing). Raises InvalidArgument when no word is left.
    """
    words = _WORD_RE.findall(text)[:_MAX_QUERY_WORDS]
    if not words:
        raise InvalidArgument("query: needs at least one word (letters or digits) to search for")
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)


class MemoryStore:
    """Reads and writes memories of one agent at a time, signing and verifying each."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring
        # A separate key for list cursors, derived so it never signs anything else.
        self._cursor_key = hmac.new(ring.primary, b"agent-guardian/cursor-key/v1", hashlib.sha256).digest()

    def insert(self, connection: Connection, agent: str, drafts: list[Draft], now_ms: int) -> list[StoredMemory]:
        """Store drafts for agent (inside the caller's transaction)."""
        stored: list[StoredMemory] = []
        for draft in drafts:
            memory = StoredMemory(
                id="mem_" + secrets.token_hex(16),
                agent=agent,
                content=draft.content,
                tags=draft.tags,
                metadata_json=draft.metadata_json,
                created_at_ms=now_ms,
                updated_at_ms=now_ms,
                sha256=content_sha256(draft.content),
            )
            key_id, digest = _signed_fields(memory).sign(self._ring)
            connection.execute(
                "INSERT INTO memories (id, agent, created_at_ms, updated_at_ms, content, tags, metadata,"
                " sha256, key_id, hmac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    memory.id,
                    agent,
                    now_ms,
                    now_ms,
                    memory.content,
                    canonical_json(list(memory.tags)),
                    memory.metadata_json,
                    memory.sha256,
                    key_id,
                    digest,
                ),
            )
            stored.append(memory)
        return stored

    def get(self, connection: Connection, agent: str, memory_id: str) -> StoredMemory:
        """The agent's memory with this id; NotFound if none, DataLoss if it fails verification."""
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE id = ? AND agent = ?",  # noqa: S608 - constant columns
            (memory_id, agent),
        ).fetchone()
        if row is None:
            raise NotFound("no memory with that id")
        return self._verified(row)

    def search(self, connection: Connection, agent: str, query: str, limit: int) -> list[tuple[StoredMemory, float]]:
        """The agent's memories matching query, best first, with a score (higher is better)."""
        rows = connection.execute(
            f"SELECT {_M_COLUMNS}, bm25(memories_fts) AS rank"  # noqa: S608 - constant columns
            " FROM memories_fts JOIN memories AS m ON m.rowid = memories_fts.rowid"
            " WHERE memories_fts MATCH ? AND m.agent = ? ORDER BY rank LIMIT ?",
            (fts_query(query), agent, limit),
        ).fetchall()
        return [(self._verified(row[:-1]), -float(row[-1])) for row in rows]

    def list_page(
        self, connection: Connection, agent: str, page_size: int, cursor: str
    ) -> tuple[list[StoredMemory], str]:
        """One page of the agent's memories, newest first, and the cursor of the next page ('' at the end)."""
        if cursor:
            created_at_ms, rowid = self._open_cursor(agent, cursor)
            rows = connection.execute(
                f"SELECT {_COLUMNS} FROM memories WHERE agent = ?"  # noqa: S608 - constant columns
                " AND (created_at_ms < ? OR (created_at_ms = ? AND rowid < ?))"
                " ORDER BY created_at_ms DESC, rowid DESC LIMIT ?",
                (agent, created_at_ms, created_at_ms, rowid, page_size + 1),
            ).fetchall()
        else:
            rows = connection.execute(
                f"SELECT {_COLUMNS} FROM memories WHERE agent = ?"  # noqa: S608 - constant columns
                " ORDER BY created_at_ms DESC, rowid DESC LIMIT ?",
                (agent, page_size + 1),
            ).fetchall()
        page = rows[:page_size]
        memories = [self._verified(row) for row in page]
        next_cursor = self._make_cursor(agent, page[-1][3], page[-1][0]) if len(rows) > page_size else ""
        return memories, next_cursor

    def update(
        self,
        connection: Connection,
        agent: str,
        memory_id: str,
        changes: dict[str, Any],
        now_ms: int,
    ) -> StoredMemory:
        """Apply changes (content, tags, metadata_json) to a verified memory and re-sign it."""
        current = self.get(connection, agent, memory_id)
        content = changes.get("content", current.content)
        updated = StoredMemory(
            id=current.id,
            agent=agent,
            content=content,
            tags=changes.get("tags", current.tags),
            metadata_json=changes.get("metadata_json", current.metadata_json),
            created_at_ms=current.created_at_ms,
            updated_at_ms=max(now_ms, current.updated_at_ms),
            sha256=content_sha256(content),
        )
        key_id, digest = _signed_fields(updated).sign(self._ring)
        connection.execute(
            "UPDATE memories SET content = ?, tags = ?, metadata = ?, updated_at_ms = ?, sha256 = ?,"
            " key_id = ?, hmac = ? WHERE id = ? AND agent = ?",
            (
                updated.content,
                canonical_json(list(updated.tags)),
                updated.metadata_json,
                updated.updated_at_ms,
                updated.sha256,
                key_id,
                digest,
                memory_id,
                agent,
            ),
        )
        return updated

    def delete(self, connection: Connection, agent: str, memory_id: str) -> None:
        """Delete the agent's memory; NotFound if it has none with this id."""
        cursor = connection.execute("DELETE FROM memories WHERE id = ? AND agent = ?", (memory_id, agent))
        if cursor.rowcount != 1:
            raise NotFound("no memory with that id")

    def count(self, connection: Connection, agent: str) -> int:
        """How many memories agent has."""
        return int(connection.execute("SELECT count(*) FROM memories WHERE agent = ?", (agent,)).fetchone()[0])

    def _verified(self, row: tuple[Any, ...]) -> StoredMemory:
        _, memory_id, agent, created, updated, content, tags_json, metadata, digest, key_id, mac = row
        memory = StoredMemory(
            id=memory_id,
            agent=agent,
            content=content,
            tags=tuple(json.loads(tags_json)) if _is_json_list(tags_json) else (),
            metadata_json=metadata,
            created_at_ms=created,
            updated_at_ms=updated,
            sha256=digest,
        )
        fields = SignedFields(memory_id, agent, created, updated, digest, tags_json, metadata)
        if content_sha256(content) != digest or not fields.verify(self._ring, key_id, mac):
            security_log.error(
                "memory failed its integrity check",
                extra={"event": "integrity_failure", "memory_id": memory_id, "agent": agent},
            )
            raise DataLoss("that memory failed its integrity check and is withheld; the security team is alerted")
        return memory

    def _make_cursor(self, agent: str, created_at_ms: int, rowid: int) -> str:
        payload = base64.urlsafe_b64encode(struct.pack(">qq", created_at_ms, rowid)).decode().rstrip("=")
        return f"{payload}.{self._cursor_mac(agent, payload)}"

    def _open_cursor(self, agent: str, cursor: str) -> tuple[int, int]:
        if _CURSOR_RE.fullmatch(cursor) is None:
            raise InvalidArgument("cursor: not a cursor this guardian issued; pass next_cursor unchanged")
        payload, mac = cursor.split(".")
        if not hmac.compare_digest(self._cursor_mac(agent, payload), mac):
            raise InvalidArgument("cursor: not a cursor this guardian issued; pass next_cursor unchanged")
        created_at_ms, rowid = struct.unpack(">qq", base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(created_at_ms), int(rowid)

    def _cursor_mac(self, agent: str, payload: str) -> str:
        message = agent.encode() + b"\0" + payload.encode()
        return hmac.new(self._cursor_key, message, hashlib.sha256).hexdigest()[:32]


def _signed_fields(memory: StoredMemory) -> SignedFields:
    return SignedFields(
        memory.id,
        memory.agent,
        memory.created_at_ms,
        memory.updated_at_ms,
        memory.sha256,
        canonical_json(list(memory.tags)),
        memory.metadata_json,
    )


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False
