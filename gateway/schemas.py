"""The shapes of the MCP tools' inputs and outputs (pydantic, so the SDK derives JSON schemas).

Metadata crosses the socket as JSON text (``metadata_json``) and the MCP
boundary as a JSON object: this module converts between the two. The guardian
validates the object (size, depth); the gateway only serialises it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.models import Memory, SearchHit
from shared.errors import InternalError, InvalidArgument

__all__ = [
    "DeleteResult",
    "GetResult",
    "Hit",
    "ListResult",
    "MemoryInput",
    "SearchResult",
    "StoreBatchResult",
    "StoreResult",
    "StoredMemory",
    "UpdateResult",
    "metadata_to_json",
]

_MEMORY_ID_HELP = "The memory's id: 'mem_' followed by 32 lowercase hex characters."


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


class MemoryInput(BaseModel):
    """One memory to store."""

    model_config = ConfigDict(extra="forbid")

    content: str = Field(description="The text to remember.")
    tags: list[str] = Field(default_factory=list, description="Short labels to find the memory by later.")
    metadata: dict[str, Any] | None = Field(
        default=None, description="Optional JSON object of extra structured data; null for none."
    )


class StoredMemory(BaseModel):
    """A memory as the guardian stored it (its integrity was verified on the way out)."""

    id: str = Field(description=_MEMORY_ID_HELP)
    content: str = Field(description="The remembered text.")
    tags: list[str] = Field(description="The memory's labels.")
    metadata: dict[str, Any] | None = Field(description="The memory's JSON object metadata, or null.")
    created_at_ms: int = Field(description="When it was stored, in Unix milliseconds.")
    updated_at_ms: int = Field(description="When it last changed, in Unix milliseconds.")
    sha256: str = Field(description="Hex sha256 of the content.")

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
        )


class StoreResult(BaseModel):
    """What memory_store returns."""

    memory: StoredMemory


class StoreBatchResult(BaseModel):
    """What memory_store_batch returns: the memories in the order given."""

    memories: list[StoredMemory]


class Hit(BaseModel):
    """One search result."""

    memory: StoredMemory
    score: float = Field(description="Relevance; higher is a better match.")

    @classmethod
    def of(cls, hit: SearchHit) -> Hit:
        """The MCP form of a search hit."""
        return cls(memory=StoredMemory.of(hit.memory), score=hit.score)


class SearchResult(BaseModel):
    """What memory_search returns: best match first."""

    hits: list[Hit]


class GetResult(BaseModel):
    """What memory_get returns."""

    memory: StoredMemory


class ListResult(BaseModel):
    """What memory_list returns: newest first."""

    memories: list[StoredMemory]
    next_cursor: str | None = Field(description="Pass as cursor to get the next page; null on the last page.")


class UpdateResult(BaseModel):
    """What memory_update returns: the memory after the change."""

    memory: StoredMemory


class DeleteResult(BaseModel):
    """What memory_delete returns."""

    deleted: str = Field(description="The id of the deleted memory.")
