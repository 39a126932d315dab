"""Strict reading of the guardian's YAML files (config and policy).

A file is read with ``yaml.safe_load`` and walked with :class:`Section`, which
refuses unknown keys and wrong types and names the offending path in the
error, so an operator's typo fails the load instead of being ignored.
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


def load_yaml_mapping(path: Path, what: str) -> tuple[dict[str, Any], bytes]:
    """Read path as a YAML mapping; returns the mapping and the raw bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the {what} file {path} is not valid YAML: {exc}") from exc
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
