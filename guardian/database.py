"""The encrypted database: opening it, its schema, and its one writer.

SQLCipher 4 through ``sqlcipher3`` (its wheel bundles SQLCipher). The key is a
random 32-byte raw key given as ``PRAGMA key = "x'<hex>'"`` (no PBKDF2 on
open), built only from a validated hex string and always the first statement
on a connection. ``cipher_version`` proves the build is SQLCipher.

Concurrency: WAL; one long-lived writer connection used under a lock (every
change and every audit row goes through it, so the audit row shares the
change's transaction); one long-lived reader connection per thread.

Group commit (:meth:`Database.submit`): requests that arrive while a
transaction is running queue up, and the next thread to take the writer runs
all of them in one transaction, each inside its own savepoint (a job that
fails rolls back alone), and commits once. Every job returns only after the
commit that made it durable; if that commit fails, every job in it fails.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeVar

import sqlcipher3

from shared.errors import ConfigError, InternalError

__all__ = ["SCHEMA_VERSION", "Connection", "Database"]

_HEX_KEY_RE: Final = re.compile(r"[0-9a-f]{64}")
#: Below this much free space the guardian reports itself not ready (writes would soon fail).
_MIN_FREE_BYTES: Final = 1024 * 1024


T = TypeVar("T")

#: The most jobs one group commit takes (bounds how long one transaction holds the writer).
_MAX_GROUP: Final = 64


@dataclass(eq=False)
class _Job(Generic[T]):
    """One unit of work waiting for a group commit."""

    work: Any
    done: bool = False
    result: T | None = None
    error: BaseException | None = field(default=None, repr=False)


class Connection(Protocol):
    """The slice of a DB-API connection the guardian uses."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any:
        """Run one parameterised statement."""

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        """Run one statement once per parameter set."""


# Each migration takes the schema from version N-1 to N; they run in order at
# start, each in its own transaction with the user_version bump.
_MIGRATIONS: Final[tuple[str, ...]] = (
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
    # chained mac (guardian/audit.py); seq is assigned by the chain, not AUTOINCREMENT. Rows
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
)

SCHEMA_VERSION: Final = len(_MIGRATIONS)


def _connect(path: Path, key_hex: str) -> Any:
    if _HEX_KEY_RE.fullmatch(key_hex) is None:
        raise ConfigError("the database key must be 64 lowercase hex characters")
    connection = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    # PRAGMA key must be the first statement; the key is validated hex, never agent input.
    connection.execute(f"PRAGMA key = \"x'{key_hex}'\"")
    row = connection.execute("PRAGMA cipher_version").fetchone()
    if not row or not row[0]:
        connection.close()
        raise ConfigError("the sqlcipher3 module is not a SQLCipher build; refusing to store data unencrypted")
    try:
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlcipher3.DatabaseError as exc:
        connection.close()
        raise ConfigError(
            f"the database {path} cannot be opened with the configured key (wrong key or not a database)"
        ) from exc
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA busy_timeout = 30000")
    return connection


class Database:
    """The open, migrated, encrypted database."""

    def __init__(self, path: Path, key_hex: str) -> None:
        self.path = path
        self._key_hex = key_hex
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # Create the file 0600 before SQLCipher opens it, so it never exists with a wider mode.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        self._writer = _connect(path, key_hex)
        self._writer.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode: a committed transaction survives a crash of this process.
        self._writer.execute("PRAGMA synchronous = NORMAL")
        self._write_lock = threading.Lock()
        self._queue: list[_Job[Any]] = []
        self._queue_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        self._probe: Any = None
        self._probe_lock = threading.Lock()
        self._migrate()

    @property
    def schema_version(self) -> int:
        """The schema version the file is at."""
        return int(self._writer.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        current = self.schema_version
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"the database is at schema version {current}, newer than this guardian knows ({SCHEMA_VERSION});"
                " run a newer agent-guardian"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.write() as connection:
                for statement in _split_statements(_MIGRATIONS[version - 1]):
                    connection.execute(statement)
                # user_version takes no parameter; version is an int from this module.
                connection.execute(f"PRAGMA user_version = {int(version)}")

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction on the single writer; commits on success, rolls back on error."""
        with self._write_lock:
            if self._closed:
                raise InternalError("the database is closed")
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    def submit(self, work: Callable[[Connection], T]) -> T:
        """Run work in a write transaction shared with concurrent jobs; return once it is committed.

        work runs inside a savepoint: if it raises, only its own changes are rolled back and
        the exception is raised here. Group commit: see the module docstring.
        """
        job: _Job[T] = _Job(work)
        with self._queue_lock:
            self._queue.append(job)
        with self._write_lock:
            if not job.done:  # no earlier leader took it: lead a group that includes it
                if self._closed:
                    raise InternalError("the database is closed")
                with self._queue_lock:
                    group, self._queue = self._queue[:_MAX_GROUP], self._queue[_MAX_GROUP:]
                self._commit_group(group)
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    def _commit_group(self, group: list[_Job[Any]]) -> None:
        """Run group in one transaction (one savepoint each) and commit once; called with the writer held.

        Every job ends done: with its result, its own error, or (if the transaction as a
        whole failed) the transaction's error, since none of its changes were committed.
        """
        writer = self._writer
        try:
            writer.execute("BEGIN IMMEDIATE")
            for job in group:
                writer.execute("SAVEPOINT job")
                try:
                    job.result = job.work(writer)
                except Exception as exc:  # the job's own failure: undo only its changes
                    writer.execute("ROLLBACK TO job")
                    job.error = exc
                writer.execute("RELEASE job")
            writer.execute("COMMIT")
        except BaseException as exc:
            with suppress(Exception):
                writer.execute("ROLLBACK")
            for job in group:
                job.error = job.error or exc
        finally:
            for job in group:
                job.done = True

    def reader(self) -> Connection:
        """This thread's long-lived read connection."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            if self._closed:
                raise InternalError("the database is closed")
            connection = _connect(self.path, self._key_hex)
            connection.execute("PRAGMA query_only = ON")
            self._local.connection = connection
            with self._readers_lock:
                self._readers.append(connection)
        return connection  # type: ignore[no-any-return]

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """This thread's reader inside one read transaction: every query sees the same committed state."""
        connection = self.reader()
        connection.execute("BEGIN")
        try:
            yield connection
        finally:
            connection.execute("COMMIT")

    def probe_write(self, timeout_ms: int = 1000) -> str:
        """Whether a write transaction can start now: "ok" or what stops it (for readiness).

        Uses its own connection with a short busy timeout, so a stuck lock makes the
        probe fail quickly instead of waiting as long as a request would.
        """
        with self._probe_lock:
            if self._closed:
                return "the database is closed"
            try:
                if self._probe is None:
                    self._probe = _connect(self.path, self._key_hex)
                self._probe.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
                self._probe.execute("BEGIN IMMEDIATE")
                self._probe.execute("ROLLBACK")
            except (sqlcipher3.Error, ConfigError) as exc:
                return f"a write transaction cannot start: {_sqlite_reason(exc)}"
        free = _free_bytes(self.path.parent)
        if free < _MIN_FREE_BYTES:
            return f"only {free} bytes free on the database's filesystem"
        return "ok"

    def size_bytes(self) -> int:
        """The database file plus its write-ahead log, in bytes."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def integrity_check(self) -> str:
        """SQLite's integrity check: 'ok' or the first problems found."""
        rows = self.reader().execute("PRAGMA integrity_check").fetchall()
        return "; ".join(str(row[0]) for row in rows)

    def close(self) -> None:
        """Checkpoint the WAL and close every connection."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                for connection in self._readers:
                    connection.close()
                self._readers.clear()
            with self._probe_lock:
                if self._probe is not None:
                    self._probe.close()
                    self._probe = None
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._writer.close()


def _sqlite_reason(exc: Exception) -> str:
    """SQLite's own words for a failure (e.g. "database is locked"), without paths."""
    return exc.message if isinstance(exc, ConfigError) else str(exc).split(":")[0][:100]


def _free_bytes(directory: Path) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def _split_statements(script: str) -> list[str]:
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
