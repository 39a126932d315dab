"""The database schema: every migration, in order, and how a migration is split into statements.

Each migration takes the schema from version N-1 to N; the database runs the
missing ones at start (``guardian/store/database.py``), each in its own transaction
with the ``user_version`` bump. A migration is never edited once released: a
change to the schema is a new migration at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import sqlcipher3

from guardian.store import search_index
from shared.errors import ConfigError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Migration", "split_statements"]

#: A migration: SQL statements, or a function that runs its steps on the connection (in the
#: migration's transaction) where SQL alone cannot (e.g. indexing text the guardian tokenises).
Migration = str | Callable[[Any], None]


def _partition_search_index(connection: Any) -> None:
    """5: the full-text index becomes one partitioned by namespace (guardian/store/search_index.py).

    The old index (external content, every agent's words as they are, kept by triggers)
    is dropped; the new one is contentless, holds namespaced terms the guardian makes, and
    only active memories, and is filled here from the memories table.
    """
    for statement in split_statements(
        """
        DROP TRIGGER memories_fts_insert;
        DROP TRIGGER memories_fts_delete;
        DROP TRIGGER memories_fts_update;
        DROP TABLE memories_fts;
        CREATE VIRTUAL TABLE memory_terms USING fts5(
            content, tags, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 0'
        );
        """
    ):
        connection.execute(statement)
    search_index.rebuild(connection)


MIGRATIONS: Final[tuple[Migration, ...]] = (
    """
    CREATE TABLE agents (
        name TEXT PRIMARY KEY,
        token_key_id TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER
    );
    CREATE TABLE memories (
        rowid INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        agent TEXT NOT NULL REFERENCES agents(name),
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        content TEXT NOT NULL,
        tags TEXT NOT NULL,
        metadata TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        key_id TEXT NOT NULL,
        hmac TEXT NOT NULL
    );
    CREATE INDEX memories_by_agent_newest ON memories(agent, created_at_ms DESC, rowid DESC);
    CREATE VIRTUAL TABLE memories_fts USING fts5(
        content, tags, content='memories', content_rowid='rowid', tokenize='unicode61 remove_diacritics 2'
    );
    CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts(rowid, content, tags) VALUES (new.rowid, new.content, new.tags);
    END;
    CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, content, tags)
        VALUES ('delete', old.rowid, old.content, old.tags);
    END;
    CREATE TRIGGER memories_fts_update AFTER UPDATE OF content, tags ON memories BEGIN
        INSERT INTO memories_fts(memories_fts, rowid, content, tags)
        VALUES ('delete', old.rowid, old.content, old.tags);
        INSERT INTO memories_fts(rowid, content, tags) VALUES (new.rowid, new.content, new.tags);
    END;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_ms INTEGER NOT NULL,
        agent TEXT NOT NULL,
        session TEXT NOT NULL,
        operation TEXT NOT NULL,
        object_id TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        policy_version TEXT NOT NULL
    );
    CREATE INDEX audit_by_agent ON audit(agent, seq);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN
        SELECT RAISE(ABORT, 'audit rows are append-only');
    END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN
        SELECT RAISE(ABORT, 'audit rows are append-only');
    END;
    """,
    # 2: namespaces (a memory's owner namespace; `agent` is now its author), quarantine status,
    # the filter rules that hit it, the HMAC format of each row, and the policy history.
    """
    ALTER TABLE memories ADD COLUMN namespace TEXT NOT NULL DEFAULT '';
    UPDATE memories SET namespace = agent;
    ALTER TABLE memories ADD COLUMN status TEXT NOT NULL DEFAULT 'active';
    ALTER TABLE memories ADD COLUMN filter_hits TEXT NOT NULL DEFAULT '';
    ALTER TABLE memories ADD COLUMN sig_format INTEGER NOT NULL DEFAULT 1;
    DROP INDEX memories_by_agent_newest;
    CREATE INDEX memories_by_namespace_newest ON memories(namespace, status, created_at_ms DESC, rowid DESC);
    CREATE INDEX memories_by_age ON memories(created_at_ms);
    CREATE INDEX memories_held ON memories(status, created_at_ms) WHERE status <> 'active';
    CREATE TABLE policy_history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        version TEXT NOT NULL,
        text TEXT NOT NULL,
        applied_at_ms INTEGER NOT NULL,
        applied_by TEXT NOT NULL,
        source TEXT NOT NULL
    );
    CREATE INDEX policy_history_by_version ON policy_history(version, seq);
    """,
    # 3: the audit chain. Rows gain a keyed digest of the request, the audit key id and the
    # chained mac (guardian/store/audit.py); seq is assigned by the chain, not AUTOINCREMENT. Rows
    # written before are moved into the chain, oldest first, when the guardian next starts
    # with its keys (audit.adopt_unchained_rows), then audit_unchained is dropped.
    """
    DROP TRIGGER audit_no_update;
    DROP TRIGGER audit_no_delete;
    DROP INDEX audit_by_agent;
    ALTER TABLE audit RENAME TO audit_unchained;
    CREATE TABLE audit (
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        agent TEXT NOT NULL,
        session TEXT NOT NULL,
        operation TEXT NOT NULL,
        object_id TEXT NOT NULL,
        decision TEXT NOT NULL,
        reason TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        args_digest TEXT NOT NULL,
        key_id TEXT NOT NULL,
        mac TEXT NOT NULL
    );
    CREATE INDEX audit_by_agent ON audit(agent, seq);
    CREATE INDEX audit_by_operation ON audit(operation, seq);
    CREATE INDEX audit_by_time ON audit(ts_ms);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN
        SELECT RAISE(ABORT, 'audit rows are append-only');
    END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN
        SELECT RAISE(ABORT, 'audit rows are append-only');
    END;
    """,
    # 4: an agent's token can be rotated with a grace period (the previous token's HMAC and
    # until when it is still accepted), and writes carry idempotency keys: the answer to the
    # first request with a key is kept (inside the encrypted database) for a while, so a retry
    # of a write whose answer was lost gets that answer instead of writing twice.
    """
    ALTER TABLE agents ADD COLUMN previous_token_key_id TEXT;
    ALTER TABLE agents ADD COLUMN previous_token_hash TEXT;
    ALTER TABLE agents ADD COLUMN previous_valid_until_ms INTEGER;
    CREATE INDEX agents_by_previous_token ON agents(previous_token_hash) WHERE previous_token_hash IS NOT NULL;
    CREATE TABLE idempotency (
        agent TEXT NOT NULL,
        key TEXT NOT NULL,
        operation TEXT NOT NULL,
        request_digest TEXT NOT NULL,
        object_id TEXT NOT NULL,
        response BLOB NOT NULL,
        created_at_ms INTEGER NOT NULL,
        PRIMARY KEY (agent, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_by_age ON idempotency(created_at_ms);
    """,
    _partition_search_index,
    # 6: memories' vectors for recall by meaning (guardian/store/vectors.py), one row per embedded
    # active memory, keyed by the memory's rowid. Filled in the background after the upgrade.
    """
    CREATE TABLE memory_vectors (
        rowid INTEGER PRIMARY KEY,
        model TEXT NOT NULL,
        vector BLOB NOT NULL,
        key_id TEXT NOT NULL,
        mac TEXT NOT NULL
    );
    """,
    # 7: provenance (guardian/recall/trust.py): the source the writer declared, the writing session
    # (its audit reference), the memories it was derived from and the trust it was stored with; all
    # covered by the HMAC from signature format 3. Rows written before keep '' (unrecorded). The
    # derivations, parent to child, so that an incident finds everything built on a memory. And who
    # read what: each memory a read returned (plainly or labelled) or withheld for its trust, by its audit
    # row's seq. And
    # incidents: the memories the security team held by author, session, source and time, with what was
    # derived from them (guardian/service/incidents.py). And each agent's rate-limit buckets, cooldown,
    # anomaly lock and windows, so a restart never resets them (guardian/state/limits.py).
    """
    ALTER TABLE memories ADD COLUMN source TEXT NOT NULL DEFAULT '';
    ALTER TABLE memories ADD COLUMN session TEXT NOT NULL DEFAULT '';
    ALTER TABLE memories ADD COLUMN derived_from TEXT NOT NULL DEFAULT '';
    ALTER TABLE memories ADD COLUMN trust TEXT NOT NULL DEFAULT '';
    CREATE TABLE memory_derivations (
        parent TEXT NOT NULL,
        child TEXT NOT NULL,
        PRIMARY KEY (parent, child)
    ) WITHOUT ROWID;
    CREATE INDEX memory_derivations_by_child ON memory_derivations(child);
    CREATE TABLE recalls (
        memory TEXT NOT NULL,
        seq INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        PRIMARY KEY (memory, seq)
    ) WITHOUT ROWID;
    CREATE TRIGGER recalls_no_update BEFORE UPDATE ON recalls BEGIN
        SELECT RAISE(ABORT, 'recall rows are append-only');
    END;
    CREATE TRIGGER recalls_no_delete BEFORE DELETE ON recalls BEGIN
        SELECT RAISE(ABORT, 'recall rows are append-only');
    END;
    CREATE INDEX memories_by_author ON memories(agent, created_at_ms);
    CREATE TABLE incidents (
        id TEXT PRIMARY KEY,
        opened_at_ms INTEGER NOT NULL,
        opened_by TEXT NOT NULL,
        selector TEXT NOT NULL,
        reason TEXT NOT NULL,
        closed_at_ms INTEGER NOT NULL DEFAULT 0,
        closed_by TEXT NOT NULL DEFAULT '',
        resolution TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE agent_limits (
        agent TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        saved_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE incident_memories (
        incident TEXT NOT NULL REFERENCES incidents(id),
        memory TEXT NOT NULL,
        found TEXT NOT NULL,
        was_status TEXT NOT NULL,
        PRIMARY KEY (incident, memory)
    ) WITHOUT ROWID;
    """,
    # 8: accountable administration. The people who may administer the guardian, each with one
    # Ed25519 public key (OpenSSH form) and a role (guardian/access/); the nonces of signed admin
    # requests still inside the clock-skew window, so a replay is refused across a restart; the
    # proposals of the two-person rule, each with the exact request proposed and both people's
    # signatures; and the audit chain heads signed with the audit-signing key, each with the public
    # hash chain's link at that row, so that anyone with the public key can verify an export.
    """
    CREATE TABLE admins (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        public_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL UNIQUE,
        added_at_ms INTEGER NOT NULL,
        added_by TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE admin_nonces (
        nonce TEXT PRIMARY KEY,
        expires_at_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE proposals (
        id TEXT PRIMARY KEY,
        method TEXT NOT NULL,
        operation TEXT NOT NULL,
        request BLOB NOT NULL,
        proposed_by TEXT NOT NULL,
        proposal_auth TEXT NOT NULL,
        proposed_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'open',
        decided_by TEXT NOT NULL DEFAULT '',
        decision_auth TEXT NOT NULL DEFAULT '',
        decided_at_ms INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE audit_signed_heads (
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        link TEXT NOT NULL,
        key_id TEXT NOT NULL,
        signature TEXT NOT NULL
    );
    CREATE TRIGGER audit_signed_heads_no_update BEFORE UPDATE ON audit_signed_heads BEGIN
        SELECT RAISE(ABORT, 'signed heads are append-only');
    END;
    CREATE TRIGGER audit_signed_heads_no_delete BEFORE DELETE ON audit_signed_heads BEGIN
        SELECT RAISE(ABORT, 'signed heads are append-only');
    END;
    """,
    # 9: each audit row's W3C trace id (guardian/store/audit.py): one trace from the MCP client's
    # request through the gateway into the row. A row with one is sealed in canonical form v2, which
    # covers it; every row before has '' and keeps form v1.
    """
    ALTER TABLE audit ADD COLUMN trace TEXT NOT NULL DEFAULT '';
    """,
)

SCHEMA_VERSION: Final = len(MIGRATIONS)


def split_statements(script: str) -> list[str]:
    """Split a migration into statements; triggers keep their inner semicolons."""
    statements: list[str] = []
    buffer: list[str] = []
    for line in script.strip().splitlines():
        buffer.append(line)
        joined = "\n".join(buffer).strip()
        if joined.endswith(";") and sqlcipher3.complete_statement(joined):
            statements.append(joined)
            buffer = []
    if "\n".join(buffer).strip():
        raise ConfigError("a schema migration ends in an incomplete statement")
    return statements
