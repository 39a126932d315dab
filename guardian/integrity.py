"""Integrity of stored memories: a sha256 of the content and an HMAC over the
memory's canonical fields, verified on every read.

The canonical form is NEVER TO CHANGE (a change would fail every stored
memory); a new form needs a new version prefix. Version 1 is the bytes
``b"agent-guardian/memory/v1\\n"`` followed by, for each field in this order,
its UTF-8 bytes preceded by their length as an unsigned 4-byte big-endian
integer: id, agent, created_at_ms (decimal), updated_at_ms (decimal),
sha256 of the content (hex), tags (canonical JSON array), metadata
(canonical JSON object). Canonical JSON: sorted keys, separators ``,`` and
``:``, non-ASCII kept as UTF-8.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Final

from guardian.keys import KeyRing

__all__ = ["SignedFields", "canonical_json", "content_sha256", "memory_message"]

_PREFIX: Final = b"agent-guardian/memory/v1\n"


def canonical_json(value: Any) -> str:
    """The one JSON form the guardian stores and signs."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_sha256(content: str) -> str:
    """Hex sha256 of the content's UTF-8 bytes."""
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SignedFields:
    """The fields of a memory the HMAC covers."""

    id: str
    agent: str
    created_at_ms: int
    updated_at_ms: int
    sha256: str
    tags_json: str
    metadata_json: str

    def sign(self, ring: KeyRing) -> tuple[str, str]:
        """(key id, hex HMAC) with the ring's primary key."""
        return ring.sign(memory_message(self))

    def verify(self, ring: KeyRing, key_id: str, digest_hex: str) -> bool:
        """Whether the stored HMAC matches these fields."""
        return ring.verify(key_id, memory_message(self), digest_hex)


def memory_message(fields: SignedFields) -> bytes:
    """The canonical bytes the HMAC of a memory covers (see the module docstring)."""
    parts = (
        fields.id,
        fields.agent,
        str(fields.created_at_ms),
        str(fields.updated_at_ms),
        fields.sha256,
        fields.tags_json,
        fields.metadata_json,
    )
    out = bytearray(_PREFIX)
    for part in parts:
        data = part.encode("utf-8")
        out += struct.pack(">I", len(data)) + data
    return bytes(out)
