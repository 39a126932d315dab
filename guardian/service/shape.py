"""The shape stage: field types, sizes and counts, checked before any data is touched.

Each function takes what arrived on the wire and the caller's limits, and
returns a validated value or raises InvalidArgument naming the field and the
limit, never echoing the content.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from guardian.policy.compile import Limits
from guardian.recall.trust import UNRECORDED
from guardian.store.integrity import canonical_json
from guardian.store.memories import Draft
from shared.errors import InvalidArgument
from shared.formats import AGENT_NAME_RE, MAX_DERIVED_FROM, MEMORY_ID_RE, SOURCE_RE

__all__ = [
    "agent_name",
    "check_known_fields",
    "content",
    "derived_from",
    "draft",
    "memory_id",
    "metadata_json",
    "namespace",
    "page_size",
    "query",
    "source",
    "tags",
]


def check_known_fields(message: Message) -> None:
    """Refuse a request carrying fields this guardian's contract does not define."""
    if len(UnknownFieldSet(message)) > 0:
        raise InvalidArgument("the request has fields this guardian does not know; check the client's version")
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        values = value if descriptor.is_repeated else [value]
        for item in values:
            check_known_fields(item)


def content(value: str, limits: Limits, field: str = "content") -> str:
    """Non-blank content within max_content_bytes, with no NUL (it is stored exactly as given, or refused)."""
    if not value.strip():
        raise InvalidArgument(f"{field}: must not be empty")
    size = len(value.encode("utf-8"))
    if size > limits.max_content_bytes:
        raise InvalidArgument(f"{field}: {size} bytes is over the limit of {limits.max_content_bytes} bytes")
    nul = value.find("\x00")
    if nul >= 0:
        raise InvalidArgument(f"{field}: character {nul} (counting from 0) is NUL (U+0000), which is not stored")
    return value


def tags(values: Sequence[str], limits: Limits, field: str = "tags") -> tuple[str, ...]:
    """At most max_tags distinct, non-blank tags of at most max_tag_bytes each (duplicates dropped)."""
    unique = list(dict.fromkeys(values))
    if len(unique) > limits.max_tags:
        raise InvalidArgument(f"{field}: {len(unique)} tags is over the limit of {limits.max_tags}")
    for index, tag in enumerate(unique):
        if not tag.strip():
            raise InvalidArgument(f"{field}[{index}]: must not be empty")
        control = next((at for at, char in enumerate(tag) if ord(char) < 32 or ord(char) == 127), None)
        if control is not None:
            raise InvalidArgument(
                f"{field}[{index}]: character {control} (counting from 0) is a control character"
                f" (U+{ord(tag[control]):04X}); tags must not contain any"
            )
        size = len(tag.encode("utf-8"))
        if size > limits.max_tag_bytes:
            raise InvalidArgument(f"{field}[{index}]: {size} bytes is over the limit of {limits.max_tag_bytes}")
    return tuple(unique)


def metadata_json(value: str, limits: Limits, field: str = "metadata") -> str:
    """A JSON object (empty string means {}) within max_metadata_bytes, in canonical form."""
    if not value:
        return "{}"
    if len(value.encode("utf-8")) > limits.max_metadata_bytes * 4:
        raise InvalidArgument(f"{field}: over the limit of {limits.max_metadata_bytes} bytes")
    try:
        parsed = json.loads(value, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InvalidArgument(f"{field}: nested too deeply (limit {limits.max_metadata_depth} levels)") from None
    except _RepeatedKey:
        raise InvalidArgument(f"{field}: an object has the same key twice; JSON keys must be distinct") from None
    except ValueError:
        raise InvalidArgument(f"{field}: is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{field}: must be a JSON object, not {_json_kind(parsed)}")
    depth = _depth(parsed)
    if depth > limits.max_metadata_depth:
        raise InvalidArgument(f"{field}: nested {depth} levels deep, over the limit of {limits.max_metadata_depth}")
    _check_finite(parsed, field)
    canonical = canonical_json(parsed)
    try:
        size = len(canonical.encode("utf-8"))
    except UnicodeEncodeError:  # "\ud800" in JSON decodes to a lone surrogate, which has no UTF-8
        raise InvalidArgument(f"{field}: text must be valid Unicode (no unpaired surrogate escapes)") from None
    if size > limits.max_metadata_bytes:
        raise InvalidArgument(f"{field}: {size} bytes is over the limit of {limits.max_metadata_bytes} bytes")
    return canonical


def draft(content_value: str, tag_values: Sequence[str], metadata_value: str, limits: Limits, field: str) -> Draft:
    """A whole memory draft."""
    return Draft(
        content=content(content_value, limits, f"{field}.content" if field else "content"),
        tags=tags(tag_values, limits, f"{field}.tags" if field else "tags"),
        metadata_json=metadata_json(metadata_value, limits, f"{field}.metadata" if field else "metadata"),
    )


def namespace(value: str, field: str = "namespace") -> str:
    """Empty (the agent's own namespace) or a namespace name; whether the agent may use it is the data stage's."""
    if value and AGENT_NAME_RE.fullmatch(value) is None:
        raise InvalidArgument(
            f"{field}: not a namespace name (1-64 letters, digits, '.', '_' or '-', starting with a letter or digit)"
        )
    return value


def agent_name(value: str, field: str = "name") -> str:
    """An agent name as guardianctl agents add accepts it (so an error may name it)."""
    if AGENT_NAME_RE.fullmatch(value) is None:
        raise InvalidArgument(f"{field}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def memory_id(value: str, field: str = "id") -> str:
    """An id of the form the guardian issues."""
    if not value:
        raise InvalidArgument(f"{field}: is required")
    if MEMORY_ID_RE.fullmatch(value) is None:
        raise InvalidArgument(f"{field}: not a memory id this guardian issues (expected mem_ and 32 hex digits)")
    return value


def source(value: str, field: str = "source") -> str:
    """A source name (``web``, ``tool:calendar``); whether the agent may declare it is the data stage's."""
    if SOURCE_RE.fullmatch(value) is None or value == UNRECORDED:
        raise InvalidArgument(
            f"{field}: not a source (a lowercase kind such as user, agent, web, email or document, or kind:name"
            " such as tool:calendar)"
        )
    return value


def derived_from(values: Sequence[str], field: str = "derived_from") -> tuple[str, ...]:
    """Distinct memory ids, at most MAX_DERIVED_FROM of them."""
    unique = tuple(dict.fromkeys(values))
    if len(unique) > MAX_DERIVED_FROM:
        raise InvalidArgument(f"{field}: {len(unique)} memories is over the limit of {MAX_DERIVED_FROM}")
    return tuple(memory_id(value, f"{field}[{index}]") for index, value in enumerate(unique))


def query(value: str, limits: Limits) -> str:
    """A non-blank search query within max_query_bytes."""
    if not value.strip():
        raise InvalidArgument("query: must not be empty")
    size = len(value.encode("utf-8"))
    if size > limits.max_query_bytes:
        raise InvalidArgument(f"query: {size} bytes is over the limit of {limits.max_query_bytes} bytes")
    return value


def page_size(value: int, limits: Limits, field: str) -> int:
    """0 (meaning the maximum) or 1..max_page_size."""
    if value == 0:
        return limits.max_page_size
    if value > limits.max_page_size:
        raise InvalidArgument(f"{field}: {value} is over the limit of {limits.max_page_size}")
    return value


def _depth(value: object) -> int:
    """Nesting depth of objects and arrays: {} is 1, {"a": [1]} is 2 (iterative: no recursion limit)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


class _RepeatedKey(ValueError):
    """A JSON object names one key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are distinct: a repeated key would silently drop a value."""
    mapped = dict(pairs)
    if len(mapped) != len(pairs):
        raise _RepeatedKey()
    return mapped


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_finite(value: object, field: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"{field}: numbers must be finite")
    if isinstance(value, dict):
        for item in value.values():
            _check_finite(item, field)
    elif isinstance(value, list):
        for item in value:
            _check_finite(item, field)


def _json_kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
