"""The admin service's backup handlers: create, list, read and verify backups.

Part of :class:`guardian.service.admin_service.AdminHandlers`. Backups live in the
guardian's backup directory (config ``backup.dir``) under names the guardian
issues; no call takes a path. A backup is copied online (writers go on), then
verified, and only a backup that verifies is kept and reported
(guardian/store/backup.py). ``guardianctl backup create PATH`` copies it out with
ReadBackup, piece by piece, as the encrypted bytes it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from guardian.service.pipeline import Call
from guardian.state.core import GuardianCore
from guardian.store.backup import BackupDir, BackupInfo
from guardian.store.database import Connection
from shared.errors import FailedPrecondition
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = ["BackupHandlers", "backup_message"]

Work = Callable[[Connection], Any]
#: One backup at a time: two would only compete for the disk.
_creating = threading.Lock()


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
        ),
    )


class BackupHandlers:
    """CreateBackup, ListBackups, ReadBackup, VerifyBackup."""

    _core: GuardianCore

    @property
    def _backups(self) -> BackupDir:
        return BackupDir(self._core.config.backup_dir, self._core.config.backup_keep)

    def CreateBackup(self, call: Call, request: pb.CreateBackupRequest) -> Work:
        def work(_: Connection) -> pb.BackupInfo:
            if not _creating.acquire(blocking=False):
                raise FailedPrecondition("a backup is already being made; try again when it is done")
            try:
                info = self._backups.create(self._core.database, self._core.keystore.keys, call.now_ms)
            finally:
                _creating.release()
            call.object_id = f"{info.name} sha256 {info.sha256[:32]}"
            return backup_message(info)

        return work

    def ListBackups(self, call: Call, request: pb.ListBackupsRequest) -> Work:
        def work(_: Connection) -> pb.ListBackupsResponse:
            backups = self._backups
            return pb.ListBackupsResponse(backups=[backup_message(backups.describe(name)) for name in backups.names()])

        return work

    def ReadBackup(self, call: Call, request: pb.ReadBackupRequest) -> Work:
        backups = self._backups
        backups.path_of(request.name)  # the name's shape, checked before anything is read
        call.object_id = f"{request.name} at {request.offset}"

        def work(_: Connection) -> pb.BackupChunk:
            data, size = backups.read(request.name, request.offset)
            return pb.BackupChunk(data=data, eof=request.offset + len(data) >= size, size=size)

        return work

    def VerifyBackup(self, call: Call, request: pb.VerifyBackupRequest) -> Work:
        backups = self._backups
        backups.path_of(request.name)
        call.object_id = request.name

        def work(_: Connection) -> pb.VerifyBackupResponse:
            info = backups.verify(request.name, self._core.keystore.keys)
            call.object_id = f"{info.name}: {'ok' if info.check.ok else info.check.problem[:150]}"
            return pb.VerifyBackupResponse(backup=backup_message(info))

        return work
