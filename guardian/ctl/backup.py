"""``guardianctl backup``: make, list, copy out, verify and restore backups.

- ``create [PATH]``: the running guardian copies its database online into its
  backup directory and verifies the copy (integrity, cipher integrity, every
  memory's HMAC, the audit chain) before it answers; with PATH the verified
  backup is also copied out to PATH (the encrypted bytes, checked against the
  guardian's sha256). Over the admin socket.
- ``list``: the guardian's backups, newest first. Over the admin socket.
- ``verify NAME``: the guardian verifies one of its backups again (admin socket).
  ``verify PATH`` (a file path, containing ``/``) checks a copy elsewhere,
  offline, with the keys: run it as root with ``--config``.
- ``restore PATH``: offline, as root, with the guardian stopped: verifies the
  backup, keeps the replaced database beside it, puts the backup in place and
  records the restore in the audit trail.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Final

from guardian.ctl.connection import call
from guardian.ctl.output import when
from guardian.keys.rotated import load_all_keys
from guardian.policy.compile import load_policy
from guardian.state.config import GuardianConfig, load_config
from guardian.state.statedir import lock_state_dir
from guardian.store.audit import HeadFile
from guardian.store.backup import RestoreReport, restore, verify_file
from shared.errors import ConfigError, GuardianError
from shared.rpc.guardian.v1 import admin_pb2

__all__ = ["DEFAULT_CONFIG", "add_backup_commands"]

#: Calls one AdminService method: (parsed arguments, method name, request) -> response.

#: The config the offline commands read when --config is not given (the systemd deployment's).
DEFAULT_CONFIG: Final = "/etc/agent-guardian/config.yaml"


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "bytes": info.bytes,
        "sha256": info.sha256,
        "created": when(info.created_at_ms),
        "memories": info.memories,
        "audit_head_seq": info.audit_head.seq,
        "ok": info.check.ok,
        "integrity": info.check.integrity,
        "cipher_integrity": info.check.cipher_integrity,
        "memories_checked": info.check.memories_checked,
        "memories_failed": list(info.check.memories_failed),
        "vectors_checked": info.check.vectors_checked,
        "vectors_failed": list(info.check.vectors_failed),
        "audit_rows_checked": info.check.audit_rows_checked,
        "audit": info.check.audit,
    }


def _print_check(info: dict[str, Any]) -> None:
    print(
        f"  integrity {info['integrity']}; cipher integrity {info['cipher_integrity']};"
        f" {info['memories_checked']} memory HMACs checked, {len(info['memories_failed'])} failed;"
        f" {info['vectors_checked']} vector HMACs checked, {len(info['vectors_failed'])} failed;"
        f" audit chain {info['audit']} ({info['audit_rows_checked']} rows)"
    )


def cmd_backup_create(args: argparse.Namespace) -> int:
    """guardianctl backup create [PATH]."""
    target = Path(args.path) if args.path else None
    if target is not None and (target.exists() or target.is_symlink()):
        raise ConfigError(f"{target} already exists; choose a new path (a backup never overwrites a file)")
    info = call(args, "CreateBackup", admin_pb2.CreateBackupRequest())
    if target is not None:
        _copy_out(args, info, target)
    row = _info_dict(info)
    if args.json:
        print(json.dumps(row | {"copied_to": str(target) if target else None}))
        return 0
    print(f"backup {info.name}: {info.bytes} bytes, {info.memories} memories, verified")
    _print_check(row)
    if target is not None:
        print(f"copied to {target} (sha256 {info.sha256})")
    return 0


def _copy_out(args: argparse.Namespace, info: Any, target: Path) -> None:
    """Copy a backup out piece by piece into target (via a partial file), checking its sha256."""
    partial = target.with_name(f".{target.name}.partial")
    digest = hashlib.sha256()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            offset = 0
            while True:
                chunk = call(args, "ReadBackup", admin_pb2.ReadBackupRequest(name=info.name, offset=offset))
                handle.write(chunk.data)
                digest.update(chunk.data)
                offset += len(chunk.data)
                if chunk.eof or not chunk.data:
                    break
            handle.flush()
            os.fsync(handle.fileno())
        if digest.hexdigest() != info.sha256:
            raise ConfigError(f"the copy of {info.name} does not match its sha256; nothing was written to {target}")
        os.link(partial, target)  # never over an existing file
    finally:
        partial.unlink(missing_ok=True)


def cmd_backup_list(args: argparse.Namespace) -> int:
    """guardianctl backup list."""
    response = call(args, "ListBackups", admin_pb2.ListBackupsRequest())
    rows = [{"name": b.name, "bytes": b.bytes, "created": when(b.created_at_ms)} for b in response.backups]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':<40} {'CREATED':<21} {'BYTES':>12}")
    for row in rows:
        print(f"{row['name']:<40} {row['created']:<21} {row['bytes']:>12}")
    return 0


def _offline_config(args: argparse.Namespace) -> GuardianConfig:
    return load_config(Path(args.config or DEFAULT_CONFIG))


def cmd_backup_verify(args: argparse.Namespace) -> int:
    """guardianctl backup verify NAME|PATH."""
    if "/" not in args.backup:
        info = call(args, "VerifyBackup", admin_pb2.VerifyBackupRequest(name=args.backup)).backup
        row = _info_dict(info)
    else:
        path = Path(args.backup)
        if not path.is_file():
            raise ConfigError(f"{path} is not a file")
        config = _offline_config(args)
        check = verify_file(path, _keys(config))
        row = {
            "name": str(path),
            "ok": check.ok,
            "integrity": check.integrity,
            "cipher_integrity": check.cipher_integrity,
            "memories_checked": check.memories_checked,
            "memories_failed": list(check.memories_failed),
            "vectors_checked": check.vectors_checked,
            "vectors_failed": list(check.vectors_failed),
            "audit_rows_checked": check.audit_rows_checked,
            "audit": check.audit,
        }
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{row['name']}: {'verified' if row['ok'] else 'FAILS verification'}")
        _print_check(row)
    return 0 if row["ok"] else 1


def _keys(config: GuardianConfig) -> Any:
    try:
        return load_all_keys(config.keys_dir, config.state_dir)
    except ConfigError as error:
        raise ConfigError(
            f"{error.message}. Checking or restoring a backup file needs the guardian's keys: run as root,"
            " with --config naming the guardian's config.yaml"
        ) from None


def cmd_backup_restore(args: argparse.Namespace) -> int:
    """guardianctl backup restore PATH (offline)."""
    backup = Path(args.backup)
    if not backup.is_file():
        raise ConfigError(f"{backup} is not a file")
    config = _offline_config(args)
    keys = _keys(config)
    lock = lock_state_dir(config.state_dir)  # refuses while the guardian runs
    try:
        policy_version = load_policy(config.policy).version
        now_ms = datetime.datetime.now(tz=datetime.UTC).timestamp()
        report = _restore(backup, config, keys, policy_version, int(now_ms * 1000))
    finally:
        os.close(lock)
    if args.json:
        print(
            json.dumps(
                {
                    "restored": str(backup),
                    "replaced": str(report.replaced) if report.replaced else None,
                    "replaced_head_seq": report.replaced_head.seq if report.replaced_head else 0,
                    "head_seq": report.head.seq,
                    "memories_checked": report.check.memories_checked,
                }
            )
        )
        return 0
    print(f"restored {backup} into {config.database}")
    print(
        f"  verified: {report.check.memories_checked} memory HMACs, {report.check.vectors_checked} vector HMACs,"
        f" {report.check.audit_rows_checked} audit rows"
    )
    if report.replaced is not None:
        print(f"  the database it replaced is kept as {report.replaced}")
    print(f"  audit chain: now at row {report.head.seq} (the restore is recorded there); start the guardian again")
    return 0


def _restore(backup: Path, config: GuardianConfig, keys: Any, policy_version: str, now_ms: int) -> RestoreReport:
    try:
        head_file = HeadFile(config.state_dir / "audit-head.json")
        return restore(backup, config.database, keys, head_file=head_file, policy_version=policy_version, now_ms=now_ms)
    except GuardianError as error:
        raise ConfigError(error.message) from None


def add_backup_commands(commands: Any) -> None:
    """Register ``backup create|list|verify|restore`` under the top-level subcommands."""
    backup = commands.add_parser("backup", help="make, list, copy out, verify and restore backups")
    actions = backup.add_subparsers(dest="backup_command", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="make a verified backup now (kept by the guardian; with PATH also copied there)",
        description="The guardian copies its database online into its backup directory (config backup.dir),"
        " verifies the copy and deletes the oldest beyond backup.keep. With PATH the verified backup is also"
        " copied to PATH (encrypted; a new file, never overwritten).",
    )
    create.add_argument("path", nargs="?", help="also copy the backup to this new file")
    create.set_defaults(func=cmd_backup_create)
    listing = actions.add_parser("list", help="the guardian's backups, newest first")
    listing.set_defaults(func=cmd_backup_list)
    verify = actions.add_parser(
        "verify",
        help="verify a backup (NAME: by the guardian; PATH: offline, as root, with --config)",
        description="NAME (from `backup list`): the running guardian verifies it again. PATH (a path with a '/',"
        " e.g. ./copy.db): checked here with the guardian's keys, so run it as root with --config. Exit 1 if it"
        " fails verification.",
    )
    verify.add_argument("backup", metavar="NAME|PATH")
    verify.set_defaults(func=cmd_backup_verify)
    restore_parser = actions.add_parser(
        "restore",
        help="put a backup in place of the database (offline: stop the guardian first; as root)",
        description="Verifies the backup, keeps the current database beside it as memory.db.replaced-TIME,"
        " puts the backup in place with the same owner and mode, and records the restore (and the chain head it"
        f" replaced) in the audit trail. Needs the keys: run as root. Reads --config (default {DEFAULT_CONFIG})."
        " Refuses while the guardian runs.",
    )
    restore_parser.add_argument("backup", metavar="PATH")
    restore_parser.set_defaults(func=cmd_backup_restore)
