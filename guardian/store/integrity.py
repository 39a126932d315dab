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

Version 2 (schema 2, namespaces and quarantine) is ``b"agent-guardian/memory/v2\n"``
and the same encoding of: id, namespace, author, created_at_ms, updated_at_ms,
sha256, tags, metadata, status. Rows keep the format they were signed with
(``sig_format``); v1 rows verify as v1 with namespace = author = ``agent``
and status ``active``, and are re-signed as v2 when next written.

Version 3 (schema 7, provenance) is ``b"agent-guardian/memory/v3\n"`` and the v2 fields
followed by: filter_hits (comma-joined rule names), source, session (the writing
session's audit reference), derived_from (comma-joined memory ids) and trust. v2 rows
verify as v2 only with all of those empty, and are re-signed as v3 when next written.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, Final

from guardian.keys.ring import KeyRing

__all__ = ["CURRENT_FORMAT", "SignedFields", "canonical_json", "content_sha256", "memory_message"]

_PREFIXES: Final = {
    1: b"agent-guardian/memory/v1\n",
    2: b"agent-guardian/memory/v2\n",
    3: b"agent-guardian/memory/v3\n",
}
#: The format every new signature uses.
CURRENT_FORMAT: Final = 3


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
    namespace: str
    author: str
    created_at_ms: int
    updated_at_ms: int
    sha256: str
    tags_json: str
    metadata_json: str
    status: str
    filter_hits: str = ""
    source: str = ""
    session: str = ""
    derived_from: str = ""
    trust: str = ""

    def sign(self, ring: KeyRing) -> tuple[str, str]:
        """(key id, hex HMAC) in the current format, with the ring's primary key."""
        return ring.sign(memory_message(self, CURRENT_FORMAT))

    def verify(self, ring: KeyRing, key_id: str, digest_hex: str, sig_format: int) -> bool:
        """Whether the stored HMAC, made in sig_format, matches these fields."""
        if sig_format == 1 and (self.namespace != self.author or self.status != "active"):
            return False  # a v1 row predates namespaces and quarantine
        if sig_format in (1, 2) and (self.source or self.session or self.derived_from or self.trust):
            return False  # v1 and v2 rows predate provenance
        if sig_format not in _PREFIXES:
            return False
        return ring.verify(key_id, memory_message(self, sig_format), digest_hex)


def memory_message(fields: SignedFields, sig_format: int) -> bytes:
    """The canonical bytes the HMAC of a memory covers in sig_format (see the module docstring)."""
    if sig_format == 1:
        parts: tuple[str, ...] = (fields.id, fields.author)
    else:
        parts = (fields.id, fields.namespace, fields.author)
    parts += (
        str(fields.created_at_ms),
        str(fields.updated_at_ms),
        fields.sha256,
        fields.tags_json,
        fields.metadata_json,
    )
    if sig_format != 1:
        parts += (fields.status,)
    if sig_format >= 3:
        parts += (fields.filter_hits, fields.source, fields.session, fields.derived_from, fields.trust)
    out = bytearray(_PREFIXES[sig_format])
    for part in parts:
        data = part.encode("utf-8")
        out += struct.pack(">I", len(data)) + data
    return bytes(out)
