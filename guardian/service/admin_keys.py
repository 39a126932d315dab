"""The admin service's key handlers: list, rotate, re-sign and retire key versions; the audit-signing public keys.

Rotation never needs
downtime: a new HMAC key is stored (guardian/keys/rotated.py) before anything is
signed with it, and every older key still verifies; a database rekey makes
writers wait on the writer and readers on the reader gate while the file is
re-encrypted (guardian/store/database.py), so requests during it are slower, never
refused. Each change runs alone (``Rule.runs_alone``): the request's audit
row follows the change, and a re-sign writes one audit row per batch, in the
batch's transaction. No key material is ever returned or logged (the
audit-signing keys' *public* halves are, by design: anyone may verify with them).

Retiring a key checks first that nothing needs it any more: no memory or vector
signed with a memory key, no token hashed with a token key; for an audit key, a
head signed just then covers every row it sealed (so the public chain proves them
from then on) and no backup in the backup directory holds rows it sealed past that
backup's last signed head; for a database key, neither the database nor any backup
in the backup directory is encrypted under it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Final

from guardian.keys.rotated import AUDIT_SIGNING, RINGS
from guardian.service.admin_backups import backups_paused
from guardian.service.call import Call
from guardian.state.core import GuardianCore
from guardian.store import audit
from guardian.store.backup import BackupDir
from guardian.store.database import Connection
from shared.errors import DataLoss, FailedPrecondition, InvalidArgument
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = [
    "audit_signing_keys",
    "check_retire",
    "check_ring",
    "list_keys",
    "resign_memories",
    "retire_key",
    "rotate_key",
]

security_log = logging.getLogger("agent_guardian.security")

_RESIGN_BATCH: Final = 500
_MAX_FAILED_IDS: Final = 100
#: One rotation, re-sign or retirement at a time (two rotations racing would both be "the newest").
_key_changes = threading.Lock()


def list_keys(
    core: GuardianCore, call: Call, request: pb.ListKeysRequest, connection: Connection
) -> pb.ListKeysResponse:
    """Every key version of every ring, and how much still depends on it; never the key itself."""
    keys = []
    for version in core.keystore.versions():
        in_use = 0
        if version.ring == "memory":
            in_use = core.memories.signed_with(connection, version.key_id)
        elif version.ring == "token":
            in_use = core.agents.tokens_hashed_with(connection, version.key_id, call.now_ms)
        keys.append(
            pb.KeyVersion(
                ring=version.ring,
                key_id=version.key_id,
                source=version.source,
                primary=version.primary,
                retired=version.retired,
                created_at_ms=version.created_at_ms,
                in_use=in_use,
            )
        )
    return pb.ListKeysResponse(keys=keys)


def check_ring(core: GuardianCore, call: Call, request: pb.RotateKeyRequest) -> str:
    """The ring to rotate."""
    ring = call.object_id = _ring(request.ring)
    return ring


def rotate_key(core: GuardianCore, call: Call, ring: str) -> pb.RotateKeyResponse:
    """A new primary key for the ring (the database is re-encrypted in place for its ring)."""
    with _key_changes:
        keys, key_id, previous = core.keystore.rotate(ring, call.now_ms)
        if ring == "database":
            core.database.rekey(keys.database_hex)
        else:
            core.use_keys(keys)
    call.object_id = f"{ring}:{key_id}"
    security_log.warning(
        "key rotated",
        extra={"event": "key_rotated", "ring": ring, "key_id": key_id, "previous_key_id": previous},
    )
    return pb.RotateKeyResponse(ring=ring, key_id=key_id, previous_key_id=previous)


def resign_memories(core: GuardianCore, call: Call, request: pb.ResignMemoriesRequest) -> pb.ResignMemoriesResponse:
    """Sign every memory with the primary memory key, a batch per transaction, each batch audited."""
    memories = core.memories
    resigned, failed, after = 0, [], 0
    with _key_changes:
        key_id = memories.ring.primary_id
        while after >= 0:
            with core.database.write() as connection:
                count, bad, after = memories.resign_batch(connection, after, _RESIGN_BATCH)
                if count:
                    _audit_batch(core, call, connection, key_id, f"ok: {count} memories re-signed")
            resigned += count
            failed += bad
        vectors_resigned = _resign_vectors(core, call, key_id)
    if failed:
        security_log.error(
            "memories that fail verification were left unsigned by the new key",
            extra={"event": "resign_skipped", "failed": len(failed), "first_id": failed[0]},
        )
    call.object_id = f"memory:{key_id}: {resigned} re-signed, {len(failed)} failed; {vectors_resigned} vectors"
    return pb.ResignMemoriesResponse(
        resigned=resigned, failed_ids=failed[:_MAX_FAILED_IDS], failed=len(failed), key_id=key_id
    )


def _audit_batch(core: GuardianCore, call: Call, connection: Connection, key_id: str, reason: str) -> None:
    """The audit row of one re-signed batch, in its transaction."""
    core.audit.record(
        connection,
        ts_ms=call.now_ms,
        agent=call.agent,
        operation="keys.resign.batch",
        object_id=f"memory:{key_id}",
        decision="allow",
        reason=reason,
        policy_version=call.policy.version,
    )


def _resign_vectors(core: GuardianCore, call: Call, key_id: str) -> int:
    """MAC every stored vector with the primary memory key, a batch per transaction, each audited; how many."""
    vectors = core.memories.vectors
    if vectors is None:
        return 0
    resigned, after = 0, 0
    while after >= 0:
        with core.database.write() as connection:
            count, dropped, after = vectors.resign_batch(connection, after, _RESIGN_BATCH)
            if count or dropped:
                reason = f"ok: {count} vectors re-signed, {dropped} failing dropped (embedded again at start)"
                _audit_batch(core, call, connection, key_id, reason)
        resigned += count
    return resigned


@dataclass(frozen=True)
class KeyVersion:
    """A key version a request names."""

    ring: str
    key_id: str


def check_retire(core: GuardianCore, call: Call, request: pb.RetireKeyRequest) -> KeyVersion:
    """The ring and key id to retire."""
    version = KeyVersion(_ring(request.ring), request.key_id)
    call.object_id = f"{version.ring}:{version.key_id}"
    return version


def retire_key(core: GuardianCore, call: Call, version: KeyVersion) -> pb.RetireKeyResponse:
    """Retire a key version nothing depends on any more (see the module docstring)."""
    ring, key_id = version.ring, version.key_id
    with _key_changes, backups_paused():
        core.keystore.check_retirable(ring, key_id)
        if ring == "audit":
            _check_audit_key_unneeded(core, key_id)
        elif ring == "database":
            _check_database_key_unneeded(core, key_id)
        with core.database.read() as reader:
            vectors = core.memories.vectors
            if ring == "memory" and (
                count := core.memories.signed_with(reader, key_id)
                + (vectors.signed_with(reader, key_id) if vectors else 0)
            ):
                raise FailedPrecondition(
                    f"{count} memories or their vectors are still signed with {key_id};"
                    " run guardianctl keys resign first"
                )
            if ring == "token" and (count := core.agents.tokens_hashed_with(reader, key_id, call.now_ms)):
                raise FailedPrecondition(f"{count} agents' tokens were hashed with {key_id}; rotate their tokens first")
        keys = core.keystore.retire(ring, key_id)
        core.use_keys(keys)
    security_log.warning("key retired", extra={"event": "key_retired", "ring": ring, "key_id": key_id})
    return pb.RetireKeyResponse()


def _check_audit_key_unneeded(core: GuardianCore, key_id: str) -> None:
    """FailedPrecondition unless a signed head covers every row key_id sealed, here and in every backup."""
    for _ in range(2):  # a row sealed just before the key stopped being the primary may commit after a head
        try:
            core.sign_audit_head()  # covers every committed row: key_id is not the primary, so no new row needs it
        except DataLoss as broken:
            raise FailedPrecondition(
                f"{key_id} is still needed: the chain cannot be signed ({broken.message})"
            ) from None
        with core.database.write() as connection:  # the writer: every write in flight has committed
            uncovered, covered = audit.sealed_since_last_signed_head(connection, key_id)
        if not uncovered:
            break
    if uncovered:
        raise FailedPrecondition(
            f"{uncovered} audit rows sealed with {key_id} come after the last signed head (row {covered});"
            " only their mac proves them, so the key stays; try again"
        )
    needing = _backups(core).needing_audit_key(core.keystore.keys, key_id)
    if needing:
        more = f" and {len(needing) - 1} more" if len(needing) > 1 else ""
        raise FailedPrecondition(
            f"backup {needing[0]}{more} still needs {key_id}: make a new backup (guardianctl backup create)"
            " and retire it once the older ones are pruned (backup.keep)"
        )


def _check_database_key_unneeded(core: GuardianCore, key_id: str) -> None:
    """FailedPrecondition if the database or a backup in the backup directory is encrypted under key_id."""
    key_hex = core.keystore.database_key(key_id).hex()
    if core.database.encrypted_with(key_hex):
        raise FailedPrecondition(
            f"the database is still encrypted under {key_id} (a rekey did not finish);"
            " run guardianctl keys rotate database first"
        )
    needing = _backups(core).encrypted_with(key_hex)
    if needing:
        more = f" and {len(needing) - 1} more" if len(needing) > 1 else ""
        raise FailedPrecondition(
            f"backup {needing[0]}{more} is encrypted under {key_id} and needs it: make a new backup"
            " (guardianctl backup create) and retire it once the older ones are pruned (backup.keep)"
        )


def _backups(core: GuardianCore) -> BackupDir:
    return BackupDir(core.config.backup_dir, core.config.backup_keep)


def audit_signing_keys(
    core: GuardianCore, call: Call, request: pb.AuditSigningKeysRequest, connection: Connection
) -> pb.AuditSigningKeysResponse:
    """Every audit-signing key version's public key, oldest first, and the heads each signed (never a private key)."""
    ring = core.keystore.keys.audit_signing
    use = audit.signing_key_use(connection)
    keys = []
    for version in core.keystore.versions():
        key = ring.keys.get(version.key_id)
        if version.ring != AUDIT_SIGNING or key is None:
            continue
        signed = use.get(version.key_id)
        keys.append(
            pb.AuditSigningKey(
                key_id=version.key_id,
                public_key=key.public_raw,
                created_at_ms=version.created_at_ms,
                primary=version.primary,
                heads=signed.heads if signed else 0,
                first_seq=signed.first_seq if signed else 0,
                last_seq=signed.last_seq if signed else 0,
                first_ts_ms=signed.first_ts_ms if signed else 0,
                last_ts_ms=signed.last_ts_ms if signed else 0,
            )
        )
    call.object_id = f"{len(keys)} public keys"
    return pb.AuditSigningKeysResponse(keys=keys)


def _ring(value: str) -> str:
    if value not in RINGS:
        raise InvalidArgument(f"ring: expected one of {', '.join(RINGS)}")
    return value
