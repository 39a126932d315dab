"""Key versions the guardian makes itself, so keys rotate online; merged with the base keys.

The base keys (guardian/keys/ring.py) come from systemd credentials or the key
directory, which the guardian can only read in production. ``guardianctl keys
rotate RING`` asks the running guardian for a new version of one ring
(``memory``, ``audit`` or ``token`` HMAC keys, the ``database`` key, or the
Ed25519 ``audit-signing`` key). The guardian generates it, wraps it with
AES-256-GCM under a key-encryption key derived by HKDF-SHA256 from the base
``db.key``, and adds it to ``rotated-keys.json`` in its state directory (0600,
written to a temporary file, fsynced, renamed) *before* anything is signed or
encrypted with it. The audit-signing ring has no base key: the guardian makes its
first version when it first starts (:meth:`KeyStore.ensure_audit_signing`), so an
existing install gains it with no new credential.

Merging, when the guardian starts and after each rotation:

- a ring holds its base keys and its rotated versions (retired ones left out);
  every key in it verifies, one signs: the newest rotated version, unless the
  base ring's primary has changed since that version was made (an operator
  edited the credential file afterwards: the operator's key wins);
- the database keys are tried newest first when the file is opened, so a
  rekey cut short by a crash still opens (with the previous key).

Rotated key ids are ``r1``, ``r2``, ... per ring; a base key id of that form is a
configuration error. A rotated key that is not the primary may be retired once
nothing needs it, which the caller checks (guardian/service/admin_keys.py): a
memory key once no memory or vector is signed with it, a token key once no token
was hashed with it, an audit key once a signed head covers every row it sealed
(the public chain proves those rows from then on), a database key once neither the
database nor any backup in the backup directory is encrypted under it.
Audit-signing keys are never retired: their public keys verify the heads they
signed. Retiring leaves the wrapped key in the file, marked retired (an operator
who finds an old copy that needs it can unmark it); it is no longer used.

The file holds no key in clear: without the base ``db.key`` it is useless, and
with it, it is as protected as the base keys themselves. Keep it with the
database's backups' keys: a backup made after a database rekey needs it.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from guardian.files.durable import replace_atomically
from guardian.keys.ring import KeyRing, Keys, load_keys
from guardian.keys.signing import SigningKey, SigningRing, new_private_key
from shared.errors import ConfigError, FailedPrecondition, InvalidArgument

__all__ = ["AUDIT_SIGNING", "RINGS", "KeyStore", "KeyVersion", "Ring", "load_all_keys"]

Ring = Literal["memory", "audit", "token", "database", "audit-signing"]
RINGS: Final[tuple[Ring, ...]] = ("memory", "audit", "token", "database", "audit-signing")
#: The ring of the Ed25519 key that signs the audit chain's heads.
AUDIT_SIGNING: Final = "audit-signing"
FILE_NAME: Final = "rotated-keys.json"
_FORMAT: Final = 1
_KEK_INFO: Final = b"agent-guardian rotated-keys v1"
_ROTATED_ID_RE: Final = re.compile(r"r[0-9]{1,15}")
#: What the database's base key is called in listings (its file has no key id).
BASE_DATABASE_ID: Final = "base"
#: What a rotated audit-signing version records as the base primary (the ring has no base keys).
_NO_BASE: Final = "none"
_NEVER_RETIRED: Final[dict[str, str]] = {
    AUDIT_SIGNING: "audit-signing keys are never retired: their public keys verify the heads they signed",
}


@dataclass(frozen=True)
class KeyVersion:
    """One key version as listings show it (never the key itself)."""

    ring: Ring
    key_id: str
    #: "base" (credentials or key dir) or "rotated" (made by the guardian).
    source: str
    primary: bool
    retired: bool
    created_at_ms: int


@dataclass(frozen=True)
class _Rotated:
    ring: Ring
    key_id: str
    created_at_ms: int
    #: The base ring's primary key id when this version was made.
    base_primary: str
    key: bytes
    retired: bool = False


def load_all_keys(keys_dir: Path, state_dir: Path) -> Keys:
    """The base keys merged with the guardian's rotated versions (see the module docstring)."""
    return KeyStore(state_dir / FILE_NAME, load_keys(keys_dir)).keys


class KeyStore:
    """The rotated key versions in one state directory, and the key set they make with the base keys."""

    def __init__(self, path: Path, base: Keys) -> None:
        self._path = path
        self._base = base
        self._aead = AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEK_INFO).derive(base.database))
        self._lock = threading.Lock()
        self._rotated = self._read()
        self.keys = self._merge(self._rotated)

    # -- reading and merging ---------------------------------------------------------------------

    def _read(self) -> tuple[_Rotated, ...]:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return ()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self._path}: cannot be read as JSON ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("keys"), list):
            raise ConfigError(f"{self._path}: not a rotated-keys file of format {_FORMAT}")
        return tuple(self._unwrap(entry, index) for index, entry in enumerate(data["keys"]))

    def _unwrap(self, entry: Any, index: int) -> _Rotated:
        where = f"{self._path} keys[{index}]"
        try:
            ring, key_id = entry["ring"], entry["id"]
            if ring not in RINGS or not isinstance(key_id, str) or _ROTATED_ID_RE.fullmatch(key_id) is None:
                raise ValueError
            nonce = base64.b64decode(entry["nonce"], validate=True)
            wrapped = base64.b64decode(entry["wrapped"], validate=True)
            created, base_primary, retired = int(entry["created_at_ms"]), str(entry["base_primary"]), entry["retired"]
            if not isinstance(retired, bool):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{where}: malformed entry") from None
        try:
            key = self._aead.decrypt(nonce, wrapped, _aad(ring, key_id))
        except InvalidTag:
            raise ConfigError(
                f"{where}: does not unwrap with the key derived from db.key (was db.key replaced? the rotated"
                " keys were made under the original one)"
            ) from None
        if len(key) != 32:
            raise ConfigError(f"{where}: not a 32-byte key")
        return _Rotated(ring, key_id, created, base_primary, key, retired)

    def _merge(self, rotated: tuple[_Rotated, ...]) -> Keys:
        base = self._base
        rings = {"memory": base.memory, "audit": base.audit, "token": base.token}
        merged: dict[str, KeyRing] = {}
        for name, ring in rings.items():
            keys = dict(ring.keys)
            primary = ring.primary_id
            for version in rotated:
                if version.ring != name:
                    continue
                if version.key_id in ring.keys:
                    raise ConfigError(f"{name}.keys: key id {version.key_id!r} is also a rotated key's id; rename it")
                if version.retired:
                    continue
                keys[version.key_id] = version.key
                if version.base_primary == ring.primary_id:
                    primary = version.key_id
            merged[name] = KeyRing(primary_id=primary, keys=MappingProxyType(keys))
        database = [version.key for version in rotated if version.ring == "database" and not version.retired]
        history = (*reversed(database), base.database)
        signing = [v for v in rotated if v.ring == AUDIT_SIGNING and not v.retired]
        return Keys(
            database=history[0],
            memory=merged["memory"],
            audit=merged["audit"],
            token=merged["token"],
            database_history=history,
            audit_signing=SigningRing(
                primary_id=signing[-1].key_id if signing else "",
                keys=MappingProxyType(
                    {v.key_id: SigningKey.from_private_bytes(v.key_id, v.created_at_ms, v.key) for v in signing}
                ),
            ),
        )

    def versions(self) -> list[KeyVersion]:
        """Every key version, ring by ring, base ones first, then rotated ones oldest first (retired too)."""
        found: list[KeyVersion] = []
        for name in RINGS:
            primary = self._primary_id(name)
            base_ids = self._base_ids(name)
            found += [KeyVersion(name, key_id, "base", key_id == primary, False, 0) for key_id in base_ids]
            found += [
                KeyVersion(name, v.key_id, "rotated", v.key_id == primary, v.retired, v.created_at_ms)
                for v in self._rotated
                if v.ring == name
            ]
        return found

    def _base_ids(self, ring: Ring) -> list[str]:
        if ring == "database":
            return [BASE_DATABASE_ID]
        if ring == AUDIT_SIGNING:
            return []
        return list(getattr(self._base, ring).keys)

    def database_key(self, key_id: str) -> bytes:
        """A database key version by id, for the guardian's own checks (never shown, sent or logged)."""
        if key_id == BASE_DATABASE_ID:
            return self._base.database
        for version in self._rotated:
            if version.ring == "database" and version.key_id == key_id:
                return version.key
        raise FailedPrecondition(f"{key_id!r} is not a database key version (see guardianctl keys list)")

    # -- changing ------------------------------------------------------------------------------

    def ensure_audit_signing(self, now_ms: int) -> str | None:
        """Make the first audit-signing key if there is none yet; its id, or None if one existed."""
        with self._lock:
            if any(v.ring == AUDIT_SIGNING and not v.retired for v in self._rotated):
                return None
        _, key_id, _ = self.rotate(AUDIT_SIGNING, now_ms)
        return key_id

    def rotate(self, ring: str, now_ms: int) -> tuple[Keys, str, str]:
        """Make and store a new version of ring; (the merged keys, its id, the id it replaces as primary)."""
        checked = _ring(ring)
        with self._lock:
            previous = self._primary_id(checked)
            taken = [int(v.key_id[1:]) for v in self._rotated if v.ring == checked]
            key_id = f"r{max(taken, default=0) + 1}"
            base_primary = self._base_primary(checked)
            secret = new_private_key() if checked == AUDIT_SIGNING else secrets.token_bytes(32)
            version = _Rotated(checked, key_id, now_ms, base_primary, secret)
            rotated = (*self._rotated, version)
            keys = self._merge(rotated)
            self._write(rotated)
            self._rotated, self.keys = rotated, keys
            return keys, key_id, previous

    def _base_primary(self, ring: Ring) -> str:
        if ring == "database":
            return BASE_DATABASE_ID
        if ring == AUDIT_SIGNING:
            return _NO_BASE
        primary: str = getattr(self._base, ring).primary_id
        return primary

    def check_retirable(self, ring: str, key_id: str) -> None:
        """FailedPrecondition unless key_id is a rotated, non-primary key of a ring that retires (usage aside)."""
        checked = _ring(ring)
        if checked in _NEVER_RETIRED:
            raise FailedPrecondition(_NEVER_RETIRED[checked])
        if checked == "database" and key_id == BASE_DATABASE_ID:
            raise FailedPrecondition("the base database key (db.key) is never retired: it also wraps the rotated keys")
        if key_id == self._primary_id(checked):
            doing = "encrypts the database" if checked == "database" else f"signs new {checked} data"
            raise FailedPrecondition(f"{key_id} {doing}; rotate first, then retire it")
        if not any(v.ring == checked and v.key_id == key_id for v in self._rotated):
            raise FailedPrecondition(
                f"{key_id!r} is not a key the guardian rotated in; base keys are retired by editing their file"
            )

    def retire(self, ring: str, key_id: str) -> Keys:
        """Stop a rotated key verifying (or, for the database, being tried); the caller checked nothing needs it."""
        with self._lock:
            self.check_retirable(ring, key_id)
            rotated = tuple(
                replace(v, retired=True) if v.ring == ring and v.key_id == key_id else v for v in self._rotated
            )
            keys = self._merge(rotated)
            self._write(rotated)
            self._rotated, self.keys = rotated, keys
            return keys

    def _primary_id(self, ring: Ring) -> str:
        if ring == "database":
            newest = (v.key_id for v in reversed(self._rotated) if v.ring == "database" and not v.retired)
            return next(newest, BASE_DATABASE_ID)
        if ring == AUDIT_SIGNING:
            return self.keys.audit_signing.primary_id
        primary: str = getattr(self.keys, ring).primary_id
        return primary

    def _write(self, rotated: tuple[_Rotated, ...]) -> None:
        entries = []
        for version in rotated:
            nonce = secrets.token_bytes(12)
            entries.append(
                {
                    "ring": version.ring,
                    "id": version.key_id,
                    "created_at_ms": version.created_at_ms,
                    "base_primary": version.base_primary,
                    "retired": version.retired,
                    "nonce": base64.b64encode(nonce).decode(),
                    "wrapped": base64.b64encode(
                        self._aead.encrypt(nonce, version.key, _aad(version.ring, version.key_id))
                    ).decode(),
                }
            )
        replace_atomically(self._path, json.dumps({"format": _FORMAT, "keys": entries}, indent=1) + "\n")


def _ring(value: str) -> Ring:
    for ring in RINGS:
        if value == ring:
            return ring
    raise InvalidArgument(f"ring: expected one of {', '.join(RINGS)}")


def _aad(ring: str, key_id: str) -> bytes:
    return f"agent-guardian rotated key {ring}/{key_id}".encode()
