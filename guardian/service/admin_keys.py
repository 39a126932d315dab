"""The admin service's key handlers: list, rotate, re-sign and retire key versions.

Rotation never needs
downtime: a new HMAC key is stored (guardian/keys/rotated.py) before anything is
signed with it, and every older key still verifies; a database rekey makes
writers wait on the writer and readers on the reader gate while the file is
re-encrypted (guardian/store/database.py), so requests during it are slower, never
refused. Each change runs alone (``Rule.runs_alone``): the request's audit
row follows the change, and a re-sign writes one audit row per batch, in the
batch's transaction. No key material is ever returned or logged.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Final

from guardian.keys.rotated import RINGS
from guardian.service.call import Call
from guardian.state.core import GuardianCore
from guardian.store.database import Connection
from shared.errors import FailedPrecondition, InvalidArgument
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = ["check_retire", "check_ring", "list_keys", "resign_memories", "retire_key", "rotate_key"]

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
    """Retire a key version nothing depends on any more (nothing signed or hashed with it)."""
    ring, key_id = version.ring, version.key_id
    with _key_changes:
        core.keystore.check_retirable(ring, key_id)
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


def _ring(value: str) -> str:
    if value not in RINGS:
        raise InvalidArgument(f"ring: expected one of {', '.join(RINGS)}")
    return value
