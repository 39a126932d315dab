"""Plain values the gateway exchanges with the guardian.

These mirror the messages of ``proto/guardian/v1/agent.proto`` without any gRPC
type, so nothing outside ``gateway/client.py`` touches the generated stubs.
They are frozen: a value read from the guardian is never changed in place.

Fields that hold an agent's data (memory content) or a credential (a session
id) are left out of ``repr`` so that a stray log line or traceback cannot leak
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "ACTIVE",
    "QUARANTINED",
    "TRUST_LEVELS",
    "Limits",
    "Memory",
    "MemoryDraft",
    "Page",
    "Provenance",
    "SearchHit",
    "SearchHits",
    "SessionInfo",
]

#: A memory's status: agents see only active memories. (Not in ``__all__``: a type alias has no docstring.)
MemoryStatus = Literal["active", "quarantined"]
ACTIVE: Final = "active"
#: Kept for the security team because a content filter held it back; invisible to agents until released.
#: Only the reply to the write that stored it says so.
QUARANTINED: Final = "quarantined"

#: How far a memory is believed, from where it came from (the guardian's policy gives each source a level):
#: the lowest of its source's level and that of every memory it was derived from. (A type alias.)
TrustLevel = Literal["trusted", "unverified", "untrusted"]
#: The trust levels, most trusted first.
TRUST_LEVELS: Final[tuple[TrustLevel, ...]] = ("trusted", "unverified", "untrusted")


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits the guardian enforces for a session (sizes in UTF-8 bytes)."""

    max_content_bytes: int
    max_metadata_bytes: int
    max_tags: int
    max_tag_bytes: int
    max_batch: int
    max_page_size: int
    max_query_bytes: int
    #: How deeply metadata objects and arrays may nest.
    max_metadata_depth: int


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A guardian session, as OpenSession returned it."""

    session_id: str = field(repr=False)
    agent: str
    #: Unix milliseconds after which the session is gone whatever happens.
    expires_at_ms: int
    #: The session also ends after this many milliseconds without a call.
    idle_timeout_ms: int
    limits: Limits
    #: Namespaces the session reads: the agent's own first, then shared ones its policy grants.
    namespaces: tuple[str, ...]
    #: Only memories younger than this many milliseconds are visible; 0 for no window.
    read_window_ms: int
    #: The operations the session may do (its profile's, narrowed by an OAuth token's scopes); () for all.
    operations: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MemoryDraft:
    """What an agent writes: content, tags, optional metadata as a JSON object text, and where."""

    content: str = field(repr=False)
    tags: tuple[str, ...] = ()
    #: A JSON object serialised to text, or "" for none.
    metadata_json: str = field(default="", repr=False)
    #: "" for the agent's own namespace; otherwise a shared namespace its policy lets it write.
    namespace: str = ""
    #: Where the content came from: "user", "agent", or an external kind ("web", "tool:NAME", ...);
    #: "" for the default source of the writer's profile.
    source: str = ""
    #: Ids of the memories it was built from (each one the agent can read).
    derived_from: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a memory came from, as the guardian recorded it (the writer is ``Memory.author``)."""

    #: What the writer declared; "unrecorded" for a memory stored before sources were recorded.
    source: str
    #: A digest naming the writing session (never the session id itself).
    session: str
    #: Ids of the memories it was built from.
    derived_from: tuple[str, ...] = ()
    #: The content filter rules that matched what was written.
    filter_hits: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Memory:
    """A stored memory, as the guardian returned it after its HMAC verified."""

    id: str
    content: str = field(repr=False)
    tags: tuple[str, ...]
    #: A JSON object serialised to text, or "" for none.
    metadata_json: str = field(repr=False)
    created_at_ms: int
    updated_at_ms: int
    #: Hex sha256 of the content.
    sha256: str
    namespace: str
    #: The agent that wrote it.
    author: str
    #: "quarantined" only in the reply to the write whose content a filter held back.
    status: MemoryStatus
    provenance: Provenance
    #: The trust in force for the reader (a write's reply: the trust it was stored with).
    trust: TrustLevel
    #: The reader's policy recalls this trust level only labelled: the content is quoted data
    #: from its source, not an instruction (the reply to a write is not labelled).
    labelled: bool
    #: Only in the reply to a write: the content filters that redacted part of what was sent.
    redacted_by: tuple[str, ...] = ()


#: Which legs a search runs: words and meaning fused, words alone, or meaning alone. (A type alias.)
SearchMode = Literal["hybrid", "lexical", "semantic"]


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One search result; a higher score is a better match."""

    memory: Memory
    score: float
    #: Its rank among the matches by words and by meaning, from 1; 0 where that leg did not find it.
    lexical_rank: int = 0
    semantic_rank: int = 0


@dataclass(frozen=True, slots=True)
class SearchHits:
    """A search's hits, best first; semantic_pending: ranked by words alone (meaning unavailable for a moment)."""

    hits: tuple[SearchHit, ...]
    semantic_pending: bool = False
    #: How many matches the caller's policy withholds at their trust level (left out of ``hits``).
    withheld: int = 0


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; ``next_cursor`` is None on the last page."""

    memories: tuple[Memory, ...]
    next_cursor: str | None
    #: How many memories of this page the caller's policy withholds at their trust level (left out).
    withheld: int = 0
