"""Formats of the identifiers the guardian issues.

Both processes check these before anything else, so malformed input is
refused early with a clear message; only the guardian mints them.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "AGENT_NAME_RE",
    "INCIDENT_ID_RE",
    "MAX_DERIVED_FROM",
    "MEMORY_ID_RE",
    "OPERATOR_METADATA_KEY",
    "RETRY_AFTER_METADATA_KEY",
    "SESSION_ID_RE",
    "SOURCE_RE",
    "TOKEN_RE",
    "is_agent_token",
    "looks_like_jwt",
]

#: ``agt_`` and 43 base64url characters (32 random bytes).
TOKEN_RE: Final = re.compile(r"agt_[A-Za-z0-9_-]{43}")
#: ``ses_`` and 32 base64url characters (24 random bytes).
SESSION_ID_RE: Final = re.compile(r"ses_[A-Za-z0-9_-]{32}")
#: ``mem_`` and 32 lowercase hex characters (16 random bytes).
MEMORY_ID_RE: Final = re.compile(r"mem_[0-9a-f]{32}")
#: The most memory ids one memory may name as derived from (both processes check it).
MAX_DERIVED_FROM: Final = 32
#: ``inc_`` and 16 lowercase hex characters (8 random bytes).
INCIDENT_ID_RE: Final = re.compile(r"inc_[0-9a-f]{16}")
#: An agent's name: 1-64 characters, letters, digits, '-', '_', '.', not starting with a symbol.
AGENT_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Where a memory's content came from (guardian/recall/trust.py): a lowercase kind (``web``), optionally
#: with a name (``tool:calendar``).
SOURCE_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}(?::[A-Za-z0-9_.-]{1,64})?")

#: gRPC metadata key in which guardianctl names the operator running it (claimed, not proven).
OPERATOR_METADATA_KEY: Final = "x-guardian-operator"

#: Trailing-metadata key of RESOURCE_EXHAUSTED: milliseconds until a retry may succeed (decimal).
RETRY_AFTER_METADATA_KEY: Final = "retry-after-ms"


#: A JWT's shape: three base64url segments (the signature may be empty only in an unsigned JWT, which is refused).
JWT_RE: Final = re.compile(r"[A-Za-z0-9_-]{2,4096}\.[A-Za-z0-9_-]{2,4096}\.[A-Za-z0-9_-]{0,1024}")


def looks_like_jwt(value: str) -> bool:
    """Whether value has the shape of a JWT, e.g. an OAuth access token (not whether it is valid)."""
    return JWT_RE.fullmatch(value) is not None


def is_agent_token(value: str) -> bool:
    """Whether value has the shape of an agent token (not whether it is valid)."""
    return TOKEN_RE.fullmatch(value) is not None
