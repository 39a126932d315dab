"""Tool arguments from a tool's JSON input schema (as tools/list gives it), and arbitrary ones.

:func:`schema_arguments` draws arguments that conform to the schema (types,
``anyOf``, ``$ref``, bounds, patterns, required keys), with the values that
matter for a memory tool where a property's name says what it is (``id``,
``cursor``, ``query``, ``content``, ...), and sometimes breaks one rule: a
required key dropped, a value of the wrong type, a bound crossed, an unknown
key added. :func:`arbitrary_arguments` draws any JSON object over the
schema's property names and others, or no arguments at all. A tool added
later gets both from its own schema.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from hypothesis import strategies as st

from tests.fuzz import values
from tests.fuzz.protogen import Ref, refs

__all__ = ["arbitrary_arguments", "resolve_refs", "schema_arguments"]

_JSON_TYPES: Final = ("string", "integer", "number", "boolean", "array", "object", "null")


def _ids() -> st.SearchStrategy[Any]:
    """id: one the agent owns half the time, else a planted one, a well-formed unknown one, or garbage."""
    other = st.one_of(
        refs("memory_id", "forbidden"),
        st.from_regex(r"mem_[0-9a-f]{32}", fullmatch=True),
        st.sampled_from(("", "mem_", "mem_" + "0" * 31, "MEM_" + "0" * 32, "mem_" + "A" * 32)),
        values.texts(small=True),
    )
    return values.mostly(refs("memory_id", "own"), other, 50)


def _cursors() -> st.SearchStrategy[Any]:
    """cursor: none, one the gateway returned (as is, tampered, or another agent's), or garbage."""
    return st.one_of(st.none(), refs("cursor", "own", "tampered", "foreign"), values.texts(small=True))


#: Values by property name, for the properties a memory tool gives meaning to (each matching its schema type).
_HINTS: Final[Mapping[str, Callable[[], st.SearchStrategy[Any]]]] = {
    "id": _ids,
    "cursor": _cursors,
    "query": lambda: st.one_of(refs("query", "marker"), values.texts(values.LIMITS["max_query_bytes"])),
    "content": lambda: values.texts(values.LIMITS["max_content_bytes"]),
    "metadata": lambda: st.one_of(st.none(), values.json_objects()),
    "namespace": lambda: st.one_of(
        st.none(), st.sampled_from(("fuzz-shared", "team-notes", "bob", "mcp-fuzzer", "fuzzer")), values.agent_names()
    ),
    "tags": lambda: st.one_of(
        st.none(),
        st.sampled_from((0, 1, 3, values.LIMITS["max_tags"], values.LIMITS["max_tags"] + 1)).flatmap(
            lambda size: st.lists(
                values.texts(values.LIMITS["max_tag_bytes"], small=size > 3), min_size=size, max_size=size
            )
        ),
    ),
    "limit": lambda: st.one_of(st.none(), values.bounded_ints(1, 2**32 - 1, special=(99, 100, 101, 1000))),
    "page_size": lambda: st.one_of(st.none(), values.bounded_ints(1, 2**32 - 1, special=(99, 100, 101, 1000))),
}


def _types_of(schema: Mapping[str, Any]) -> set[str]:
    """The JSON types a schema allows."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return set(kind)
    if "anyOf" in schema:
        return set().union(*(_types_of(option) for option in schema["anyOf"]))
    return set(_JSON_TYPES)


def _deref(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """The schema a ``$ref`` points to (within the same document), or schema itself."""
    ref = schema.get("$ref")
    if not isinstance(ref, str):
        return schema
    node: Any = root
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return _deref(node, root)


def conforming(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that satisfy ``schema`` (as far as the keywords pydantic emits go)."""
    schema = _deref(schema, root)
    if "anyOf" in schema:
        return st.one_of([conforming(option, root, depth) for option in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([conforming({**schema, "type": one}, root, depth) for one in kind])
    if kind == "object":
        return _object(schema, root, depth)
    if kind == "array":
        items = schema.get("items", {})
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", low + 25))
        sizes = st.sampled_from(sorted({low, low + 1, min(high, low + 2), min(high, 20), min(high, 21)})) | st.integers(
            low, min(high, low + 4)
        )
        item = conforming(items, root, depth + 1) if depth < 4 else st.nothing()
        return sizes.flatmap(lambda size: st.lists(item, min_size=size, max_size=size))
    if kind == "string":
        return _string(schema)
    if kind == "integer":
        low = int(schema.get("minimum", -(2**63)))
        high = int(schema.get("maximum", 2**63 - 1))
        return values.bounded_ints(low, high)
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return values.json_values()


def _string(schema: Mapping[str, Any]) -> st.SearchStrategy[str]:
    """Strings within a string schema's length bounds and pattern."""
    max_length = schema.get("maxLength")
    min_length = int(schema.get("minLength", 0))
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        strategy: st.SearchStrategy[str] = st.from_regex(pattern, fullmatch=True)
    else:
        strategy = values.texts(small=True) | values.texts()
    return strategy.filter(lambda text: min_length <= len(text) and (max_length is None or len(text) <= max_length))


def _object(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with every required property and some optional ones, hinted by name where known."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    if not properties:
        return st.dictionaries(st.text(max_size=10), values.json_values(), max_size=4)
    drawn: dict[str, st.SearchStrategy[Any]] = {}
    for name, subschema in properties.items():
        strategy = conforming(subschema, root, depth + 1)
        hint = _HINTS.get(name)
        if hint is not None:
            resolved = _deref(subschema, root)
            nullable = "null" in _types_of(resolved)
            hinted = hint() if nullable else hint().filter(lambda value: value is not None)
            strategy = values.mostly(hinted, strategy, 75)
        drawn[name] = strategy
    always = {name: strategy for name, strategy in drawn.items() if name in required}
    maybe = {name: strategy for name, strategy in drawn.items() if name not in required}
    return st.fixed_dictionaries(always, optional=maybe)


#: Values of the wrong type for most schemas, and numbers just outside common bounds.
_WRONG: Final = st.one_of(
    values.json_values(),
    st.sampled_from((0, -1, 2**32, 2**64, 1.5, True, "1", "", [], {}, None, [None], {"": None})),
)


@st.composite
def _broken(draw: st.DrawFn, schema: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """Conforming arguments with one rule broken."""
    arguments: dict[str, Any] = dict(draw(_object(schema, root, 0)))
    properties = list(schema.get("properties", {}))
    required = [name for name in schema.get("required", ()) if name in arguments]
    how = draw(st.sampled_from(("drop", "retype", "extra", "nested-extra")))
    if how == "drop" and required:
        del arguments[draw(st.sampled_from(required))]
    elif how == "retype" and properties:
        arguments[draw(st.sampled_from(properties))] = draw(_WRONG)
    elif how == "nested-extra":
        for value in arguments.values():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value[0] = {**value[0], draw(st.text(min_size=1, max_size=8)): draw(_WRONG)}
                break
    else:
        arguments[draw(st.text(min_size=1, max_size=12))] = draw(_WRONG)
    return arguments


def schema_arguments(schema: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Arguments from a tool's input schema: conforming ones mostly, one rule broken sometimes."""
    conforming_arguments = _object(schema, schema, 0)
    return values.mostly(conforming_arguments, _broken(schema, schema), 70)


def arbitrary_arguments(schema: Mapping[str, Any]) -> st.SearchStrategy[dict[str, Any] | None]:
    """Any JSON object over the schema's property names (and others), or no arguments."""
    names = list(schema.get("properties", {})) or ["x"]
    keys = st.one_of(st.sampled_from(names), st.text(max_size=12))
    return st.one_of(st.none(), st.dictionaries(keys, _WRONG, max_size=6))


def resolve_refs(value: Any, resolver: Callable[[Ref], str]) -> Any:
    """value with every Ref in it replaced by what resolver says."""
    if isinstance(value, Ref):
        return resolver(value)
    if isinstance(value, list):
        return [resolve_refs(item, resolver) for item in value]
    if isinstance(value, dict):
        return {key: resolve_refs(item, resolver) for key, item in value.items()}
    return value
