"""Key versions the guardian makes itself, so keys rotate online; merged with the base keys.

The base keys (guardian/keys/ring.py) come from systemd credentials or the key
directory, which the guardian can only read in production. ``guardianctl keys
rotate RING`` asks the running guardian for a new version of one ring
(``memory``, ``audit`` or ``token`` HMAC keys, or the ``database`` key). The
guardian generates it, wraps it with AES-256-GCM under a key-encryption key
derived by HKDF-SHA256 from the base ``db.key``, and adds it to
``rotated-keys.json`` in its state directory (0600, written to a temporary file,
fsynced, renamed) *before* anything is signed or encrypted with it.

Merging, when the guardian starts and after each rotation:

- a ring holds its base keys and its rotated versions (retired ones left out);
  every key in it verifies, one signs: the newest rotated version, unless the
  base ring's primary has changed since that version was made (an operator
  edited the credential file afterwards: the operator's key wins);
- the database keys are tried newest first when the file is opened, so a
  rekey cut short by a crash still opens (with the previous key).

Rotated key ids are ``r1``, ``r2``, ... per ring; a base key id of that form is a
configuration error. Audit keys are never retired (they verify the chain's past
rows) and neither are database keys (older backups need them); memory and token
keys may be retired once nothing still depends on them (the caller checks).

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
from shared.errors import ConfigError, FailedPrecondition, InvalidArgument

__all__ = ["RINGS", "KeyStore", "KeyVersion", "Ring", "load_all_keys"]

Ring = Literal["memory", "audit", "token", "database"]
RINGS: Final[tuple[Ring, ...]] = ("memory", "audit", "token", "database")
FILE_NAME: Final = "rotated-keys.json"
_FORMAT: Final = 1
_KEK_INFO: Final = b"agent-guardian rotated-keys v1"
_ROTATED_ID_RE: Final = re.compile(r"r[0-9]{1,15}")
#: What the database's base key is called in listings (its file has no key id).
BASE_DATABASE_ID: Final = "base"
_NEVER_RETIRED: Final[dict[str, str]] = {
    "audit": "audit keys are never retired: they verify the audit chain's past rows",
    "database": "database keys are never retired: backups made before a rekey need them",
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
        database = [version.key for version in rotated if version.ring == "database"]
        history = (*reversed(database), base.database)
        return Keys(
            database=history[0],
            memory=merged["memory"],
            audit=merged["audit"],
            token=merged["token"],
            database_history=history,
        )

    def versions(self) -> list[KeyVersion]:
        """Every key version, ring by ring, base ones first, then rotated ones oldest first (retired too)."""
        found: list[KeyVersion] = []
        for name in RINGS:
            primary = self._primary_id(name)
            base_ids = [BASE_DATABASE_ID] if name == "database" else list(getattr(self._base, name).keys)
            found += [KeyVersion(name, key_id, "base", key_id == primary, False, 0) for key_id in base_ids]
            found += [
                KeyVersion(name, v.key_id, "rotated", v.key_id == primary, v.retired, v.created_at_ms)
                for v in self._rotated
                if v.ring == name
            ]
        return found

    # -- changing ------------------------------------------------------------------------------

    def rotate(self, ring: str, now_ms: int) -> tuple[Keys, str, str]:
        """Make and store a new version of ring; (the merged keys, its id, the id it replaces as primary)."""
        checked = _ring(ring)
        with self._lock:
            previous = self._primary_id(checked)
            taken = [int(v.key_id[1:]) for v in self._rotated if v.ring == checked]
            key_id = f"r{max(taken, default=0) + 1}"
            base_primary = BASE_DATABASE_ID if checked == "database" else getattr(self._base, checked).primary_id
            version = _Rotated(checked, key_id, now_ms, base_primary, secrets.token_bytes(32))
            rotated = (*self._rotated, version)
            keys = self._merge(rotated)
            self._write(rotated)
            self._rotated, self.keys = rotated, keys
            return keys, key_id, previous

    def check_retirable(self, ring: str, key_id: str) -> None:
        """FailedPrecondition unless key_id is a rotated, non-primary memory or token key (usage aside)."""
        checked = _ring(ring)
        if checked in _NEVER_RETIRED:
            raise FailedPrecondition(_NEVER_RETIRED[checked])
        if key_id == self._primary_id(checked):
            raise FailedPrecondition(f"{key_id} signs new {checked} data; rotate first, then retire it")
        if not any(v.ring == checked and v.key_id == key_id for v in self._rotated):
            raise FailedPrecondition(
                f"{key_id!r} is not a key the guardian rotated in; base keys are retired by editing their file"
            )

    def retire(self, ring: str, key_id: str) -> Keys:
        """Stop a rotated memory or token key verifying (the caller checked nothing needs it)."""
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
            return next((v.key_id for v in reversed(self._rotated) if v.ring == "database"), BASE_DATABASE_ID)
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
