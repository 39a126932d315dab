"""Signed admin requests: the message a person signs, in the SSHSIG format OpenSSH uses.

Every admin request carries, in its gRPC metadata, a timestamp, a nonce and a
signature over this message (version 1; NEVER CHANGE IT, add a version)::

    agent-guardian admin request v1\\n
    method <the gRPC method path, e.g. /guardian.v1.AdminService/ApplyPolicy>\\n
    timestamp_ms <milliseconds since the epoch, decimal>\\n
    nonce <32 lowercase hex characters, fresh for each request>\\n
    request_sha256 <SHA-256 of the request message's exact bytes, lowercase hex>\\n

The signature is an SSH signature (OpenSSH's PROTOCOL.sshsig) by an Ed25519 key in
the namespace :data:`NAMESPACE`: what an ``ssh-agent`` makes from the key it holds,
what ``ssh-keygen -Y sign -n agent-guardian-admin`` makes from a key file, and what
``ssh-keygen -Y check-novalidate`` verifies. The namespace keeps a signature made
for the guardian from being taken for any other use of the same key (and the other
way round). The blob names its public key; the guardian looks the person up by the
key's fingerprint (``SHA256:`` and the unpadded base64 of the key blob's SHA-256,
as ``ssh-keygen -l`` prints it).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.errors import InvalidArgument, Unauthenticated

__all__ = [
    "NAMESPACE",
    "NONCE_METADATA_KEY",
    "NONCE_RE",
    "SIGNATURE_METADATA_KEY",
    "TIMESTAMP_METADATA_KEY",
    "PublicKey",
    "Signer",
    "SshSignature",
    "request_message",
    "signed_metadata",
    "sshsig_blob",
    "sshsig_signed_data",
]

#: The SSHSIG namespace of agent-guardian admin requests.
NAMESPACE: Final = "agent-guardian-admin"
#: gRPC metadata keys (a "-bin" key carries bytes).
SIGNATURE_METADATA_KEY: Final = "x-guardian-signature-bin"
TIMESTAMP_METADATA_KEY: Final = "x-guardian-timestamp-ms"
NONCE_METADATA_KEY: Final = "x-guardian-nonce"
NONCE_RE: Final = re.compile(r"[0-9a-f]{32}")

_MESSAGE_TAG: Final = "agent-guardian admin request v1"
_MAGIC: Final = b"SSHSIG"
_SSHSIG_VERSION: Final = 1
_KEY_TYPE: Final = b"ssh-ed25519"
_HASHES: Final = {b"sha512": hashlib.sha512, b"sha256": hashlib.sha256}
#: An SSHSIG blob of an Ed25519 key is 166 bytes; anything much larger is not one.
_MAX_BLOB: Final = 1024


def request_message(method: str, timestamp_ms: int, nonce: str, request: bytes) -> bytes:
    """The bytes a person signs for one admin request (format version 1, above)."""
    return (
        f"{_MESSAGE_TAG}\n"
        f"method {method}\n"
        f"timestamp_ms {timestamp_ms}\n"
        f"nonce {nonce}\n"
        f"request_sha256 {hashlib.sha256(request).hexdigest()}\n"
    ).encode("ascii")


def _string(value: bytes) -> bytes:
    """An SSH wire-format string: a 32-bit big-endian length, then the bytes."""
    return struct.pack(">I", len(value)) + value


def sshsig_signed_data(message: bytes, hash_name: bytes = b"sha512") -> bytes:
    """What the key itself signs for message (PROTOCOL.sshsig): the namespace and the message's hash."""
    digest = _HASHES[hash_name](message).digest()
    return _MAGIC + _string(NAMESPACE.encode()) + _string(b"") + _string(hash_name) + _string(digest)


def sshsig_blob(public_blob: bytes, signature_blob: bytes) -> bytes:
    """The SSHSIG blob: the public key, the namespace, the hash and the key's signature (SSH wire form)."""
    return (
        _MAGIC
        + struct.pack(">I", _SSHSIG_VERSION)
        + _string(public_blob)
        + _string(NAMESPACE.encode())
        + _string(b"")
        + _string(b"sha512")
        + _string(signature_blob)
    )


@dataclass(frozen=True)
class PublicKey:
    """A person's Ed25519 public key, as OpenSSH writes it."""

    #: The key blob in SSH wire form (string "ssh-ed25519", string 32 bytes).
    blob: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """A key from its OpenSSH one-line form (``ssh-ed25519 AAAA... [comment]``); InvalidArgument otherwise."""
        parts = text.strip().split()
        if len(parts) < 2 or parts[0] != _KEY_TYPE.decode():
            raise InvalidArgument(
                "public_key: expected an OpenSSH Ed25519 public key ('ssh-ed25519 AAAA...',"
                " as in ~/.ssh/id_ed25519.pub)"
            )
        try:
            blob = base64.b64decode(parts[1], validate=True)
        except ValueError:
            raise InvalidArgument("public_key: the key's base64 does not decode") from None
        key = cls(blob)
        key.raw()  # checks the blob's form
        return key

    def raw(self) -> bytes:
        """The 32 bytes of the Ed25519 key; InvalidArgument when the blob is not an Ed25519 key."""
        reader = _Reader(self.blob, "public_key")
        if reader.string() != _KEY_TYPE:
            raise InvalidArgument("public_key: only Ed25519 keys are accepted")
        raw = reader.string()
        reader.end()
        if len(raw) != 32:
            raise InvalidArgument("public_key: an Ed25519 key is 32 bytes")
        return raw

    @property
    def openssh(self) -> str:
        """The OpenSSH one-line form, without a comment."""
        return f"{_KEY_TYPE.decode()} {base64.b64encode(self.blob).decode()}"

    @property
    def fingerprint(self) -> str:
        """``SHA256:`` and the unpadded base64 of the blob's SHA-256, as ``ssh-keygen -l`` prints it."""
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether signature is this key's Ed25519 signature over data."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw()).verify(signature, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SshSignature:
    """A parsed SSHSIG blob (PROTOCOL.sshsig) of an Ed25519 key in this namespace."""

    public_key: PublicKey
    hash_name: bytes
    #: The raw 64-byte Ed25519 signature.
    signature: bytes

    @classmethod
    def parse(cls, blob: bytes) -> SshSignature:
        """Parse blob; Unauthenticated saying what is wrong when it is not an SSHSIG blob of ours."""
        if len(blob) > _MAX_BLOB or not blob.startswith(_MAGIC):
            raise Unauthenticated("the request's signature is not an SSH signature (SSHSIG)")
        reader = _Reader(blob[len(_MAGIC) :], "signature")
        try:
            version = reader.uint32()
            public_blob = reader.string()
            namespace = reader.string()
            reader.string()  # reserved
            hash_name = reader.string()
            signature_blob = reader.string()
            reader.end()
            if version != _SSHSIG_VERSION:
                raise InvalidArgument(f"signature: SSHSIG version {version} is not supported")
            if namespace != NAMESPACE.encode():
                raise InvalidArgument(f"signature: made for another use (its namespace is not {NAMESPACE!r})")
            if hash_name not in _HASHES:
                raise InvalidArgument("signature: its hash must be sha512 or sha256")
            key = PublicKey(public_blob)
            key.raw()
            inner = _Reader(signature_blob, "signature")
            if inner.string() != _KEY_TYPE:
                raise InvalidArgument("signature: only Ed25519 signatures are accepted")
            raw_signature = inner.string()
            inner.end()
            if len(raw_signature) != 64:
                raise InvalidArgument("signature: an Ed25519 signature is 64 bytes")
        except InvalidArgument as malformed:
            raise Unauthenticated(f"the request's {malformed.message}") from None
        return cls(key, hash_name, raw_signature)

    def verifies(self, message: bytes) -> bool:
        """Whether this is a signature over message by its key."""
        return self.public_key.verify(self.signature, sshsig_signed_data(message, self.hash_name))


class _Reader:
    """Reads SSH wire-format fields from bytes, refusing anything short or left over."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._at = 0
        self._what = what

    def uint32(self) -> int:
        if self._at + 4 > len(self._data):
            raise InvalidArgument(f"{self._what}: truncated")
        (value,) = struct.unpack_from(">I", self._data, self._at)
        self._at += 4
        return int(value)

    def string(self) -> bytes:
        length = self.uint32()
        if self._at + length > len(self._data):
            raise InvalidArgument(f"{self._what}: truncated")
        value = self._data[self._at : self._at + length]
        self._at += length
        return value

    def end(self) -> None:
        if self._at != len(self._data):
            raise InvalidArgument(f"{self._what}: unexpected bytes after its fields")


class Signer(Protocol):
    """An Ed25519 key that signs: in a file (guardian/access/key_file.py) or in ssh-agent (guardian/ctl/signing.py)."""

    @property
    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """An SSH signature blob (string "ssh-ed25519", string signature) over data."""
        ...


def signed_metadata(
    signer: Signer, method_path: str, request: bytes, now_ms: int | None = None
) -> tuple[tuple[str, str | bytes], ...]:
    """The gRPC metadata that signs one admin request: the signature, its time and a fresh nonce."""
    timestamp_ms = int(time.time() * 1000) if now_ms is None else now_ms
    nonce = secrets.token_hex(16)
    message = request_message(method_path, timestamp_ms, nonce, request)
    blob = sshsig_blob(signer.public_key.blob, signer.sign(sshsig_signed_data(message)))
    return (
        (SIGNATURE_METADATA_KEY, blob),
        (TIMESTAMP_METADATA_KEY, str(timestamp_ms)),
        (NONCE_METADATA_KEY, nonce),
    )
