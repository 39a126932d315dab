"""The audit-signing key: Ed25519 key versions the guardian holds, and the public key file anyone verifies with.

The guardian makes every version itself (the first at its first start, another with
``guardianctl keys rotate audit-signing``) and keeps each 32-byte private key wrapped in
``rotated-keys.json`` like its rotated HMAC keys (guardian/keys/rotated.py); there is no
credential file for it. The newest version signs the audit chain heads; older versions
are never retired, so their public keys keep verifying the heads they signed. No private
key is ever returned, logged or written in clear.

The public key file (``guardianctl keys public`` writes it, ``guardianctl audit verify
--public-key`` reads it) is UTF-8 text, one key a line::

    <key id> ed25519 <public key>

where the public key is the 32-byte Ed25519 public key of RFC 8032 (the raw encoding), in
standard base64 with padding (44 characters). Blank lines and lines starting with ``#`` are
comments. A key id appears once.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import ConfigError, FailedPrecondition

__all__ = [
    "ALGORITHM",
    "SigningKey",
    "SigningRing",
    "format_public_keys",
    "new_private_key",
    "parse_public_keys",
    "public_key_text",
    "verify_signature",
]

#: The one signature algorithm, as the public key file and the export name it.
ALGORITHM: Final = "ed25519"
_KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_SIGNATURE_RE: Final = re.compile(r"[0-9a-f]{128}")
_MAX_KEYS: Final = 10_000


def new_private_key() -> bytes:
    """A fresh Ed25519 private key, as its 32 raw bytes (to be stored wrapped, never shown)."""
    return Ed25519PrivateKey.generate().private_bytes_raw()


@dataclass(frozen=True)
class SigningKey:
    """One audit-signing key version."""

    key_id: str
    created_at_ms: int
    private: Ed25519PrivateKey = field(repr=False, compare=False)

    @classmethod
    def from_private_bytes(cls, key_id: str, created_at_ms: int, raw: bytes) -> SigningKey:
        """The version whose private key is raw (32 bytes)."""
        return cls(key_id, created_at_ms, Ed25519PrivateKey.from_private_bytes(raw))

    @property
    def public(self) -> Ed25519PublicKey:
        """Its public key."""
        return self.private.public_key()

    @property
    def public_raw(self) -> bytes:
        """Its public key's 32 raw bytes (RFC 8032)."""
        return self.public.public_bytes_raw()


@dataclass(frozen=True)
class SigningRing:
    """Every audit-signing key version; the primary signs, all of them verify. Empty before the first start."""

    primary_id: str = ""
    keys: Mapping[str, SigningKey] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    def __post_init__(self) -> None:
        if self.primary_id and self.primary_id not in self.keys:
            raise ValueError("the primary signing key id must be one of the ring's keys")

    def sign(self, message: bytes) -> tuple[str, str]:
        """The primary's Ed25519 signature of message: (key id, 128 lowercase hex digits)."""
        if not self.primary_id:
            raise FailedPrecondition("the guardian holds no audit-signing key yet; it makes one when it starts")
        return self.primary_id, self.keys[self.primary_id].private.sign(message).hex()

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every version's public key, by key id."""
        return {key_id: key.public for key_id, key in self.keys.items()}

    def __repr__(self) -> str:
        return f"SigningRing(primary_id={self.primary_id!r}, key_ids={sorted(self.keys)!r})"


def verify_signature(public: Ed25519PublicKey, signature_hex: str, message: bytes) -> bool:
    """Whether signature_hex (128 lowercase hex digits) is public's Ed25519 signature of message."""
    if _SIGNATURE_RE.fullmatch(signature_hex) is None:
        return False
    try:
        public.verify(bytes.fromhex(signature_hex), message)
    except InvalidSignature:
        return False
    return True


def public_key_text(public_raw: bytes) -> str:
    """A public key as the file and the export write it: base64 of its 32 raw bytes."""
    return base64.b64encode(public_raw).decode("ascii")


def format_public_keys(entries: Iterable[tuple[str, bytes, str]]) -> str:
    """The public key file for (key id, raw public key, comment) entries; each comment goes on a # line above."""
    lines = ["# agent-guardian audit-signing public keys: <key id> ed25519 <base64 of the raw 32-byte key>"]
    for key_id, public_raw, comment in entries:
        if comment:
            lines.append(f"# {comment}")
        lines.append(f"{key_id} {ALGORITHM} {public_key_text(public_raw)}")
    return "\n".join(lines) + "\n"


def parse_public_keys(text: str, source: str) -> dict[str, Ed25519PublicKey]:
    """The keys of a public key file (see the module docstring); ConfigError naming the line otherwise."""
    found: dict[str, Ed25519PublicKey] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {number}"
        parts = line.split()
        if len(parts) != 3 or parts[1] != ALGORITHM or _KEY_ID_RE.fullmatch(parts[0]) is None:
            raise ConfigError(f"{where}: expected '<key id> {ALGORITHM} <base64 public key>'")
        key_id, _, encoded = parts
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: the public key is not base64") from None
        if len(raw) != 32:
            raise ConfigError(f"{where}: an Ed25519 public key is 32 bytes (44 base64 characters), not {len(raw)}")
        if key_id in found:
            raise ConfigError(f"{where}: key id {key_id!r} appears twice")
        if len(found) >= _MAX_KEYS:
            raise ConfigError(f"{source}: more than {_MAX_KEYS} keys")
        try:
            found[key_id] = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            raise ConfigError(f"{where}: not an Ed25519 public key") from None
    if not found:
        raise ConfigError(f"{source}: holds no public key (expected lines '<key id> {ALGORITHM} <base64 public key>')")
    return found
