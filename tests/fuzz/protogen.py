"""Requests generated from the protobuf descriptors, and raw bytes for the same methods.

:func:`request_trees` walks a request message's descriptor and draws a value
for every field: a field whose name the guardian gives meaning to (session_id,
id, content, metadata_json, text, ...) gets a strategy that knows it (mostly
well-formed, sometimes not); any other field gets one for its protobuf type
(integers at their type's bounds, any text, nested messages, repeated counts
from none to many). So a method added to a proto later is fuzzed without
change here. A drawn request is a tree of plain values in which :class:`Ref`
stands for a value only known when the test runs (the live session, an id the
guardian issued); :func:`build_message` fills those in.

:func:`raw_payloads` gives bytes: random ones, and serialized requests mutated
(bytes flipped, truncated, an unknown field or invalid UTF-8 spliced in,
malformed varints and lengths, deep groups).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

from tests.fuzz import values
from tests.security.wire import varint as _varint

__all__ = [
    "Mutation",
    "Ref",
    "Resolver",
    "apply_mutations",
    "build_message",
    "raw_payloads",
    "refs",
    "request_trees",
]

_MAX_DEPTH: Final = 3


@dataclass(frozen=True)
class Ref:
    """A value the test fills in when it runs, from what the guardian issued so far.

    ``kind`` names the pool (session, token, memory_id, cursor, agent_name,
    policy_version), ``choice`` which part of it (e.g. main, fresh, closed,
    own, forbidden), ``index`` which entry.
    """

    kind: str
    choice: str
    index: int = 0


#: Turns a Ref into the text it stands for.
Resolver = Callable[[Ref], str]


def refs(kind: str, *choices: str) -> st.SearchStrategy[Ref]:
    """A Ref of ``kind`` with one of ``choices`` and any index."""
    return st.builds(Ref, st.just(kind), st.sampled_from(choices), st.integers(0, 63))


_weighted = values.mostly


# -- what each named field means ------------------------------------------------------------------


def _session_ids() -> st.SearchStrategy[Any]:
    """session_id: the live session 85% of the time, else a fresh or closed one, or garbage."""
    rare = st.one_of(
        refs("session", "closed", "fresh"),
        st.sampled_from(("", "ses_", "ses_" + "A" * 32, "mem_" + "0" * 32)),
        values.texts(small=True),
    )
    return _weighted(st.just(Ref("session", "main")), rare, 85)


def _tokens() -> st.SearchStrategy[Any]:
    """agent_token: the fuzzing agent's 70% of the time, else another's, a revoked one, or garbage."""
    rare = st.one_of(
        refs("token", "other", "revoked"),
        st.sampled_from(("", "agt_", "agt_" + "A" * 43, "agt_" + "A" * 44, "Bearer agt_x")),
        values.texts(small=True),
    )
    return _weighted(st.just(Ref("token", "own")), rare, 70)


def _memory_ids() -> st.SearchStrategy[Any]:
    """id: one the agent owns half the time, else a planted one, a well-formed unknown one, or garbage."""
    other = st.one_of(
        refs("memory_id", "forbidden", "active"),
        st.from_regex(r"mem_[0-9a-f]{32}", fullmatch=True),
        st.sampled_from(("", "mem_", "mem_" + "0" * 31, "mem_" + "0" * 33, "MEM_" + "0" * 32, "mem_" + "g" * 32)),
        values.texts(small=True),
    )
    return _weighted(refs("memory_id", "own"), other, 50)


def _cursors() -> st.SearchStrategy[Any]:
    """cursor: none, one the guardian issued (as is, tampered, or another agent's), or garbage."""
    return st.one_of(
        st.just(""),
        refs("cursor", "own", "tampered", "foreign"),
        st.from_regex(r"[A-Za-z0-9_-]{22}\.[0-9a-f]{32}", fullmatch=True),
        values.texts(small=True),
    )


def _queries() -> st.SearchStrategy[Any]:
    """query: plain words, a marker text (must find nothing), sized or edge text."""
    return st.one_of(
        values.prose(max_words=4),
        refs("query", "marker"),
        values.texts(values.LIMITS["max_query_bytes"]),
        st.lists(
            st.sampled_from(("fuzz", "note", "a", "the", "\u65e5\u672c", "OR", "NEAR", "*")), min_size=1, max_size=40
        ).map(" ".join),
    )


def _namespaces() -> st.SearchStrategy[Any]:
    """namespace: the agent's own mostly, else shared, another agent's, or not a name."""
    other = st.one_of(
        st.sampled_from(("fuzz-shared", "team-notes", "bob", "fuzzer", "mcp-fuzzer", "owner")), values.agent_names()
    )
    return _weighted(st.just(""), other, 70)


def _names() -> st.SearchStrategy[Any]:
    """An agent name: one that exists, or any valid or invalid name."""
    return st.one_of(refs("agent_name", "known"), values.agent_names())


def _versions() -> st.SearchStrategy[Any]:
    """A policy version: one from the history, a prefix of one, or any hex or text."""
    return st.one_of(
        refs("policy_version", "known", "prefix", "short"),
        st.from_regex(r"[0-9a-f]{8,64}", fullmatch=True),
        values.texts(small=True),
    )


def _list_sizes(limit: int) -> st.SearchStrategy[int]:
    """Counts for a repeated field: none, few, and the limit and one over."""
    return st.sampled_from((0, 1, 2, 3, limit, limit + 1)) | st.integers(0, 5)


#: Strategies for string fields by name.
_STRING_FIELDS: Final[Mapping[str, Callable[[], st.SearchStrategy[Any]]]] = {
    "session_id": _session_ids,
    "agent_token": _tokens,
    "id": _memory_ids,
    "after_id": _memory_ids,
    "content": lambda: _weighted(values.prose(), values.texts(values.LIMITS["max_content_bytes"]), 60),
    "metadata_json": lambda: _weighted(
        st.one_of(
            st.just(""),
            st.dictionaries(st.sampled_from(values.WORDS), values.json_values(max_leaves=3), max_size=3).map(
                json.dumps
            ),
        ),
        values.metadata_texts(),
        50,
    ),
    "namespace": _namespaces,
    "query": _queries,
    "cursor": _cursors,
    "name": _names,
    "text": values.policy_texts,
    "version": _versions,
    "agent": lambda: st.one_of(
        st.sampled_from(("", "fuzzer", "bob", "owner", "@admin-socket", "*")), values.texts(small=True)
    ),
    "operation": lambda: st.one_of(
        st.sampled_from(("", "memory.store", "memory.*", "admin.*", "*", "rpc.unknown", "session.open")),
        values.texts(small=True),
    ),
    "decision": lambda: _weighted(
        st.sampled_from(("", "allow", "deny", "error", "alert")),
        st.one_of(st.just("ALLOW"), values.texts(small=True)),
        70,
    ),
    "mac": lambda: st.one_of(st.from_regex(r"[0-9a-f]{64}", fullmatch=True), values.texts(small=True)),
}

#: Unix milliseconds: now-ish, the epoch, far future, negative, the int64 bounds.
_TIMES: Final = st.one_of(
    st.integers(1_700_000_000_000, 1_900_000_000_000),
    values.bounded_ints(-(2**63), 2**63 - 1, special=(1, 2**53, 253_402_300_800_000)),
)

#: Strategies for integer fields by name (the value is still clipped to the field's type).
_INT_FIELDS: Final[Mapping[str, Callable[[], st.SearchStrategy[int]]]] = {
    "limit": lambda: _weighted(
        st.integers(0, 5), values.bounded_ints(0, 2**32 - 1, special=(50, 99, 100, 101, 1000, 1001)), 50
    ),
    "page_size": lambda: _weighted(
        st.integers(0, 5), values.bounded_ints(0, 2**32 - 1, special=(99, 100, 101, 1000)), 50
    ),
    "since_ms": lambda: _weighted(st.just(0), _TIMES, 60),
    "until_ms": lambda: _weighted(st.just(0), _TIMES, 60),
    "after_seq": lambda: _weighted(
        st.integers(0, 50), values.bounded_ints(0, 2**64 - 1, special=(2**63 - 1, 2**63)), 60
    ),
    "seq": lambda: _weighted(st.integers(0, 50), values.bounded_ints(0, 2**64 - 1, special=(2**63 - 1, 2**63)), 60),
    # 0 to 10 000 waits that long for a matching row: only short waits, and values over the limit.
    "wait_ms": lambda: st.sampled_from((0, 0, 1, 150, 10_001, 2**31, 2**32 - 1)),
}

#: How many items repeated fields get, by name.
_REPEATED_SIZES: Final[Mapping[str, Callable[[], st.SearchStrategy[int]]]] = {
    "tags": lambda: _weighted(st.integers(0, 3), _list_sizes(values.LIMITS["max_tags"]) | st.just(300), 70),
    "memories": lambda: _weighted(st.integers(1, 3), _list_sizes(values.LIMITS["max_batch"]), 70),
}

_INT_RANGES: Final = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """A value for one (non-repeated) scalar field, by its name or else its type."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        named = _STRING_FIELDS.get(field.name)
        return named() if named is not None else values.texts()
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        named_int = _INT_FIELDS.get(field.name)
        if named_int is not None:
            return named_int().filter(lambda value: low <= value <= high)
        return values.bounded_ints(low, high, special=(2**31 - 1, 2**32 - 1, 2**53 + 1, 2**63 - 1) if high > 0 else ())
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for the field type {kind} of {field.full_name}")


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """A value for one field: a scalar, a nested message tree, or a list of either."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        if depth >= _MAX_DEPTH:
            single: st.SearchStrategy[Any] = st.just({})
        else:
            single = request_trees(field.message_type, depth + 1)
    else:
        single = _scalar(field)
    if not field.is_repeated:
        return single
    sizes = _REPEATED_SIZES.get(field.name, lambda: st.integers(0, 4) | st.just(50))()
    if field.type == FieldDescriptor.TYPE_STRING and field.name == "tags":
        single = _weighted(
            st.sampled_from(values.WORDS),
            st.one_of(
                st.sampled_from(("x" * 64, "x" * 65, "", " ", "\t", "a\x01", "\u200b", "\u00e9" * 32)),
                values.texts(values.LIMITS["max_tag_bytes"]),
            ),
            70,
        )
    return sizes.flatmap(lambda size: st.lists(single, min_size=size, max_size=size))


#: Stands for a field left unset in a drawn tree (removed before the tree is returned).
_ABSENT: Final = object()


def _present(strategy: st.SearchStrategy[Any], percent: int) -> st.SearchStrategy[Any]:
    """The field's value ``percent``% of the time, else unset."""
    return _weighted(strategy, st.just(_ABSENT), percent)


@functools.cache
def request_trees(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Trees of field values for a message.

    Fields the guardian gives a meaning to are always drawn (their strategies include empty
    values); a message field is set 75% of the time; a proto3 ``optional`` scalar (where
    unset differs from the default) half of the time; any other field 60%.
    """
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        strategy = _field(field, depth)
        named = field.name in _STRING_FIELDS or field.name in _INT_FIELDS or field.name in _REPEATED_SIZES
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated:
            fields[field.name] = _present(strategy, 75)
        elif field.has_presence:
            fields[field.name] = _present(strategy, 50)
        elif named:
            fields[field.name] = strategy
        else:
            fields[field.name] = _present(strategy, 60)
    return st.fixed_dictionaries(fields).map(
        lambda tree: {name: value for name, value in tree.items() if value is not _ABSENT}
    )


def _resolve(value: Any, resolver: Resolver) -> Any:
    """value with each Ref (also inside a list) replaced."""
    if isinstance(value, Ref):
        return resolver(value)
    if isinstance(value, list):
        return [_resolve(item, resolver) for item in value]
    return value


def build_message(message_class: type[Message], tree: Mapping[str, Any], resolver: Resolver) -> Message:
    """The message a tree describes, each Ref replaced by what ``resolver`` says."""
    message = message_class()
    descriptor = cast("Descriptor", message_class.DESCRIPTOR)
    for name, raw in tree.items():
        field = descriptor.fields_by_name[name]
        value = _resolve(raw, resolver)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            assert field.message_type is not None
            nested_class = GetMessageClass(field.message_type)
            if field.is_repeated:
                container = getattr(message, name)
                for item in value:
                    container.add().CopyFrom(build_message(nested_class, item, resolver))
            else:
                getattr(message, name).CopyFrom(build_message(nested_class, value, resolver))
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


# -- raw bytes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """One change to a serialized request: ``op`` at ``position`` (taken modulo the length) with ``data``."""

    op: str
    position: int
    data: bytes


#: Fragments that are wrong protobuf in some way, or fields this guardian does not know.
_FRAGMENTS: Final = (
    _varint((1 << 3) | 2) + _varint(2) + b"\xff\xfe",  # field 1: invalid UTF-8
    _varint((2 << 3) | 2) + _varint(3) + b"\xed\xa0\x80",  # field 2: an encoded surrogate
    _varint((99 << 3) | 0) + _varint(1),  # unknown varint field
    _varint(((2**29 - 1) << 3) | 2) + _varint(1) + b"x",  # unknown field, the largest number
    _varint((7 << 3) | 5) + b"\x00\x00\x00\x00",  # fixed32 where a field may be anything else
    _varint((1 << 3) | 0) + b"\xff" * 10 + b"\x01",  # a varint over 10 bytes
    _varint((1 << 3) | 2) + b"\xff\xff\xff\xff\x0f",  # a length far past the end
    _varint((1 << 3) | 2) + _varint(2**31),  # a length past 2 GiB
    _varint((0 << 3) | 0) + b"\x00",  # field number 0
    _varint((1 << 3) | 6),  # wire type 6
    _varint((1 << 3) | 4),  # an end-group with no start
    _varint((5 << 3) | 3) * 200 + _varint((5 << 3) | 4) * 200,  # groups nested 200 deep
    _varint((2 << 3) | 2) + _varint(200) + (_varint((2 << 3) | 2) + _varint(0)) * 100,  # nested empty messages
    b"\x0a\x00" * 1000,  # one field repeated (the last one wins)
)


def _mutate(payload: bytes, mutation: Mutation) -> bytes:
    """payload with one mutation applied."""
    size = len(payload)
    where = mutation.position % (size + 1)
    if mutation.op == "flip" and size:
        index = mutation.position % size
        return payload[:index] + bytes([payload[index] ^ (1 << (mutation.position % 8))]) + payload[index + 1 :]
    if mutation.op == "truncate":
        return payload[:where]
    if mutation.op == "insert":
        return payload[:where] + mutation.data + payload[where:]
    if mutation.op == "append":
        return payload + mutation.data
    if mutation.op == "double":
        return payload + payload
    return payload


def apply_mutations(payload: bytes, mutations: list[Mutation]) -> bytes:
    """``payload`` with each mutation applied in turn."""
    for mutation in mutations:
        payload = _mutate(payload, mutation)
    return payload


def _mutations() -> st.SearchStrategy[list[Mutation]]:
    """One to three mutations of a serialized request."""
    data = st.one_of(st.sampled_from(_FRAGMENTS), st.binary(min_size=1, max_size=16))
    mutation = st.builds(
        Mutation, st.sampled_from(("flip", "truncate", "insert", "append", "double")), st.integers(0, 2**16), data
    )
    return st.lists(mutation, min_size=1, max_size=3)


@functools.cache
def raw_payloads(descriptor: Descriptor) -> st.SearchStrategy[tuple[str, Any, Any]]:
    """What to send as raw bytes: ``("random", bytes, None)``, or ``("mutated", tree, mutations)``."""
    random_bytes = st.one_of(
        st.binary(max_size=256), st.sampled_from(_FRAGMENTS), st.sampled_from((b"", b"\x00", b"\xff" * 64))
    ).map(lambda data: ("random", data, None))
    mutated = st.tuples(st.just("mutated"), request_trees(descriptor), _mutations())
    return st.one_of(random_bytes, mutated)
