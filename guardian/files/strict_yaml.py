"""Strict reading of the guardian's YAML files (config and policy).

A file is parsed by :func:`parse_yaml` (PyYAML's safe loader, with limits on
nesting and on the size a document expands to through its aliases: a few
hundred bytes of ``&a [*b, *b, ...]`` would otherwise expand to gigabytes, and
deep nesting would exhaust the stack) and
walked with :class:`Section`, which refuses unknown keys and wrong types and
names the offending path in the error, so an operator's typo fails the load
instead of being ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml

from shared.errors import ConfigError

T = TypeVar("T")

_DURATION_RE = re.compile(r"(\d+)(ms|s|m|h|d)")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: How deeply collections may nest in a config or policy file (the real ones nest 5 levels),
#: and how many values it may hold once every alias is expanded (the shipped policy: a few hundred).
MAX_DEPTH = 32
MAX_NODES = 100_000
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, refusing collections nested deeper than MAX_DEPTH while it composes."""

    _depth = 0

    def _mark(self) -> Any:
        return self.peek_event().start_mark  # type: ignore[no-untyped-call]

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep", self._mark())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node) -> int:
    """How many nodes the document holds with every alias expanded, counted without expanding it.

    Raises ConfigError for a recursive document (an alias inside what it names) or one that
    is too large or too deep once expanded (an alias bomb: a few hundred bytes, gigabytes expanded).
    """
    sizes: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()

    def measure(current: yaml.Node) -> tuple[int, int]:
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError("is recursive (an alias refers to a value that contains it)")
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(current, yaml.ScalarNode) and _SURROGATE_RE.search(current.value):
            raise ConfigError("holds text that is not valid Unicode (an escaped lone surrogate such as \\ud800)")
        if isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        elif isinstance(current, yaml.SequenceNode):
            children = list(current.value)
        size, depth = 1, 1
        for child in children:
            child_size, child_depth = measure(child)
            size, depth = size + child_size, max(depth, child_depth + 1)
            if size > MAX_NODES or depth > MAX_DEPTH:
                raise ConfigError(
                    f"expands to more than {MAX_NODES} values or {MAX_DEPTH} levels (check its aliases, *name)"
                )
        open_nodes.discard(key)
        sizes[key] = (size, depth)
        return size, depth

    return measure(node)[0]


def parse_yaml(text: str | bytes, what: str) -> Any:
    """The YAML document in text, parsed strictly (see the module docstring); ConfigError saying why not."""
    try:
        loader = _StrictLoader(text)  # the reader refuses control characters here already
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except ConfigError as error:
        raise ConfigError(f"{what} {error.message}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of 5000 digits
        raise ConfigError(f"{what} is not valid YAML: {type(exc).__name__}: {str(exc)[:120]}") from None
    finally:
        loader.dispose()


def load_yaml_mapping(path: Path, what: str) -> tuple[dict[str, Any], bytes]:
    """Read path as a YAML mapping; returns the mapping and the raw bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    data = parse_yaml(raw, f"the {what} file {path}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the {what} file {path} must hold a mapping at the top level")
    return data, raw


class Section:
    """A mapping being validated: every key read is ticked off; `done()` refuses the rest."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'top level'}: expected a mapping, got {_type_name(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(f"{path or 'top level'}: keys must be strings, got {key!r}")
        self._data: dict[str, object] = data
        self._path = path
        self._seen: set[str] = set()

    def child_path(self, key: str) -> str:
        """The dotted path of key inside this section."""
        return f"{self._path}.{key}" if self._path else key

    def _get(self, key: str, kind: type[T] | tuple[type, ...], default: object) -> Any:
        self._seen.add(key)
        if key not in self._data:
            if default is _REQUIRED:
                raise ConfigError(f"{self.child_path(key)}: required key is missing")
            return default
        value = self._data[key]
        # bool is an int in Python; refuse it where a number is expected.
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise ConfigError(f"{self.child_path(key)}: expected a number, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.child_path(key)}: expected {_kind_name(kind)}, got {_type_name(value)}")
        return value

    def text(self, key: str, default: object = None) -> Any:
        """A string value (or default)."""
        return self._get(key, str, _REQUIRED if default is None else default)

    def integer(self, key: str, default: int | None = None, minimum: int = 0, maximum: int | None = None) -> int:
        """An integer within [minimum, maximum]."""
        value: int = self._get(key, int, _REQUIRED if default is None else default)
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and {maximum}" if maximum is not None else ""
            raise ConfigError(f"{self.child_path(key)}: must be between {minimum}{upper}, got {value}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        """A boolean."""
        result: bool = self._get(key, bool, default)
        return result

    def duration_ms(self, key: str, default: str) -> int:
        """A duration such as ``90s``, ``15m``, ``12h``, ``30d``, in milliseconds."""
        value = self._get(key, str, default)
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None or int(match.group(1)) == 0:
            raise ConfigError(
                f"{self.child_path(key)}: expected a positive duration like 500ms, 90s, 15m, 12h or 30d, got {value!r}"
            )
        return int(match.group(1)) * _DURATION_UNITS_MS[match.group(2)]

    def optional(self, key: str, kinds: tuple[type, ...]) -> object:
        """A value of one of kinds, or None when the key is absent."""
        return self._get(key, kinds, None)

    def section(self, key: str, required: bool = False) -> Section:
        """A nested mapping (an empty one if absent and not required)."""
        value = self._get(key, dict, _REQUIRED if required else {})
        return Section(value, self.child_path(key))

    def list_of_str(self, key: str, default: list[str] | None = None) -> list[str]:
        """A list of strings."""
        value = self._get(key, list, _REQUIRED if default is None else default)
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.child_path(key)}[{index}]: expected a string, got {_type_name(item)}")
        return list(value)

    def sections(self, key: str) -> list[Section] | None:
        """A list of mappings, each as a Section named ``key[i]``; None when the key is absent."""
        value = self._get(key, list, None)
        if value is None:
            return None
        return [Section(item, f"{self.child_path(key)}[{index}]") for index, item in enumerate(value)]

    def keys(self) -> list[str]:
        """Every key of the mapping (all counted as seen)."""
        self._seen.update(self._data)
        return list(self._data)

    def done(self) -> None:
        """Refuse any key that was never read: unknown keys are errors."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.child_path(unknown[0])}: unknown key")


_REQUIRED = object()


def _type_name(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "a mapping", list: "a list"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)
