"""The content stage: normalise what an agent writes, then run the policy's filters.

Text is normalised first (Unicode NFKC; zero-width, bidi-control and other
control characters removed, newlines and tabs kept), so a key split by a
zero-width space or written in fullwidth digits is still the key. Then each
rule of the policy runs, in order, over the fields it names (content, tags,
metadata strings), with its action:

- ``reject``      the request is refused; the error names the rule, never the match
- ``redact``      every match is replaced by ``[redacted:RULE]`` before storing
- ``quarantine``  stored unchanged but invisible to agents until released
- ``flag``        stored unchanged; the hit is recorded in the audit trail

Patterns use the ``regex`` module so each search has a timeout: a rule that
errors or times out refuses the request (fail closed); it never crashes the
daemon and never lets the content through. Rules are compiled and trial-run
when the policy loads, so a broken rule fails the load, not a request.

The default rules (``default_filter_specs``) reject credentials that must
never enter the store (cloud and API keys, private-key blocks), redact
passwords and JWTs, quarantine script/HTML injection, and flag
prompt-injection phrases.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import regex

from guardian.integrity import canonical_json
from guardian.memories import Draft
from shared.errors import ConfigError, InvalidArgument, PermissionDenied

__all__ = [
    "DEFAULT_FILTERS_YAML",
    "FILTER_ACTIONS",
    "FILTER_FIELDS",
    "FilterAction",
    "FilterHit",
    "FilterOutcome",
    "FilterSet",
    "FilterSpec",
    "default_filter_specs",
    "normalise",
]

FilterAction = Literal["reject", "redact", "quarantine", "flag"]
FILTER_ACTIONS: Final[frozenset[str]] = frozenset({"reject", "redact", "quarantine", "flag"})
FILTER_FIELDS: Final[frozenset[str]] = frozenset({"content", "tags", "metadata"})
#: Seconds one rule may spend on one field before the request is refused.
SEARCH_TIMEOUT_S: Final = 0.05
_NAME_RE: Final = regex.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_INVISIBLE: Final = frozenset(
    [0x00AD, 0x180E, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)
_TRIAL_TEXT: Final = "The quick brown fox jumps over the lazy dog 0123456789 <p>x</p> key=value\n" * 4


def normalise(text: str) -> str:
    """NFKC, then remove zero-width, bidi-control and control characters (keeping newline and tab)."""
    text = unicodedata.normalize("NFKC", text.replace("\r\n", "\n"))
    return "".join(
        char
        for char in text
        if char in "\n\t" or (ord(char) not in _INVISIBLE and unicodedata.category(char) not in {"Cc", "Cf"})
    )


@dataclass(frozen=True)
class FilterSpec:
    """One rule as the policy states it."""

    name: str
    pattern: str
    action: FilterAction
    fields: frozenset[str] = FILTER_FIELDS
    ignore_case: bool = False


@dataclass(frozen=True)
class FilterHit:
    """A rule that matched (never the matched text)."""

    rule: str
    action: FilterAction
    field: str
    count: int


@dataclass(frozen=True)
class FilterOutcome:
    """The draft as it will be stored, and what matched."""

    draft: Draft
    hits: tuple[FilterHit, ...]
    quarantine: bool


@dataclass(frozen=True)
class _Rule:
    spec: FilterSpec
    compiled: Any  # regex.Pattern[str]; typed loosely because types-regex makes it generic per flags


class FilterSet:
    """The policy's compiled rules; immutable and safe to share between threads."""

    def __init__(self, rules: tuple[_Rule, ...]) -> None:
        self._rules = rules

    @classmethod
    def compile(cls, specs: Sequence[FilterSpec], path: str = "filters") -> FilterSet:
        """Compile and trial-run every rule; ConfigError names the offending rule's path."""
        seen: set[str] = set()
        rules: list[_Rule] = []
        for index, spec in enumerate(specs):
            where = f"{path}[{index}]"
            if _NAME_RE.fullmatch(spec.name) is None:
                raise ConfigError(f"{where}.name: use 1-64 lowercase letters, digits and '-'")
            if spec.name in seen:
                raise ConfigError(f"{where}.name: a rule named {spec.name!r} comes earlier")
            seen.add(spec.name)
            if spec.action not in FILTER_ACTIONS:
                raise ConfigError(f"{where}.action: expected one of {', '.join(sorted(FILTER_ACTIONS))}")
            if not spec.fields or not spec.fields <= FILTER_FIELDS:
                raise ConfigError(f"{where}.fields: name one or more of {', '.join(sorted(FILTER_FIELDS))}")
            flags = regex.V0 | (regex.IGNORECASE if spec.ignore_case else 0)
            try:
                compiled = regex.compile(spec.pattern, flags)
                if compiled.fullmatch("", timeout=SEARCH_TIMEOUT_S) is not None:
                    raise ConfigError(f"{where}.pattern: matches the empty string, so it would match everything")
                compiled.search(_TRIAL_TEXT, timeout=SEARCH_TIMEOUT_S * 4)
            except regex.error as exc:
                raise ConfigError(f"{where}.pattern: not a valid regular expression ({exc})") from None
            except TimeoutError:
                raise ConfigError(f"{where}.pattern: too slow on a short sample text; simplify it") from None
            rules.append(_Rule(spec, compiled))
        return cls(tuple(rules))

    @property
    def names(self) -> tuple[str, ...]:
        """The rule names, in order."""
        return tuple(rule.spec.name for rule in self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def scan(self, draft: Draft, changed: frozenset[str] | None = None) -> FilterOutcome:
        """Normalise and filter the fields of draft (only those in changed, for an update).

        Raises:
            PermissionDenied: a reject rule matched, or a rule could not run.
            InvalidArgument: content is empty once normalised.
        """
        fields = FILTER_FIELDS if changed is None else changed
        content = normalise(draft.content) if "content" in fields else draft.content
        if "content" in fields and not content.strip():
            raise InvalidArgument("content: is empty once control and zero-width characters are removed")
        tags = [normalise(tag) for tag in draft.tags] if "tags" in fields else list(draft.tags)
        metadata: Any = _map_strings(json.loads(draft.metadata_json), normalise) if "metadata" in fields else None
        hits: list[FilterHit] = []
        for rule in self._rules:
            spec = rule.spec
            if "content" in fields and "content" in spec.fields:
                content = self._apply(rule, content, "content", hits)
            if "tags" in fields and "tags" in spec.fields:
                tags = [self._apply(rule, tag, f"tags[{index}]", hits) for index, tag in enumerate(tags)]
            if metadata is not None and "metadata" in spec.fields:
                metadata = _map_strings(metadata, lambda text, r=rule: self._apply(r, text, "metadata", hits))
        filtered = replace(
            draft,
            content=content,
            tags=tuple(dict.fromkeys(tag for tag in tags if tag.strip())),
            metadata_json=canonical_json(metadata) if metadata is not None else draft.metadata_json,
        )
        merged = _merge(hits)
        return FilterOutcome(filtered, merged, any(hit.action == "quarantine" for hit in merged))

    @staticmethod
    def _apply(rule: _Rule, text: str, field: str, hits: list[FilterHit]) -> str:
        spec = rule.spec
        try:
            if spec.action == "redact":
                text, count = rule.compiled.subn(f"[redacted:{spec.name}]", text, timeout=SEARCH_TIMEOUT_S)
            else:
                count = 1 if rule.compiled.search(text, timeout=SEARCH_TIMEOUT_S) is not None else 0
        except Exception:
            raise PermissionDenied(f"content filter {spec.name} could not run; the request is refused") from None
        if count:
            if spec.action == "reject":
                raise PermissionDenied(f"content refused by filter {spec.name}: remove that part and try again")
            hits.append(FilterHit(spec.name, spec.action, field, count))
        return text


def _map_strings(value: Any, change: Any) -> Any:
    """value with every string in it (object keys too) passed through change."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_map_strings(item, change) for item in value]
    if isinstance(value, dict):
        return {change(key): _map_strings(item, change) for key, item in value.items()}
    return value


def _merge(hits: list[FilterHit]) -> tuple[FilterHit, ...]:
    """One hit per (rule, field kind), counts summed."""
    merged: dict[tuple[str, str], FilterHit] = {}
    for hit in hits:
        kind = hit.field.split("[", 1)[0]
        previous = merged.get((hit.rule, kind))
        count = hit.count + (previous.count if previous else 0)
        merged[(hit.rule, kind)] = FilterHit(hit.rule, hit.action, kind, count)
    return tuple(merged.values())


# The shipped rules, as YAML for policy.yaml and parsed back by default_filter_specs().
DEFAULT_FILTERS_YAML: Final = r"""filters:
  - {name: private-key-block, action: reject, pattern: '-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY( BLOCK)?-----'}
  - {name: aws-access-key-id, action: reject, pattern: '\b(?:AKIA|ASIA)[0-9A-Z]{16}\b'}
  - {name: aws-secret-access-key, action: reject, ignore_case: true, pattern: 'aws_?secret_?access_?key\s*[=:]\s*["'']?[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])'}
  - {name: github-token, action: reject, pattern: '\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b'}
  - {name: slack-token, action: reject, pattern: '\bxox[abprs]-[A-Za-z0-9-]{10,}\b'}
  - {name: google-api-key, action: reject, pattern: '\bAIza[0-9A-Za-z_-]{35}\b'}
  - {name: stripe-live-key, action: reject, pattern: '\b(?:sk|rk)_live_[0-9A-Za-z]{16,}\b'}
  - {name: llm-api-key, action: reject, pattern: '\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{32,}\b'}
  - {name: jwt, action: redact, pattern: '\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b'}
  - {name: password-assignment, action: redact, ignore_case: true, pattern: '\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token)\s*[=:]\s*["'']?[^\s"'',;]{4,}'}
  - {name: script-injection, action: quarantine, ignore_case: true, pattern: '<\s*(?:script|iframe|object|embed)\b|\bjavascript\s*:|\bon(?:error|load|click|mouseover)\s*='}
  - {name: prompt-injection, action: flag, ignore_case: true, fields: [content, metadata], pattern: '\b(?:ignore|disregard|forget)\s+(?:all\s+)?(?:the\s+|your\s+)?(?:previous|prior|above)\s+(?:instructions|prompts?|rules)\b|\breveal\s+(?:your|the)\s+system\s+prompt\b|\bdisregard\s+the\s+system\s+prompt\b'}
"""


def default_filter_specs() -> tuple[FilterSpec, ...]:
    """The shipped rules, parsed from :data:`DEFAULT_FILTERS_YAML` (one source for both)."""
    import yaml  # noqa: PLC0415 - only at policy load

    specs = []
    for item in yaml.safe_load(DEFAULT_FILTERS_YAML)["filters"]:
        specs.append(
            FilterSpec(
                name=item["name"],
                pattern=item["pattern"],
                action=item["action"],
                fields=frozenset(item.get("fields", FILTER_FIELDS)),
                ignore_case=bool(item.get("ignore_case", False)),
            )
        )
    return tuple(specs)
