"""Who sent an admin request: the signature in its metadata checked against the enrolled keys.

The admin socket's file mode is the first gate (who may connect at all); this is
the second: every admin request must be signed by an enrolled person's key
(guardian/access/signed_request.py), within :data:`MAX_CLOCK_SKEW_MS` of the
guardian's clock, with a nonce never seen before. A nonce is kept for twice the
skew window, in the database, so a replay is refused across a restart too.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from guardian.access import admins
from guardian.access.admins import Admin
from guardian.access.proposals import Signature
from guardian.access.signed_request import (
    NONCE_METADATA_KEY,
    NONCE_RE,
    SIGNATURE_METADATA_KEY,
    TIMESTAMP_METADATA_KEY,
    SshSignature,
    request_message,
)
from guardian.store.database import Database
from shared.errors import Unauthenticated

__all__ = ["MAX_CLOCK_SKEW_MS", "Claimed", "SignedBy", "authenticate", "claimed_key"]

#: How far a request's timestamp may be from the guardian's clock, either way.
MAX_CLOCK_SKEW_MS: Final = 120_000


@dataclass(frozen=True)
class SignedBy:
    """The person who signed a request, and the signature (kept with a proposal)."""

    admin: Admin
    signature: Signature


@dataclass(frozen=True)
class Claimed:
    """What a request's metadata claims, before anything is verified."""

    signature: SshSignature
    timestamp_ms: int
    nonce: str
    blob: bytes


def claimed_key(metadata: Sequence[tuple[str, str | bytes]]) -> Claimed:
    """The signature, timestamp and nonce a request carries; Unauthenticated saying what is missing."""
    values = {key: value for key, value in metadata}
    blob = values.get(SIGNATURE_METADATA_KEY)
    if not isinstance(blob, bytes) or not blob:
        raise Unauthenticated(
            "this admin request is not signed: every admin request must be signed by an enrolled admin's key"
            " (guardianctl signs with --key FILE or your ed25519 key in ssh-agent)"
        )
    signature = SshSignature.parse(blob)
    timestamp = values.get(TIMESTAMP_METADATA_KEY)
    nonce = values.get(NONCE_METADATA_KEY)
    if not isinstance(timestamp, str) or not timestamp.isdigit() or len(timestamp) > 15:
        raise Unauthenticated(f"the request's {TIMESTAMP_METADATA_KEY} must be milliseconds since the epoch")
    if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
        raise Unauthenticated(f"the request's {NONCE_METADATA_KEY} must be 32 lowercase hex characters")
    return Claimed(signature, int(timestamp), nonce, blob)


def authenticate(database: Database, claimed: Claimed, method_path: str, request: bytes, now_ms: int) -> SignedBy:
    """The enrolled person whose key signed this request; Unauthenticated saying why not.

    Checked in this order: the key is enrolled, the signature is over this method and
    these exact request bytes, the time is within the skew window, the nonce is new
    (it is recorded now, so the same signed request is never served twice).
    """
    key = claimed.signature.public_key
    with database.read() as reader:
        admin = admins.by_fingerprint(reader, key.fingerprint)
    if admin is None:
        raise Unauthenticated(f"no admin is enrolled with the key {key.fingerprint} (see guardianctl admins add)")
    message = request_message(method_path, claimed.timestamp_ms, claimed.nonce, request)
    if not claimed.signature.verifies(message):
        raise Unauthenticated(
            "the signature does not match this request (it was made over other bytes, another method or another time)"
        )
    skew_ms = claimed.timestamp_ms - now_ms
    if abs(skew_ms) > MAX_CLOCK_SKEW_MS:
        raise Unauthenticated(
            f"the request was signed {abs(skew_ms) / 1000:.0f} s {'ahead of' if skew_ms > 0 else 'behind'} the"
            f" guardian's clock (at most {MAX_CLOCK_SKEW_MS // 1000} s either way): check both clocks"
        )
    keep_until_ms = claimed.timestamp_ms + 2 * MAX_CLOCK_SKEW_MS
    fresh = database.submit(lambda connection: admins.claim_nonce(connection, claimed.nonce, now_ms, keep_until_ms))
    if not fresh:
        raise Unauthenticated("this signed request was already served once (its nonce was used): sign it again")
    signature = Signature(
        fingerprint=key.fingerprint,
        timestamp_ms=claimed.timestamp_ms,
        nonce=claimed.nonce,
        sshsig=base64.b64encode(claimed.blob).decode(),
        request=base64.b64encode(request).decode(),
        method=method_path,
    )
    return SignedBy(admin, signature)
