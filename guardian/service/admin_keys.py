"""The admin service's key handlers: list, rotate, re-sign and retire key versions.

Part of :class:`guardian.service.admin_service.AdminHandlers`. Rotation never needs
downtime: a new HMAC key is stored (guardian/keys/rotated.py) before anything is
signed with it, and every older key still verifies; a database rekey makes
writers wait on the writer and readers on the reader gate while the file is
re-encrypted (guardian/store/database.py), so requests during it are slower, never
refused. Each of these runs alone (``Rule.runs_alone``): the request's audit
row follows the change, and a re-sign writes one audit row per batch, in the
batch's transaction. No key material is ever returned or logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from guardian.keys.rotated import RINGS
from guardian.service.pipeline import Call
from guardian.state.core import GuardianCore
from guardian.store.database import Connection
from shared.errors import FailedPrecondition, InvalidArgument
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = ["KeyHandlers"]

security_log = logging.getLogger("agent_guardian.security")

Work = Callable[[Connection], Any]
_RESIGN_BATCH: Final = 500
_MAX_FAILED_IDS: Final = 100
#: One rotation, re-sign or retirement at a time (two rotations racing would both be "the newest").
_key_changes = threading.Lock()


class KeyHandlers:
    """ListKeys, RotateKey, ResignMemories, RetireKey."""

    _core: GuardianCore

    def ListKeys(self, call: Call, request: pb.ListKeysRequest) -> Work:
        def work(connection: Connection) -> pb.ListKeysResponse:
            keys = []
            for version in self._core.keystore.versions():
                in_use = 0
                if version.ring == "memory":
                    in_use = self._core.memories.signed_with(connection, version.key_id)
                elif version.ring == "token":
                    in_use = self._core.agents.tokens_hashed_with(connection, version.key_id, call.now_ms)
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

        return work

    def RotateKey(self, call: Call, request: pb.RotateKeyRequest) -> Work:
        ring = _ring(request.ring)
        call.object_id = ring

        def work(_: Connection) -> pb.RotateKeyResponse:
            with _key_changes:
                keys, key_id, previous = self._core.keystore.rotate(ring, call.now_ms)
                if ring == "database":
                    self._core.database.rekey(keys.database_hex)
                else:
                    self._core.use_keys(keys)
            call.object_id = f"{ring}:{key_id}"
            security_log.warning(
                "key rotated",
                extra={"event": "key_rotated", "ring": ring, "key_id": key_id, "previous_key_id": previous},
            )
            return pb.RotateKeyResponse(ring=ring, key_id=key_id, previous_key_id=previous)

        return work

    def ResignMemories(self, call: Call, request: pb.ResignMemoriesRequest) -> Work:
        def work(_: Connection) -> pb.ResignMemoriesResponse:
            memories = self._core.memories
            resigned, failed, after = 0, [], 0
            with _key_changes:
                key_id = memories.ring.primary_id
                while after >= 0:
                    with self._core.database.write() as connection:
                        count, bad, after = memories.resign_batch(connection, after, _RESIGN_BATCH)
                        if count:
                            self._core.audit.record(
                                connection,
                                ts_ms=call.now_ms,
                                agent=call.agent,
                                operation="keys.resign.batch",
                                object_id=f"memory:{key_id}",
                                decision="allow",
                                reason=f"ok: {count} memories re-signed",
                                policy_version=call.policy.version,
                            )
                    resigned += count
                    failed += bad
            if failed:
                security_log.error(
                    "memories that fail verification were left unsigned by the new key",
                    extra={"event": "resign_skipped", "failed": len(failed), "first_id": failed[0]},
                )
            call.object_id = f"memory:{key_id}: {resigned} re-signed, {len(failed)} failed"
            return pb.ResignMemoriesResponse(
                resigned=resigned, failed_ids=failed[:_MAX_FAILED_IDS], failed=len(failed), key_id=key_id
            )

        return work

    def RetireKey(self, call: Call, request: pb.RetireKeyRequest) -> Work:
        ring = _ring(request.ring)
        key_id = request.key_id
        call.object_id = f"{ring}:{key_id}"

        def work(_: Connection) -> pb.RetireKeyResponse:
            with _key_changes:
                self._core.keystore.check_retirable(ring, key_id)
                with self._core.database.read() as reader:
                    if ring == "memory" and (count := self._core.memories.signed_with(reader, key_id)):
                        raise FailedPrecondition(
                            f"{count} memories are still signed with {key_id}; run guardianctl keys resign first"
                        )
                    if ring == "token" and (count := self._core.agents.tokens_hashed_with(reader, key_id, call.now_ms)):
                        raise FailedPrecondition(
                            f"{count} agents' tokens were hashed with {key_id}; rotate their tokens first"
                        )
                keys = self._core.keystore.retire(ring, key_id)
                self._core.use_keys(keys)
            security_log.warning("key retired", extra={"event": "key_retired", "ring": ring, "key_id": key_id})
            return pb.RetireKeyResponse()

        return work


def _ring(value: str) -> str:
    if value not in RINGS:
        raise InvalidArgument(f"ring: expected one of {', '.join(RINGS)}")
    return value
