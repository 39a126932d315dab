"""The admin service's backup handlers: create, list, read and verify backups.

Each runs alone (``Rule.runs_alone``): it reads the database or the backup
directory itself, never holding the writer. Backups live in the
guardian's backup directory (config ``backup.dir``) under names the guardian
issues; no call takes a path. A backup is copied online (writers go on), then
verified, and only a backup that verifies is kept and reported
(guardian/store/backup.py). ``guardianctl backup create PATH`` copies it out with
ReadBackup, piece by piece, as the encrypted bytes it is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from guardian.service.call import Call
from guardian.state.core import GuardianCore
from guardian.store.backup import BackupDir, BackupInfo
from shared.errors import FailedPrecondition
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = [
    "backup_message",
    "backups_paused",
    "check_backup_chunk",
    "check_backup_name",
    "create_backup",
    "list_backups",
    "read_backup",
    "verify_backup",
]

#: One backup at a time: two would only compete for the disk.
_creating = threading.Lock()


@contextmanager
def backups_paused() -> Iterator[None]:
    """No backup is being made while the block runs: it waits for one in progress, and refuses new ones.

    A key's retirement checks the backups in the backup directory under it, so that no backup
    copied from before the check appears after it.
    """
    with _creating:
        yield


def backup_message(info: BackupInfo) -> pb.BackupInfo:
    """The wire form of a backup and its check."""
    check = info.check
    head = check.audit_head
    return pb.BackupInfo(
        name=info.name,
        bytes=info.size,
        sha256=info.sha256,
        created_at_ms=info.created_at_ms,
        memories=info.memories,
        audit_head=pb.ChainHead(seq=head.seq, mac=head.mac) if head else None,
        check=pb.BackupCheck(
            integrity=check.integrity,
            cipher_integrity=check.cipher_integrity,
            memories_checked=check.memories_checked,
            memories_failed=list(check.memories_failed),
            audit_rows_checked=check.audit_rows_checked,
            audit=check.audit,
            ok=check.ok,
            vectors_checked=check.vectors_checked,
            vectors_failed=list(check.vectors_failed),
        ),
    )


def _backups(core: GuardianCore) -> BackupDir:
    return BackupDir(core.config.backup_dir, core.config.backup_keep)


def create_backup(core: GuardianCore, call: Call, request: pb.CreateBackupRequest) -> pb.BackupInfo:
    """Copy the database online, verify the copy, keep it (and the newest backup.keep of them)."""
    if not _creating.acquire(blocking=False):
        raise FailedPrecondition("a backup is already being made; try again when it is done")
    try:
        info = _backups(core).create(core.database, core.keystore.keys, call.now_ms)
    finally:
        _creating.release()
    call.object_id = f"{info.name} sha256 {info.sha256[:32]}"
    return backup_message(info)


def list_backups(core: GuardianCore, call: Call, request: pb.ListBackupsRequest) -> pb.ListBackupsResponse:
    """The backups kept, each with its check."""
    backups = _backups(core)
    return pb.ListBackupsResponse(backups=[backup_message(backups.describe(name)) for name in backups.names()])


def check_backup_name(core: GuardianCore, call: Call, request: pb.ReadBackupRequest | pb.VerifyBackupRequest) -> str:
    """The name of a backup, of the shape the guardian issues (checked before anything is read)."""
    _backups(core).path_of(request.name)
    call.object_id = request.name
    return request.name


def check_backup_chunk(core: GuardianCore, call: Call, request: pb.ReadBackupRequest) -> pb.ReadBackupRequest:
    """A backup's name, and the offset to read from."""
    check_backup_name(core, call, request)
    call.object_id = f"{request.name} at {request.offset}"
    return request


def read_backup(core: GuardianCore, call: Call, request: pb.ReadBackupRequest) -> pb.BackupChunk:
    """One piece of a backup's encrypted bytes."""
    data, size = _backups(core).read(request.name, request.offset)
    return pb.BackupChunk(data=data, eof=request.offset + len(data) >= size, size=size)


def verify_backup(core: GuardianCore, call: Call, name: str) -> pb.VerifyBackupResponse:
    """Check a kept backup again, as a restore would."""
    info = _backups(core).verify(name, core.keystore.keys)
    call.object_id = f"{info.name}: {'ok' if info.check.ok else info.check.problem[:150]}"
    return pb.VerifyBackupResponse(backup=backup_message(info))
