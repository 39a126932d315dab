"""The guardian's keys: loaded once at start, validated, never logged or sent.

Four secrets, each in its own file so each can be rotated alone:

- ``db.key``: 64 hex characters, the SQLCipher raw key.
- ``memory.keys``, ``audit.keys``, ``token.keys``: key rings, one key a line
  as ``<key id> <64 hex characters>``; the last line is the primary (signs),
  every line verifies. Key ids are 1-16 letters or digits.

In production the files come from systemd credentials (``$CREDENTIALS_DIRECTORY``,
via ``LoadCredential=``/``LoadCredentialEncrypted=``); otherwise from a key
directory that must be mode 0700 with 0600 files owned by the guardian's user.
Never from the environment.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from guardian.keys.signing import SigningRing
from shared.errors import ConfigError

__all__ = ["KeyRing", "Keys", "create_keys", "load_keys"]

_HEX_KEY_RE: Final = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9]{1,16}")
_RING_NAMES: Final = ("memory.keys", "audit.keys", "token.keys")


@dataclass(frozen=True)
class KeyRing:
    """Versioned keys of one purpose: sign with the primary, verify with any."""

    primary_id: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.primary_id not in self.keys:
            raise ValueError("the primary key id must be one of the ring's keys")

    @property
    def primary(self) -> bytes:
        """The key that signs new data."""
        return self.keys[self.primary_id]

    def sign(self, message: bytes) -> tuple[str, str]:
        """HMAC-SHA256 of message with the primary: (key id, hex digest)."""
        return self.primary_id, hmac.new(self.primary, message, "sha256").hexdigest()

    def verify(self, key_id: str, message: bytes, digest_hex: str) -> bool:
        """Whether digest_hex is the HMAC of message under key key_id (constant time)."""
        key = self.keys.get(key_id)
        if key is None:
            return False
        return hmac.compare_digest(hmac.new(key, message, "sha256").hexdigest(), digest_hex)

    def __repr__(self) -> str:
        return f"KeyRing(primary_id={self.primary_id!r}, key_ids={sorted(self.keys)!r})"


@dataclass(frozen=True)
class Keys:
    """All the guardian's keys."""

    database: bytes = field(repr=False)
    memory: KeyRing
    audit: KeyRing
    token: KeyRing
    #: Every database key, the one in use (:attr:`database`) first, then older ones, newest
    #: first (after a rotation, guardian/keys/rotated.py); empty means just :attr:`database`.
    database_history: tuple[bytes, ...] = field(default=(), repr=False)
    #: The Ed25519 audit-signing key versions (guardian/keys/signing.py): made by the guardian and
    #: kept in rotated-keys.json, so empty in the base keys.
    audit_signing: SigningRing = field(default_factory=SigningRing)

    @property
    def database_hex(self) -> str:
        """The database key as 64 lowercase hex characters, for ``PRAGMA key``."""
        return self.database.hex()

    @property
    def database_hexes(self) -> tuple[str, ...]:
        """Every database key as hex, the one in use first (the database opens with the first that fits)."""
        return tuple(key.hex() for key in self.database_history) or (self.database_hex,)


def load_keys(keys_dir: Path) -> Keys:
    """Load and validate every key, from systemd credentials if present, else keys_dir."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    source = Path(credentials) if credentials else keys_dir
    if not credentials:
        _check_private_dir(keys_dir)
    database = _parse_hex_key(_read_secret(source / "db.key", check_mode=not credentials), "db.key")
    rings = [_parse_ring(_read_secret(source / name, check_mode=not credentials), name) for name in _RING_NAMES]
    return Keys(database=database, memory=rings[0], audit=rings[1], token=rings[2])


def create_keys(keys_dir: Path) -> list[Path]:
    """Create any missing key file (0600 in a 0700 dir); never overwrites one. Returns those created."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(keys_dir, 0o700)
    created: list[Path] = []
    contents = {"db.key": secrets.token_hex(32) + "\n"}
    contents.update({name: f"k1 {secrets.token_hex(32)}\n" for name in _RING_NAMES})
    for name, text in contents.items():
        path = keys_dir / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        created.append(path)
    return created


def _check_private_dir(path: Path) -> None:
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"the key directory {path} cannot be read: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the key directory {path} is not a directory")
    if info.st_mode & 0o077 or info.st_uid != os.geteuid():
        raise ConfigError(
            f"the key directory {path} must be owned by this user with mode 0700"
            f" (it is {stat.S_IMODE(info.st_mode):04o}); fix with: chmod 0700 {path}"
        )


def _read_secret(path: Path, check_mode: bool) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"the key file {path} cannot be read: {exc.strerror}") from exc
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if check_mode and (info.st_mode & 0o077 or info.st_uid != os.geteuid()):
            raise ConfigError(
                f"the key file {path} must be owned by this user with mode 0600"
                f" (it is {stat.S_IMODE(info.st_mode):04o}); fix with: chmod 0600 {path}"
            )
        return handle.read(4096)


def _parse_hex_key(text: str, name: str) -> bytes:
    value = text.strip()
    if _HEX_KEY_RE.fullmatch(value) is None:
        raise ConfigError(f"{name}: expected 64 lowercase hex characters (a 32-byte key)")
    return bytes.fromhex(value)


def _parse_ring(text: str, name: str) -> KeyRing:
    keys: dict[str, bytes] = {}
    primary = ""
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or _KEY_ID_RE.fullmatch(parts[0]) is None:
            raise ConfigError(f"{name} line {number}: expected '<key id> <64 hex characters>'")
        if parts[0] in keys:
            raise ConfigError(f"{name} line {number}: key id {parts[0]!r} appears twice")
        keys[parts[0]] = _parse_hex_key(parts[1], f"{name} line {number}")
        primary = parts[0]
    if not keys:
        raise ConfigError(f"{name}: holds no key")
    return KeyRing(primary_id=primary, keys=MappingProxyType(keys))
