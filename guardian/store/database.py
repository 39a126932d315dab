"""The encrypted database: opening it, its one writer, its readers, and replacing its key.

SQLCipher 4 through ``sqlcipher3`` (its wheel bundles SQLCipher). The key is a
random 32-byte raw key given as ``PRAGMA key = "x'<hex>'"`` (no PBKDF2 on
open), built only from a validated hex string and always the first statement
on a connection. ``cipher_version`` proves the build is SQLCipher. The schema
and its migrations are in ``guardian/store/schema.py``.

Concurrency: WAL; one long-lived writer connection used under a lock: every
request's work (reads too) and its audit row run on it, in one transaction.
Reads run there rather than on a reader connection of their own because
SQLite empties a connection's page cache whenever another connection has
committed, and every request commits an audit row: on the writer the pages a
search needs stay decrypted in the cache. One long-lived reader connection per
thread serves what must not hold the writer (a long audit walk, the session
stage's token check), only inside :meth:`Database.read` (or
:meth:`Database.snapshot`), which holds the reader gate shared. Replacing the
key (:meth:`Database.rekey`) holds the writer and the gate exclusively, so no
connection is in use while the file is swapped.
Never take the writer while holding the gate (that order would deadlock with a
rekey); the code only ever takes the gate alone or the writer, then the gate.

Group commit (:meth:`Database.submit`): requests that arrive while a
transaction is running queue up, and the next thread to take the writer runs
all of them in one transaction, each inside its own savepoint (a job that
fails rolls back alone), and commits once. Every job returns only after the
commit that made it durable; if that commit fails, every job in it fails.

Durability (``storage.durability`` in config.yaml): ``normal`` is WAL with
``synchronous = NORMAL``: a committed transaction survives a crash of the
guardian (the WAL is written before the answer), and after a power loss or a
kernel crash the database is intact but may lack the last transactions
committed before it. ``full`` is ``synchronous = FULL``: the WAL is fsynced at
every commit (once per group), so an acknowledged write survives a power loss too.

Storage faults (a full disk, a filesystem gone read-only, an I/O error) are
:class:`~shared.errors.Unavailable` (retryable), never internal errors; nothing
half-written stays (the transaction rolls back). Writes that add data are
refused early while free space is under ``storage.min_free``, so reads and the
audit rows of every request keep the room they need.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

import sqlcipher3

from guardian.files.durable import fsync_dir, fsync_file
from guardian.store.schema import MIGRATIONS, SCHEMA_VERSION, split_statements
from shared.errors import ConfigError, InternalError, Unavailable

log = logging.getLogger("agent_guardian")

__all__ = ["DEFAULT_MIN_FREE_BYTES", "Connection", "Database", "Durability", "open_keyed", "sidecars", "storage_fault"]

_HEX_KEY_RE: Final = re.compile(r"[0-9a-f]{64}")
#: What writes leave free by default: room for reads' and denials' audit rows and checkpoints.
DEFAULT_MIN_FREE_BYTES: Final = 64 * 1024 * 1024

Durability = Literal["normal", "full"]
_SYNCHRONOUS: Final[dict[str, str]] = {"normal": "NORMAL", "full": "FULL"}

T = TypeVar("T")

#: The most jobs one group commit takes (bounds how long one transaction holds the writer).
_MAX_GROUP: Final = 64
#: The writer's page cache (KiB): every request runs on the writer, so the index pages a search
#: reads stay decrypted here between requests (the default is 2 MiB). At a million memories 24 MiB
#: was measured no faster than 8 (one bench run each) and held 20 MiB more of the guardian's RSS;
#: 4 MiB held 5 MiB less than 8, searching by meaning as fast and by words about a tenth slower
#: (two runs each of 15 s, within their noise), which keeps the guardian's peak at 1M under 350 MB.
_WRITER_CACHE_KIB: Final = 4 * 1024

#: SQLite's primary result codes that mean the storage failed, not the statement.
_STORAGE_FAULTS: Final[dict[int, str]] = {
    5: "the database is busy",  # SQLITE_BUSY
    6: "the database is locked",  # SQLITE_LOCKED
    8: "its storage is read-only",  # SQLITE_READONLY
    10: "its storage reported an I/O error",  # SQLITE_IOERR
    13: "its disk is full",  # SQLITE_FULL
    14: "its storage cannot be opened",  # SQLITE_CANTOPEN
}


def storage_fault(exc: BaseException) -> Unavailable | None:
    """The retryable error for a SQLite failure of the storage itself (disk full, read-only, I/O), else None."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlcipher3.Error) or not isinstance(code, int):
        return None
    reason = _STORAGE_FAULTS.get(code & 0xFF)
    if reason is None:
        return None
    return Unavailable(f"the guardian cannot write now: {reason}; retry later")


@dataclass(eq=False)
class _Job(Generic[T]):
    """One unit of work waiting for a group commit."""

    work: Any
    #: What to run once its changes have committed (Database.after_commit).
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    done: bool = False
    result: T | None = None
    error: BaseException | None = field(default=None, repr=False)


class Connection(Protocol):
    """The slice of a DB-API connection the guardian uses."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any:
        """Run one parameterised statement."""

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        """Run one statement once per parameter set."""


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


def open_keyed(path: Path, key_hexes: Sequence[str]) -> tuple[Any, int]:
    """A connection to path with the first of key_hexes that opens it, and that key's index.

    Raises ConfigError when none does (the message of the newest key's failure).
    """
    if not key_hexes:
        raise ConfigError("no database key was given")
    first_error: ConfigError | None = None
    for index, key_hex in enumerate(key_hexes):
        try:
            return _connect(path, key_hex), index
        except ConfigError as error:
            first_error = first_error or error
    assert first_error is not None
    raise first_error


class _Gate:
    """Shared by readers, exclusive for a rekey; re-entrant for a thread that already reads."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._exclusive = False
        self._waiting = 0
        self._local = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._condition:
                while self._exclusive or self._waiting:
                    self._condition.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._condition:
                    self._readers -= 1
                    if not self._readers:
                        self._condition.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._waiting += 1
            try:
                while self._exclusive or self._readers:
                    self._condition.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._condition:
                self._exclusive = False
                self._condition.notify_all()


class Database:
    """The open, migrated, encrypted database.

    key_hexes: the database keys, newest first. The file opens with the first that fits
    (an older one only when a rekey was cut short: :attr:`key_index` tells which).
    """

    def __init__(
        self,
        path: Path,
        key_hexes: str | Sequence[str],
        *,
        durability: Durability = "normal",
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
    ) -> None:
        self.path = path
        keys = [key_hexes] if isinstance(key_hexes, str) else list(key_hexes)
        if durability not in _SYNCHRONOUS:
            raise ConfigError("storage.durability: expected normal or full")
        self._durability = durability
        self.min_free_bytes = min_free_bytes
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            # Create the file 0600 before SQLCipher opens it, so it never exists with a wider mode.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        self._writer, self.key_index = open_keyed(path, keys)
        self._key_hex = keys[self.key_index]
        self._configure_writer()
        self._write_lock = threading.Lock()
        self._queue: list[_Job[Any]] = []
        self._queue_lock = threading.Lock()
        self._gate = _Gate()
        self._local = threading.local()
        #: Bumped by a rekey: a thread's reader from an earlier generation is closed and reopened.
        self._generation = 0
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        #: The after-commit actions of the transaction (or group job) running on the writer, or None.
        self._pending: list[Callable[[], None]] | None = None
        #: Told each group commit's own CPU nanoseconds (its jobs' excluded), when set (guardian/state/profile.py).
        self.on_group_commit: Callable[[int], None] | None = None
        #: Work that ends every group commit, in its transaction (after the jobs, before COMMIT).
        self._group_endings: list[Callable[[Connection], None]] = []
        self._probe: Any = None
        self._probe_lock = threading.Lock()
        self._migrate()

    def _configure_writer(self) -> None:
        # Interpolated: constants of this module.
        self._writer.execute(f"PRAGMA cache_size = -{_WRITER_CACHE_KIB}")
        self._writer.execute("PRAGMA journal_mode = WAL")
        # Interpolated: a constant of this module, chosen by a validated config value.
        self._writer.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self._durability]}")

    @property
    def durability(self) -> Durability:
        """The configured durability (see the module docstring)."""
        return self._durability

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
            migration = MIGRATIONS[version - 1]
            with self.write() as connection:
                if isinstance(migration, str):
                    for statement in split_statements(migration):
                        connection.execute(statement)
                else:
                    migration(connection)
                # user_version takes no parameter; version is an int from this module.
                connection.execute(f"PRAGMA user_version = {int(version)}")

    # -- writing ---------------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction on the single writer; commits on success, rolls back on error.

        A storage fault (disk full, read-only, I/O error) is raised as Unavailable.
        """
        with self._write_lock:
            if self._closed:
                raise Unavailable("the guardian is stopping; retry in a few seconds")
            actions: list[Callable[[], None]] = []
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                self._pending = actions
                try:
                    yield self._writer
                except BaseException:
                    with suppress(sqlcipher3.Error):  # SQLite may have rolled back already
                        self._writer.execute("ROLLBACK")
                    raise
                finally:
                    self._pending = None
                self._writer.execute("COMMIT")
                _run_all(actions)
            except sqlcipher3.Error as exc:
                fault = storage_fault(exc)
                if fault is None:
                    raise
                with suppress(sqlcipher3.Error):
                    self._writer.execute("ROLLBACK")
                raise fault from exc

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
                with self._queue_lock:
                    group, self._queue = self._queue[:_MAX_GROUP], self._queue[_MAX_GROUP:]
                if self._closed:
                    for queued in group:
                        queued.error = Unavailable("the guardian is stopping; retry in a few seconds")
                        queued.done = True
                else:
                    self._commit_group(group)
        if job.error is not None:
            fault = storage_fault(job.error)
            if fault is not None:
                raise fault from job.error
            raise job.error
        return job.result  # type: ignore[return-value]

    def _commit_group(self, group: list[_Job[Any]]) -> None:
        """Run group in one transaction (one savepoint each) and commit once; called with the writer held.

        Every job ends done: with its result, its own error, or (if the transaction as a
        whole failed) the transaction's error, since none of its changes were committed.
        """
        writer = self._writer
        profiled = self.on_group_commit
        started = time.thread_time_ns() if profiled else 0
        try:
            writer.execute("BEGIN IMMEDIATE")
            for job in group:
                writer.execute("SAVEPOINT job")
                self._pending = job.after_commit
                job_started = time.thread_time_ns() if profiled else 0
                try:
                    job.result = job.work(writer)
                except Exception as exc:  # the job's own failure: undo only its changes
                    job.error = exc
                    job.after_commit.clear()
                    if storage_fault(exc) is not None:
                        raise  # the storage failed: SQLite may have ended the transaction; fail the group
                    writer.execute("ROLLBACK TO job")
                finally:
                    self._pending = None
                    if profiled:  # the job's own CPU is its request's (the pipeline measures it)
                        started += time.thread_time_ns() - job_started
                writer.execute("RELEASE job")
            self._end_group(writer)
            writer.execute("COMMIT")
            for job in group:
                _run_all(job.after_commit)
        except BaseException as exc:
            with suppress(Exception):
                writer.execute("ROLLBACK")
            # A storage fault anywhere in the group is what every job of it failed on.
            failure = next((job.error for job in group if job.error and storage_fault(job.error)), exc)
            for job in group:  # nothing of the group was committed
                job.error = job.error or failure
                job.result = None
        finally:
            for job in group:
                job.done = True
            if profiled:
                profiled(time.thread_time_ns() - started)

    def before_each_commit(self, ending: Callable[[Connection], None]) -> None:
        """Run ending in every group commit's transaction, after its jobs (state kept with the requests that
        changed it). A failing ending is logged and undone, never the group's failure."""
        self._group_endings.append(ending)

    def _end_group(self, writer: Any) -> None:
        for ending in self._group_endings:
            writer.execute("SAVEPOINT ending")
            try:
                ending(writer)
            except Exception as exc:
                if storage_fault(exc) is not None:
                    raise  # the storage failed: the group fails with it
                log.exception("work at the end of a group commit failed; its changes are undone")
                writer.execute("ROLLBACK TO ending")
            writer.execute("RELEASE ending")

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run action once the transaction running on the writer now has committed; never if its work rolls back.

        For what mirrors committed rows in memory (the vector index), which must never show
        a change that was not committed. Only from work on the writer (write() or submit()).
        """
        if self._pending is None:
            raise InternalError("after_commit outside a write transaction")
        self._pending.append(action)

    def check_room(self) -> None:
        """Unavailable while free space on the database's filesystem is under min_free_bytes."""
        free = _free_bytes(self.path.parent)
        if free < self.min_free_bytes:
            raise Unavailable(
                "the guardian's disk is nearly full, so writes are paused until space is freed;"
                " reads still work; retry later"
            )

    # -- reading ---------------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """This thread's long-lived read connection, for the duration of the block."""
        with self._gate.shared():
            yield self._reader()

    def _reader(self) -> Any:
        """This thread's reader (called with the gate held shared)."""
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == self._generation:
            return held[1]
        if self._closed:
            raise Unavailable("the guardian is stopping; retry in a few seconds")
        connection = _connect(self.path, self._key_hex)
        connection.execute("PRAGMA query_only = ON")
        self._local.held = (self._generation, connection)
        with self._readers_lock:
            self._readers.append(connection)
        return connection

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """This thread's reader inside one read transaction: every query sees the same committed state."""
        with self.read() as connection:
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
        with self._gate.shared(), self._probe_lock:  # the gate: never a connection while a rekey swaps the file
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
        if free < self.min_free_bytes:
            return f"only {free} bytes free on the database's filesystem (writes pause under {self.min_free_bytes})"
        return "ok"

    def size_bytes(self) -> int:
        """The database file plus its write-ahead log, in bytes."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    # -- copies and keys -------------------------------------------------------------------------

    def backup_to(self, destination: Path) -> None:
        """Copy the committed state, online, into destination (a new file, 0600, the same key).

        One backup step of every page from a connection of its own, inside one read
        transaction: a consistent snapshot, while writers go on (WAL). The copy is left in
        rollback-journal mode, a single self-contained file.
        """
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        with self._gate.shared():
            source = _connect(self.path, self._key_hex)
            try:
                target = _connect(destination, self._key_hex)
                try:
                    source.backup(target)
                    target.execute("PRAGMA journal_mode = DELETE")
                finally:
                    target.close()
            finally:
                source.close()
        fsync_file(destination)
        fsync_dir(destination.parent)

    def encrypted_with(self, key_hex: str) -> bool:
        """Whether the database file is encrypted under key_hex now (compared in constant time)."""
        return hmac.compare_digest(self._key_hex, key_hex)

    def rekey(self, new_key_hex: str) -> None:
        """Re-encrypt the database under new_key_hex (the caller has stored the key durably first).

        Writers wait on the writer lock and readers on the gate while the database is
        exported under the new key into a file beside it, checked, and renamed over it;
        then every connection reopens with the new key. A crash before the rename leaves
        the old file (the old key still opens it); after it, the new one.
        """
        if _HEX_KEY_RE.fullmatch(new_key_hex) is None:
            raise ConfigError("the database key must be 64 lowercase hex characters")
        staged = self.path.with_name(self.path.name + ".rekey")
        with self._write_lock, self._gate.exclusive():
            if self._closed:
                raise Unavailable("the guardian is stopping; retry in a few seconds")
            for leftover in (staged, *sidecars(staged)):
                with suppress(FileNotFoundError):
                    leftover.unlink()
            os.close(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            version = self.schema_version
            writer = self._writer
            writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            # ATTACH takes the path and the key as parameters; the key is validated hex.
            writer.execute("ATTACH DATABASE ? AS rekeyed KEY ?", (str(staged), f"x'{new_key_hex}'"))
            try:
                writer.execute("SELECT sqlcipher_export('rekeyed')").fetchall()
                writer.execute(f"PRAGMA rekeyed.user_version = {int(version)}")
            finally:
                writer.execute("DETACH DATABASE rekeyed")
            check = _connect(staged, new_key_hex)
            try:
                problems = check.execute("PRAGMA quick_check").fetchall()
                if [str(row[0]) for row in problems] != ["ok"]:
                    raise InternalError("the re-encrypted copy failed its check; the database keeps its old key")
            finally:
                check.close()
            fsync_file(staged)
            self._close_connections()
            os.replace(staged, self.path)
            for sidecar in sidecars(self.path):
                with suppress(FileNotFoundError):
                    sidecar.unlink()
            fsync_dir(self.path.parent)
            self._key_hex = new_key_hex
            self._generation += 1
            self._writer = _connect(self.path, new_key_hex)
            self._configure_writer()

    def _close_connections(self) -> None:
        """Close the readers, the probe and the writer (the last close checkpoints the WAL away)."""
        with self._readers_lock:
            for connection in self._readers:
                connection.close()
            self._readers.clear()
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None
        try:
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlcipher3.Error as exc:  # e.g. the disk is full or read-only: the WAL stays, intact
            log.warning("the write-ahead log could not be checkpointed: %s", _sqlite_reason(exc))
        self._writer.close()

    def close(self) -> None:
        """Checkpoint the WAL and close every connection."""
        with self._write_lock, self._gate.exclusive():
            if self._closed:
                return
            self._closed = True
            self._close_connections()


def _run_all(actions: list[Callable[[], None]]) -> None:
    """Run after-commit actions; one that fails is logged and the rest still run (the commit stands)."""
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("an after-commit action failed")


def sidecars(path: Path) -> tuple[Path, Path, Path]:
    """The files SQLite keeps beside a database: its WAL, shared memory and rollback journal."""
    return (
        path.with_name(path.name + "-wal"),
        path.with_name(path.name + "-shm"),
        path.with_name(path.name + "-journal"),
    )


def _sqlite_reason(exc: Exception) -> str:
    """SQLite's own words for a failure (e.g. "database is locked"), without paths."""
    return exc.message if isinstance(exc, ConfigError) else str(exc).split(":")[0][:100]


def _free_bytes(directory: Path) -> int:
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize
