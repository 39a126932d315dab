"""Backups: online, encrypted copies of the database, verified before anyone relies on them.

- :func:`verify_file` checks a database file with the guardian's keys: SQLite's
  ``integrity_check``, SQLCipher's ``cipher_integrity_check`` (every page's
  HMAC), every memory's content digest and HMAC, and the audit chain.
- :class:`BackupDir` is the guardian's backup directory: :meth:`BackupDir.create`
  copies the live database (SQLite's backup API on a snapshot of its own, while
  writes go on), verifies the copy, and only then gives it its final name and
  deletes the oldest generations beyond ``backup.keep``. A copy that fails is
  deleted and the call fails: a backup that is reported exists and verified.
  Names are issued by the guardian (``memory-YYYYmmddTHHMMSSmmmZ-xxxx.db``); no
  call names a path.
- :func:`restore` (``guardianctl backup restore``, offline, with the keys)
  verifies a backup, keeps the database it replaces beside it, puts the backup
  in place with the old file's owner and mode, and appends an audit row that
  records the restore and the chain head it replaced (so the rollback of the
  trail is itself on the trail), then re-publishes the head.

A backup stays encrypted with the database key in use when it was made; after
a database key rotation, older backups need the older key, which the key store
keeps (guardian/keys/rotated.py) until no backup here needs it
(:meth:`BackupDir.encrypted_with`). Likewise a backup's audit rows need the audit
key that sealed them until a signed head in that backup covers them
(:meth:`BackupDir.needing_audit_key`).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import sqlcipher3

from guardian.files.durable import fsync_dir
from guardian.keys.ring import Keys
from guardian.store.audit import AuditTrail, ChainHead, HeadFile, read_head, sealed_since_last_signed_head
from guardian.store.database import Database, open_keyed, sidecars
from guardian.store.memories import MemoryStore
from guardian.store.vectors import verify_stored
from shared.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "BACKUP_NAME_RE",
    "BackupDir",
    "BackupInfo",
    "CheckReport",
    "RestoreReport",
    "restore",
    "verify_file",
]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

BACKUP_NAME_RE: Final = re.compile(r"memory-[0-9]{8}T[0-9]{9}Z-[0-9a-f]{4}\.db")
#: The largest piece ReadBackup returns.
CHUNK_BYTES: Final = 1024 * 1024
_MAX_FAILED_IDS: Final = 100
#: Who the audit trail names for a restore (offline, by someone holding the keys).
RESTORE_CALLER: Final = "@restore"


@dataclass(frozen=True)
class CheckReport:
    """What verifying one database file found."""

    integrity: str
    cipher_integrity: str
    memories_checked: int
    memories_failed: tuple[str, ...]
    memories_failed_count: int
    audit_rows_checked: int
    audit: str
    audit_head: ChainHead | None
    vectors_checked: int = 0
    #: Vectors whose HMAC does not verify (the ids of their memories, at most 100), and how many.
    vectors_failed: tuple[str, ...] = ()
    vectors_failed_count: int = 0

    @property
    def ok(self) -> bool:
        """Whether every check held."""
        return (
            self.integrity == "ok"
            and self.cipher_integrity == "ok"
            and not self.memories_failed_count
            and not self.vectors_failed_count
            and self.audit == "ok"
        )

    @property
    def problem(self) -> str:
        """The first problem, for a person; "" when ok."""
        if self.integrity != "ok":
            return f"integrity check: {self.integrity}"
        if self.cipher_integrity != "ok":
            return f"cipher integrity check: {self.cipher_integrity}"
        if self.memories_failed_count:
            return f"{self.memories_failed_count} memories fail their HMAC or digest (first: {self.memories_failed[0]})"
        if self.vectors_failed_count:
            return f"{self.vectors_failed_count} vectors fail their HMAC (first of memory {self.vectors_failed[0]})"
        if self.audit != "ok":
            return f"audit chain: {self.audit}"
        return ""


@dataclass(frozen=True)
class BackupInfo:
    """One backup file and what its verification found."""

    name: str
    path: Path
    size: int
    sha256: str
    created_at_ms: int
    memories: int
    check: CheckReport


def verify_file(path: Path, keys: Keys, published: Iterable[ChainHead] = ()) -> CheckReport:
    """Check the database file at path with keys (see the module docstring). Never changes it.

    Raises ConfigError when no known database key opens it.
    """
    connection, _ = open_keyed(path, keys.database_hexes)
    unreadable = "not checked: the file cannot be read past its damage"
    integrity = cipher = audit_state = unreadable
    checked, failed, rows, head = 0, ["(unreadable)"], 0, None
    vectors_checked, vectors_failed = 0, ["(unreadable)"]
    try:
        connection.execute("PRAGMA query_only = ON")
        cipher_rows = connection.execute("PRAGMA cipher_integrity_check").fetchall()
        cipher = "ok" if not cipher_rows else "; ".join(str(row[0]) for row in cipher_rows[:5])
        integrity = "; ".join(str(row[0]) for row in connection.execute("PRAGMA integrity_check").fetchall())
        checked, failed = MemoryStore(keys.memory).verify_all(connection)
        vectors_checked, vectors_failed = verify_stored(connection, keys.memory)
        report = AuditTrail(keys.audit, signing=keys.audit_signing).verify(connection, published)
        rows, head, audit_state = report.rows_checked, report.head, "ok" if report.intact else report.problem
    except sqlcipher3.Error as exc:  # a damaged page stops SQLite mid-check: what ran so far stands
        problem = f"the file is damaged ({str(exc).split(':')[0][:100]})"
        integrity = problem if integrity == unreadable else integrity
        cipher = problem if cipher == unreadable else cipher
    finally:
        connection.close()
    return CheckReport(
        integrity=integrity[:500],
        cipher_integrity=cipher[:500],
        memories_checked=checked,
        memories_failed=tuple(failed[:_MAX_FAILED_IDS]),
        memories_failed_count=len(failed),
        audit_rows_checked=rows,
        audit=audit_state,
        audit_head=head,
        vectors_checked=vectors_checked,
        vectors_failed=tuple(vectors_failed[:_MAX_FAILED_IDS]),
        vectors_failed_count=len(vectors_failed),
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


class BackupDir:
    """The guardian's backup directory: verified generations, the newest kept."""

    def __init__(self, directory: Path, keep: int) -> None:
        self.directory = directory
        self.keep = keep

    def create(self, database: Database, keys: Keys, now_ms: int) -> BackupInfo:
        """Copy database online, verify the copy, name it, and prune old generations."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = datetime.datetime.fromtimestamp(now_ms / 1000, tz=datetime.UTC)
        name = f"memory-{stamp:%Y%m%dT%H%M%S}{now_ms % 1000:03d}Z-{secrets.token_hex(2)}.db"
        final = self.directory / name
        staged = self.directory / f".{name}.partial"
        try:
            database.backup_to(staged)
            check = verify_file(staged, keys)
            if not check.ok:
                security_log.error(
                    "a backup failed its verification and was deleted",
                    extra={"event": "backup_failed", "backup": name, "problem": check.problem[:200]},
                )
                raise FailedPrecondition(f"the backup failed its verification ({check.problem}); nothing was kept")
            os.replace(staged, final)
            fsync_dir(self.directory)
        finally:
            with suppress(FileNotFoundError):
                staged.unlink()
        info = self._info(final, check)
        self.prune()
        return info

    def _info(self, path: Path, check: CheckReport) -> BackupInfo:
        return BackupInfo(
            name=path.name,
            path=path,
            size=path.stat().st_size,
            sha256=_file_sha256(path),
            created_at_ms=_created_ms(path.name),
            memories=check.memories_checked,  # every memory, whatever its status, was checked
            check=check,
        )

    def names(self) -> list[str]:
        """Backup names, newest first."""
        if not self.directory.is_dir():
            return []
        found = [entry.name for entry in self.directory.iterdir() if BACKUP_NAME_RE.fullmatch(entry.name)]
        return sorted(found, reverse=True)

    def prune(self) -> list[str]:
        """Delete the generations beyond keep, oldest first; their names."""
        removed = self.names()[self.keep :]
        for name in removed:
            with suppress(FileNotFoundError):
                (self.directory / name).unlink()
        if removed:
            fsync_dir(self.directory)
            log.info("old backups deleted", extra={"event": "backups_pruned", "removed": len(removed)})
        return removed

    def path_of(self, name: str) -> Path:
        """The file of the backup called name; NotFound if there is none."""
        if BACKUP_NAME_RE.fullmatch(name) is None:
            raise InvalidArgument("name: not a backup name this guardian issues (see guardianctl backup list)")
        path = self.directory / name
        if not path.is_file():
            raise NotFound(f"no backup named {name}")
        return path

    def verify(self, name: str, keys: Keys) -> BackupInfo:
        """Verify one backup again."""
        path = self.path_of(name)
        try:
            check = verify_file(path, keys)
        except ConfigError:
            raise FailedPrecondition(f"{name} cannot be opened with any of the guardian's database keys") from None
        return self._info(path, check)

    def describe(self, name: str) -> BackupInfo:
        """A backup's name, size and time, without reading it (a listing)."""
        path = self.path_of(name)
        blank = CheckReport("", "", 0, (), 0, 0, "", None)
        return BackupInfo(name, path, path.stat().st_size, "", _created_ms(name), 0, blank)

    def encrypted_with(self, key_hex: str) -> list[str]:
        """The backups (newest first) that the database key key_hex opens: they need it."""
        needing = []
        for name in self.names():
            try:
                connection, _ = open_keyed(self.directory / name, [key_hex])
            except ConfigError:
                continue
            connection.close()
            needing.append(name)
        return needing

    def needing_audit_key(self, keys: Keys, key_id: str) -> list[str]:
        """Why backups (newest first) still need audit key key_id: rows it sealed that no signed head in them covers.

        A backup no database key opens is named too: whether it needs the key cannot be told.
        """
        needing = []
        for name in self.names():
            try:
                connection, _ = open_keyed(self.directory / name, keys.database_hexes)
            except ConfigError:
                needing.append(f"{name} (no database key opens it, so what it needs cannot be told)")
                continue
            try:
                connection.execute("PRAGMA query_only = ON")
                uncovered, covered = sealed_since_last_signed_head(connection, key_id)
            except sqlcipher3.Error:
                uncovered, covered = -1, 0
            finally:
                connection.close()
            if uncovered < 0:
                needing.append(f"{name} (its audit rows cannot be read)")
            elif uncovered:
                needing.append(
                    f"{name} (holds {uncovered} rows sealed with {key_id} after its last signed head, row {covered})"
                )
        return needing

    def read(self, name: str, offset: int) -> tuple[bytes, int]:
        """Up to CHUNK_BYTES of a backup from offset, and the file's size."""
        path = self.path_of(name)
        size = path.stat().st_size
        if offset > size:
            raise InvalidArgument(f"offset: {offset} is past the end of the backup ({size} bytes)")
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read(CHUNK_BYTES), size


def _created_ms(name: str) -> int:
    stamp = datetime.datetime.strptime(name[7:22], "%Y%m%dT%H%M%S").replace(tzinfo=datetime.UTC)
    return int(stamp.timestamp()) * 1000 + int(name[22:25])


@dataclass(frozen=True)
class RestoreReport:
    """What a restore did."""

    check: CheckReport
    #: Where the database it replaced now is (None when there was none).
    replaced: Path | None
    #: The chain head of the database it replaced, and of the restored one after the restore row.
    replaced_head: ChainHead | None
    head: ChainHead


def restore(
    backup: Path, database_path: Path, keys: Keys, *, head_file: HeadFile, policy_version: str, now_ms: int
) -> RestoreReport:
    """Put a verified backup in place of database_path (the guardian must be stopped: the caller checks).

    The backup is copied next to the database and the copy verified, so what is checked is
    what goes in place. The replaced database (and its WAL) is kept as
    ``<name>.replaced-<time>``.
    """
    staged = database_path.with_name(database_path.name + ".restoring")
    for leftover in (staged, *sidecars(staged)):
        with suppress(FileNotFoundError):
            leftover.unlink()
    shutil.copyfile(backup, staged)
    os.chmod(staged, 0o600)
    try:
        check = verify_file(staged, keys)
    except ConfigError:
        staged.unlink()
        raise FailedPrecondition("the backup cannot be opened with any of the guardian's database keys") from None
    if not check.ok:
        staged.unlink()
        raise FailedPrecondition(f"the backup failed its verification ({check.problem}); nothing was changed")
    replaced: Path | None = None
    replaced_head: ChainHead | None = None
    # Whoever runs the restore (root), the files stay the guardian's: the old database's owner.
    owner = database_path.stat() if database_path.exists() else database_path.parent.stat()
    os.chown(staged, owner.st_uid, owner.st_gid)
    if database_path.exists():
        with suppress(ConfigError):
            replaced_head = _head_of(database_path, keys)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_ms / 1000))
        replaced = database_path.with_name(f"{database_path.name}.replaced-{stamp}")
        for source, target in zip(
            (database_path, *sidecars(database_path)), (replaced, *sidecars(replaced)), strict=True
        ):
            with suppress(FileNotFoundError):
                os.replace(source, target)
    os.replace(staged, database_path)
    fsync_dir(database_path.parent)
    database = Database(database_path, keys.database_hexes)
    try:
        with database.write() as connection:
            was = f"seq {replaced_head.seq} mac {replaced_head.mac}" if replaced_head else "no database"
            head = AuditTrail(keys.audit).record(
                connection,
                ts_ms=now_ms,
                agent=RESTORE_CALLER,
                operation="admin.backup.restore",
                object_id=f"backup sha256 {_file_sha256(backup)[:32]}",
                decision="allow",
                reason=f"ok: restored; the replaced chain head was {was}"[:200],
                policy_version=policy_version,
            )
    finally:
        database.close()
    head_file.write(head)
    for path in (database_path, *sidecars(database_path), head_file.path):
        with suppress(FileNotFoundError):
            os.chown(path, owner.st_uid, owner.st_gid)
    security_log.warning(
        "database restored from a backup; the audit chain now continues from the backup's head",
        extra={
            "event": "database_restored",
            "replaced_seq": replaced_head.seq if replaced_head else 0,
            "seq": head.seq,
            "mac": head.mac,
        },
    )
    return RestoreReport(check=check, replaced=replaced, replaced_head=replaced_head, head=head)


def _head_of(path: Path, keys: Keys) -> ChainHead | None:
    connection, _ = open_keyed(path, keys.database_hexes)
    try:
        return read_head(connection)
    finally:
        connection.close()
