"""The shapes of the MCP tools' inputs and outputs (pydantic, so the SDK derives JSON schemas).

Metadata crosses the socket as JSON text (``metadata_json``) and the MCP
boundary as a JSON object: this module converts between the two. The guardian
validates the object (size, depth); the gateway only serialises it.

A write whose content a filter quarantined or redacted still succeeds; its
result carries a ``note`` (``write_note``) telling the agent the memory is held
for security review and why it will not find it, or which part was redacted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.models import QUARANTINED, Memory, MemoryStatus, SearchHit, SearchHits
from shared.errors import InternalError, InvalidArgument

__all__ = [
    "NAMESPACE_PATTERN",
    "DeleteResult",
    "GetResult",
    "Hit",
    "ListResult",
    "MemoryInput",
    "Namespace",
    "NotedResult",
    "SearchResult",
    "StoreBatchResult",
    "StoreResult",
    "StoredMemory",
    "UpdateResult",
    "metadata_to_json",
    "namespace_to_wire",
    "write_note",
]

_MEMORY_ID_HELP = "The memory's id: 'mem_' followed by 32 lowercase hex characters."

#: A namespace name, as the guardian's ``AGENT_NAME_RE`` (an agent's own namespace is its name).
NAMESPACE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

#: The optional namespace argument of a write: the SDK checks it before the tool runs.
Namespace = Annotated[
    str | None,
    Field(
        max_length=64,
        pattern=NAMESPACE_PATTERN,
        description="Shared namespace to store into, if your policy grants one; omit for your own",
    ),
]

_HELD: Final = (
    "held for security review: a content filter flagged part of the content, so it is kept but will not "
    "appear in memory_search, memory_get or memory_list until the security team releases it; "
    "storing it again will not help"
)


def metadata_to_json(metadata: dict[str, Any] | None) -> str:
    """The wire form of metadata: compact JSON object text, or "" for none."""
    if metadata is None:
        return ""
    try:
        return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidArgument("metadata must be a JSON object (no NaN or Infinity)") from None


def _metadata_from_json(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise InternalError() from None
    if not isinstance(value, dict):
        raise InternalError()
    return value


def namespace_to_wire(namespace: str | None) -> str:
    """The wire form of a namespace argument: "" means the agent's own."""
    return namespace or ""


def write_note(memories: Sequence[Memory]) -> str | None:
    """What to tell the agent when a write's reply holds quarantined or redacted memories; None otherwise."""
    notes: list[str] = []
    held = [m.id for m in memories if m.status == QUARANTINED]
    if held and len(memories) == 1:
        notes.append(f"The memory was saved but is {_HELD}.")
    elif held:
        notes.append(f"{len(held)} of {len(memories)} memories ({', '.join(held)}) were saved but are {_HELD}.")
    redacted = [m for m in memories if m.redacted_by]
    if redacted:
        rules = ", ".join(dict.fromkeys(rule for m in redacted for rule in m.redacted_by))
        which = "" if len(memories) == 1 else f" ({', '.join(m.id for m in redacted)})"
        notes.append(
            f"Part of what you sent{which} was redacted before it was stored (content filter: {rules}); each "
            "redacted part reads [redacted:FILTER]. Everything else is stored exactly as you sent it."
        )
    return " ".join(notes) or None


class MemoryInput(BaseModel):
    """One memory to store."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    content: str = Field(description="The text to remember.")
    tags: list[str] = Field(default_factory=list, description="Short labels to find the memory by later.")
    metadata: dict[str, Any] | None = Field(
        default=None, description="Optional JSON object of extra structured data; null for none."
    )
    namespace: Namespace = None


class StoredMemory(BaseModel):
    """A memory as the guardian stored it (its integrity was verified on the way out)."""

    id: str = Field(description=_MEMORY_ID_HELP)
    content: str = Field(description="The remembered text.")
    tags: list[str] = Field(description="The memory's labels.")
    metadata: dict[str, Any] | None = Field(description="The memory's JSON object metadata, or null.")
    created_at_ms: int = Field(description="When it was stored, in Unix milliseconds.")
    updated_at_ms: int = Field(description="When it last changed, in Unix milliseconds.")
    sha256: str = Field(description="Hex sha256 of the content.")
    namespace: str = Field(description="The namespace it lives in: your own (your agent name) or a shared one.")
    author: str = Field(description="The agent that wrote it.")
    status: MemoryStatus = Field(
        description="'active', or 'quarantined' (only in a write's result): held for security review, not visible."
    )
    redacted_by: list[str] = Field(
        default_factory=list,
        description="Only in a write's result: the content filters that redacted part of what you sent "
        "(each part reads [redacted:FILTER]); empty when it is stored exactly as sent.",
    )

    @classmethod
    def of(cls, memory: Memory) -> StoredMemory:
        """The MCP form of a memory the guardian returned."""
        return cls(
            id=memory.id,
            content=memory.content,
            tags=list(memory.tags),
            metadata=_metadata_from_json(memory.metadata_json),
            created_at_ms=memory.created_at_ms,
            updated_at_ms=memory.updated_at_ms,
            sha256=memory.sha256,
            namespace=memory.namespace,
            author=memory.author,
            status=memory.status,
            redacted_by=list(memory.redacted_by),
        )


class NotedResult(BaseModel):
    """The result of a write, with a note for the agent when a memory was quarantined."""

    note: str | None = Field(
        default=None,
        description="Set when a memory was quarantined (held for security review) or part of it redacted; "
        "otherwise null.",
    )


class StoreResult(NotedResult):
    """What memory_store returns."""

    memory: StoredMemory


class StoreBatchResult(NotedResult):
    """What memory_store_batch returns: the memories in the order given."""

    memories: list[StoredMemory]


class Hit(BaseModel):
    """One search result."""

    memory: StoredMemory
    score: float = Field(description="Relevance; higher is a better match.")
    found_by: list[Literal["words", "meaning"]] = Field(
        description="Which legs of the search found it: by its words, by its meaning, or both."
    )

    @classmethod
    def of(cls, hit: SearchHit) -> Hit:
        """The MCP form of a search hit."""
        found_by: list[Literal["words", "meaning"]] = []
        if hit.lexical_rank:
            found_by.append("words")
        if hit.semantic_rank:
            found_by.append("meaning")
        return cls(memory=StoredMemory.of(hit.memory), score=hit.score, found_by=found_by)


class SearchResult(BaseModel):
    """What memory_search returns: best match first."""

    hits: list[Hit]
    note: str | None = Field(
        default=None, description="Set when the search could not run as asked, e.g. ranked by words alone for now."
    )

    @classmethod
    def of(cls, found: SearchHits) -> SearchResult:
        """The MCP form of a search's hits."""
        note = (
            "ranked by words alone: recall by meaning is unavailable for a moment (the guardian is loading its "
            "index of meanings, or its embedding service is restarting); search again in a few seconds to also "
            "find memories by meaning"
            if found.semantic_pending
            else None
        )
        return cls(hits=[Hit.of(hit) for hit in found.hits], note=note)


class GetResult(BaseModel):
    """What memory_get returns."""

    memory: StoredMemory


class ListResult(BaseModel):
    """What memory_list returns: newest first."""

    memories: list[StoredMemory]
    next_cursor: str | None = Field(description="Pass as cursor to get the next page; null on the last page.")


class UpdateResult(NotedResult):
    """What memory_update returns: the memory after the change."""

    memory: StoredMemory


class DeleteResult(BaseModel):
    """What memory_delete returns."""

    deleted: str = Field(description="The id of the deleted memory.")
