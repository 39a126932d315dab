r"""The content stage: scan what an agent writes with the policy's filters, store it as it was sent.

Stage 5 of the guardian's pipeline (session → shape → policy → rate → **content**
→ data → integrity → audit). It sees a shape-checked :class:`~guardian.store.memories.Draft`
and returns the draft to store, or refuses the request.

A memory is stored exactly as it was sent: the rules match its *scan form*
(:mod:`guardian.store.scan_form`: NFKC, invisible characters removed), so a key split by
a zero-width space or written in fullwidth letters is still the key, and a
redaction replaces the part of the original that the match came from. The scan
form runs on the content, on every tag and on every string of the metadata,
object keys included.

Then each rule runs, in policy order, over the fields it names (``content``,
``tags``, ``metadata``), with its action:

==============  ===================================================================
``reject``      the request is refused; the error names the rule, never the match;
                the first rule that matches decides
``redact``      the text under every match is replaced by ``[redacted:RULE]`` before
                storing, and the reply names the rule (``redacted_by``); when the
                pattern has a group named ``redact`` (``(?P<redact>...)``), only
                that group's text is replaced and the rest of the match is context
                that stays (the whole match when the group is empty or unset)
``quarantine``  stored unchanged but hidden from agents until the security team
                releases it
``flag``        stored unchanged; the hit is recorded in the audit trail
==============  ===================================================================

Every hit (rule, action, field, number of matches) is returned for the audit
record; the matched text never leaves this module.

The engine is RE2 (google-re2, :mod:`guardian.checks.filter_engine`), whose searches
take time linear in the text's length whatever the pattern, so no rule has a time
budget: a rule runs to its answer or errors. The rules that scan a field form one
``re2.Set`` for that field, which tells in one pass over a text (with the GIL
released) which rules can match it; only those rules then search the text
themselves: a reject rule for a match, a redact rule for every match's span, a
quarantine or flag rule to count its matches. A redaction changes the text, so the
rules after it see the new text, and the set makes a pass of its own over it. The
set only ever skips work: when it cannot finish a pass, every rule of the field
searches the text. A rule that errors refuses the request (fail closed): it never
crashes the daemon and never lets the content through.

RE2 is linear because it leaves out what needs backtracking, so a pattern must not
use lookahead ``(?=`` ``(?!``, lookbehind ``(?<=`` ``(?<!``, backreferences (``\1``,
``(?P=name)``, ``\k<name>``), atomic groups ``(?>``, possessive quantifiers (``*+``
``++`` ``?+`` ``}+``), recursion (``(?R)``, ``(?1)``), conditionals ``(?(...)``, ``\G``
or ``\Z`` (write ``\z``); ``{,N}`` (literal text to RE2) and ``\C`` (one byte) are
refused too. :meth:`FilterSet.compile` refuses such a rule when the policy loads,
naming the rule and the construct, as it refuses a pattern RE2 rejects otherwise
(quoting RE2's error), one that can match the empty string, and one too large for
RE2's memory budget (8 MiB a rule). A :class:`FilterSet` is immutable and safe to
share between threads.

Where a pattern means something else to RE2 than to Python's ``regex`` module, the
engine before it:

- ``\b`` and ``\B`` are ASCII word boundaries: next to a non-ASCII letter, digit or
  mark (é, 日, ß) RE2 sees a boundary where ``regex`` saw none, so ``\bignore`` now
  matches in "忽略ignore all previous instructions", and ``\b\w+\b`` finds no word of
  non-ASCII letters alone. The scan form has already made fullwidth letters ASCII.
- ``\d``, ``\s`` and ``\w`` (and ``\D``, ``\S``, ``\W``) keep their Unicode meaning
  (RE2's are ASCII; it is handed Unicode classes for them), except ``\S`` and ``\W``
  inside a ``[...]`` class, which are ASCII there.
- ``ignore_case`` folds case by Unicode's simple folding: ``i`` no longer matches the
  Turkish dotted capital I (U+0130), nor ``I`` the dotless i (U+0131).
- ``$`` is the end of the text only (``regex`` also matched before a final
  newline); ``(?m)`` makes it the end of a line, as before.

The shipped rules (:func:`default_filter_specs`, and the same rules as YAML in
:data:`DEFAULT_FILTERS_YAML` for the shipped policy file):

=====================  ==========  =========================================================
rule                   action      what it matches
=====================  ==========  =========================================================
private-key-block      reject      ``-----BEGIN ... PRIVATE KEY-----`` (PEM, OpenSSH, PGP)
aws-access-key-id      reject      ``AKIA``/``ASIA`` + 16 upper-case letters or digits
aws-secret-access-key  reject      ``aws_secret_access_key = <40 base64 characters>``
github-token           reject      ``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_`` + 36+, ``github_pat_...``
slack-token            reject      ``xoxa-``/``xoxb-``/``xoxp-``/``xoxr-``/``xoxs-`` tokens
slack-webhook          reject      ``https://hooks.slack.com/services/...``
google-api-key         reject      ``AIza`` + 35
stripe-live-key        reject      ``sk_live_``/``rk_live_`` keys
llm-api-key            reject      ``sk-ant-...``, ``sk-proj-...``, ``sk-...`` (32+ characters; a bare ``sk-`` needs a digit)
jwt                    redact      three base64url segments, header and payload starting ``eyJ``
bearer-token           redact      ``Bearer <20+ token characters with a digit>``
url-credentials        redact      ``scheme://user:password@`` in a URL
password-assignment    redact      ``password``/``secret``/``api_key``/``access_token``... ``=`` a value
                                   (after ``:``, only a quoted value or one with a digit or symbol)
script-injection       quarantine  ``<script``, ``<iframe``, ``<object``, ``<embed``, ``javascript:``,
                                   ``onerror=``/``onload=``/... event handlers
prompt-injection       flag        "ignore (all) previous instructions", "disregard the system
                                   prompt", "reveal your system prompt", "you are now DAN / in
                                   developer mode / an unrestricted AI" (case-insensitive)
=====================  ==========  =========================================================

Credentials are rejected because a secret must not enter the store at all;
passwords and tokens in assignments are redacted because the rest of the note
is usually worth keeping. The rules anchor on formats and assignments, never on
words alone ("password policy", "sk-learn", "the AKIA prefix", "JavaScript: React"
pass), because every hit also counts towards the ``filter_hits`` anomaly
detector. Filters catch accidents and simple evasions; an agent determined to
smuggle a secret past them (base64, spelling it out) is outside what patterns
can see.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import re2

from guardian.checks.filter_engine import MAX_MEM, PatternSet, compile_pattern
from guardian.store.integrity import canonical_json
from guardian.store.memories import Draft
from guardian.store.scan_form import ScanForm
from shared.errors import ConfigError, ContentRefused, InvalidArgument

__all__ = [
    "DEFAULT_FILTERS_YAML",
    "FILTER_ACTIONS",
    "FILTER_FIELDS",
    "REDACT_GROUP",
    "FilterAction",
    "FilterHit",
    "FilterOutcome",
    "FilterSet",
    "FilterSpec",
    "default_filter_specs",
]

log = logging.getLogger("agent_guardian")

#: What a rule does with a match.
FilterAction = Literal["reject", "redact", "quarantine", "flag"]
#: Every :data:`FilterAction`, for validating a policy file.
FILTER_ACTIONS: Final[frozenset[str]] = frozenset({"reject", "redact", "quarantine", "flag"})
#: The fields of a memory a rule can scan.
FILTER_FIELDS: Final[frozenset[str]] = frozenset({"content", "tags", "metadata"})
#: In a redact rule, the group whose text a redaction replaces (the rest of the match is context that stays).
REDACT_GROUP: Final = "redact"

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


@dataclass(frozen=True)
class FilterSpec:
    """One rule as the policy states it; :meth:`FilterSet.compile` validates it."""

    #: 1-64 lowercase letters, digits and '-', starting with a letter or digit; unique in a policy.
    name: str
    #: A regular expression in RE2 syntax (no lookaround or backreferences; see the module docstring).
    pattern: str
    action: FilterAction
    #: Which of :data:`FILTER_FIELDS` the rule scans.
    fields: frozenset[str] = FILTER_FIELDS
    ignore_case: bool = False


@dataclass(frozen=True)
class FilterHit:
    """A rule that matched, where, and how often (never the matched text)."""

    rule: str
    action: FilterAction
    #: "content", "tags[INDEX]" (the tag's index in the draft as given) or "metadata".
    field: str
    #: Number of (non-overlapping) matches.
    count: int


@dataclass(frozen=True)
class FilterOutcome:
    """The draft as it will be stored, and what matched (a reject never gets here: scan raises)."""

    #: As sent, with redactions applied.
    draft: Draft
    hits: tuple[FilterHit, ...]
    #: Some quarantine rule matched: store the memory hidden from agents.
    quarantine: bool

    @property
    def redacted_by(self) -> tuple[str, ...]:
        """The rules that redacted something, in order (the reply tells the agent)."""
        return tuple(dict.fromkeys(hit.rule for hit in self.hits if hit.action == "redact"))


@dataclass(frozen=True)
class _Rule:
    spec: FilterSpec
    #: The rule's pattern compiled by RE2 (case-insensitive when the spec says so).
    compiled: re2._Regexp
    #: What a redaction puts in place of a match (the name is [a-z0-9-], so no template escapes).
    marker: str
    #: The number of a redact rule's group named :data:`REDACT_GROUP`, or None: the whole match is replaced.
    redact_group: int | None = None

    def spans(self, text: str) -> tuple[int, list[tuple[int, int]]]:
        """The rule's matches in text: how many, and for a redact rule the spans to replace (in order).

        A reject rule stops at its first match (one is enough to refuse).
        """
        action = self.spec.action
        if action == "reject":
            return (0 if self.compiled.search(text) is None else 1), []
        if action != "redact":
            return sum(1 for _ in self.compiled.finditer(text)), []
        spans = []
        for match in self.compiled.finditer(text):
            span = match.span(self.redact_group) if self.redact_group is not None else (-1, -1)
            # An unset or empty redact group redacts the whole match: never less than the rule matched.
            spans.append(span if span[1] > span[0] >= 0 else match.span())
        return len(spans), spans


class _Candidates:
    """Which rules can match each text of one scan, one set pass per distinct text (a redaction makes a new text)."""

    __slots__ = ("_known", "_sets")

    def __init__(self, sets: dict[str, PatternSet]) -> None:
        self._sets = sets
        self._known: dict[tuple[str, str], frozenset[int] | None] = {}

    def may_match(self, position: int, field: str, text: str) -> bool:
        """Whether the rule at position can match text (in field); True when the set could not tell."""
        possible = self._possible(field, text)
        return possible is None or position in possible

    def union(self, field: str, texts: Sequence[str]) -> frozenset[int] | None:
        """The positions of the rules that can match any of texts (in field); None when the set could not tell."""
        found: set[int] = set()
        for text in texts:
            possible = self._possible(field, text)
            if possible is None:
                return None
            found |= possible
        return frozenset(found)

    def _possible(self, field: str, text: str) -> frozenset[int] | None:
        key = (field, text)
        if key not in self._known:
            self._known[key] = self._sets[field].possible(text)
        return self._known[key]


def _run(rule: _Rule, field: str, form: ScanForm) -> tuple[ScanForm, int]:
    """form after rule (redacted where it matched, for a redact rule), and the number of matches.

    Raises ContentRefused on a reject match or when the rule cannot run.
    """
    spec = rule.spec
    try:
        count, spans = rule.spans(form.text)
    except Exception as exc:  # fail closed: a rule that cannot run refuses the request (never BaseException)
        # The exception's type only: its text could quote the content.
        log.warning("content filter %s could not run on %s: %s", spec.name, field, type(exc).__name__)
        raise ContentRefused(
            f"content filter {spec.name} could not run; the request is refused", rule=spec.name
        ) from None
    if count and spec.action == "reject":
        raise ContentRefused(f"content refused by filter {spec.name}: remove that part and try again", spec.name)
    # The redaction replaces what the matches came from in the text as sent; the next rule scans the result.
    return (ScanForm.of(form.replaced(spans, rule.marker)) if spans else form), count


class FilterSet:
    """The policy's compiled rules, in order; immutable and safe to share between threads.

    Build one with :meth:`compile`.
    """

    __slots__ = ("_rules", "_sets")

    def __init__(self, rules: tuple[_Rule, ...] = (), path: str = "filters") -> None:
        """rules, in policy order, and one set per field of those that scan it.

        Raises ConfigError (naming path) when a field's rules are together too large for one set.
        """
        self._rules = rules
        self._sets: dict[str, PatternSet] = {}
        for field in sorted(FILTER_FIELDS):
            scanning = [(position, rule) for position, rule in enumerate(rules) if field in rule.spec.fields]
            try:
                self._sets[field] = PatternSet(
                    [(position, rule.compiled, rule.spec.ignore_case) for position, rule in scanning]
                )
            except ValueError:
                raise ConfigError(
                    f"{path}: the rules that scan {field} are together too large for the linear-time engine (RE2)"
                    f" to run in one pass within its {MAX_MEM >> 20} MiB memory budget; use fewer or smaller rules"
                ) from None

    @classmethod
    def compile(cls, specs: Sequence[FilterSpec], path: str = "filters") -> FilterSet:
        """Validate and compile every rule, and each field's set of them.

        Raises:
            ConfigError: naming ``PATH[INDEX].FIELD`` of the first bad rule: a bad or duplicate
                name, an unknown action, no or unknown fields, or a pattern (naming the rule too)
                that RE2 cannot run (lookaround, backreferences and the rest: the message names
                the construct), that is not valid, is too large, or can match the empty string.
                The message quotes RE2's error, never the pattern.
        """
        seen: set[str] = set()
        rules: list[_Rule] = []
        for index, spec in enumerate(specs):
            where = f"{path}[{index}]"
            if not isinstance(spec.name, str) or _NAME_RE.fullmatch(spec.name) is None:
                raise ConfigError(f"{where}.name: use 1-64 lowercase letters, digits and '-', starting with no '-'")
            if spec.name in seen:
                raise ConfigError(f"{where}.name: a rule named {spec.name!r} comes earlier; names must be unique")
            seen.add(spec.name)
            if spec.action not in FILTER_ACTIONS:
                raise ConfigError(f"{where}.action: expected one of {', '.join(sorted(FILTER_ACTIONS))}")
            if not spec.fields or not spec.fields <= FILTER_FIELDS:
                raise ConfigError(f"{where}.fields: name one or more of {', '.join(sorted(FILTER_FIELDS))}")
            if not isinstance(spec.pattern, str):
                raise ConfigError(f"{where}.pattern: expected a regular expression as a string")
            where = f"{where}.pattern (rule {spec.name})"
            compiled = compile_pattern(spec.pattern, spec.ignore_case, where)
            group = compiled.groupindex.get(REDACT_GROUP) if spec.action == "redact" else None
            if group is None:  # only a match's bounds are needed: RE2 finds them faster when no group captures
                compiled = compile_pattern(spec.pattern, spec.ignore_case, where, capture=False)
            rules.append(_Rule(spec, compiled, f"[redacted:{spec.name}]", group))
        return cls(tuple(rules), path)

    @property
    def names(self) -> tuple[str, ...]:
        """The rule names, in order."""
        return tuple(rule.spec.name for rule in self._rules)

    def __len__(self) -> int:
        """The number of rules."""
        return len(self._rules)

    def scan(self, draft: Draft, changed: frozenset[str] | None = None) -> FilterOutcome:
        """Filter draft's fields (for an update, only those in changed) as their scan forms.

        What is returned is the draft as sent, but for redactions (the very draft given when no
        rule changed any of its fields); tags stay distinct
        after redaction, and metadata is re-serialised canonically.

        Raises:
            ContentRefused (a PermissionDenied): a reject rule matched (the message names the rule, never the
                match), or a rule errored.
            InvalidArgument: the content or a tag is empty once invisible characters are removed, or two
                metadata keys become the same once redacted.
        """
        fields = FILTER_FIELDS if changed is None else FILTER_FIELDS & changed
        forms = _Fields.read(draft, fields)
        # One set pass per text says which rules can match it; the rules still run in policy order, rule by
        # rule over the fields, so the first reject in the policy decides and a redaction is what later
        # rules see (its new text gets a pass of its own).
        # A rule the passes rule out for every text of a field costs one set lookup there (the usual case).
        candidates = _Candidates(self._sets)
        hits: list[FilterHit] = []
        scanned = [field for field in ("content", "tags", "metadata") if field in fields]
        if not any(forms.may_match(field, None, candidates) for field in scanned):
            return FilterOutcome(forms.filtered(draft), (), False)  # no rule can match any text
        for position, rule in enumerate(self._rules):
            for field in ("content", "tags", "metadata"):
                if field in fields and field in rule.spec.fields and forms.may_match(field, position, candidates):
                    hits += forms.apply(field, position, rule, candidates)
        return FilterOutcome(forms.filtered(draft), tuple(hits), any(hit.action == "quarantine" for hit in hits))


class _Fields:
    """The scan forms of one draft's fields being filtered, as the rules so far changed them."""

    __slots__ = ("_possible", "content", "has_metadata", "metadata", "metadata_texts", "tags")

    def __init__(
        self, content: ScanForm | None, tags: list[tuple[int, ScanForm]] | None, has_metadata: bool, metadata: Any
    ) -> None:
        #: None when the content is not filtered.
        self.content = content
        #: (index in the draft as given, scan form), or None when tags are not filtered: the index names a tag in a hit.
        self.tags = tags
        #: Whether metadata is filtered, and then its parsed JSON.
        self.has_metadata = has_metadata
        self.metadata = metadata
        #: The scan forms of every string in metadata, or None when not worked out since metadata last changed.
        self.metadata_texts: list[str] | None = None
        #: Per field, the positions of the rules that can match some text of it as it is now (None: any may).
        self._possible: dict[str, frozenset[int] | None] = {}

    @classmethod
    def read(cls, draft: Draft, fields: frozenset[str]) -> _Fields:
        """draft's fields (those in fields) as scan forms and parsed JSON.

        Raises InvalidArgument: the content or a tag is empty once invisible characters are removed,
        or the metadata is not JSON.
        """
        content: ScanForm | None = None
        tags: list[tuple[int, ScanForm]] | None = None
        metadata: Any = None
        if "content" in fields:
            content = ScanForm.of(draft.content)
            if not content.text.strip():
                raise InvalidArgument("content: is empty once control and zero-width characters are removed")
        if "tags" in fields:
            tags = []
            for index, tag in enumerate(draft.tags):
                form = ScanForm.of(tag)
                if not form.text.strip():
                    raise InvalidArgument(f"tags[{index}]: is empty once control and zero-width characters are removed")
                tags.append((index, form))
        if "metadata" in fields:
            try:
                metadata = json.loads(draft.metadata_json)
            except ValueError:
                raise InvalidArgument("metadata: expected a JSON object") from None
        return cls(content, tags, "metadata" in fields, metadata)

    def may_match(self, field: str, position: int | None, candidates: _Candidates) -> bool:
        """Whether the rule at position (None: any rule) can match some text of field as the rules so far left
        it."""
        if field not in self._possible:
            self._possible[field] = candidates.union(field, self._texts(field))
        possible = self._possible[field]
        return possible is None or (bool(possible) if position is None else position in possible)

    def _texts(self, field: str) -> list[str]:
        """field's texts to scan, as the rules so far left them."""
        if field == "content":
            return [self.content.text] if self.content is not None else []
        if field == "tags":
            return [form.text for _, form in self.tags or ()]
        if self.metadata_texts is None:
            self.metadata_texts = [ScanForm.of(text).text for text in _strings(self.metadata)]
        return self.metadata_texts

    def apply(self, field: str, position: int, rule: _Rule, candidates: _Candidates) -> list[FilterHit]:
        """Run rule (at position in the policy) over field, where the set says it can match; its hits.

        Raises ContentRefused (a reject matched, or the rule cannot run) and InvalidArgument (two metadata
        keys redacted to the same key).
        """
        spec = rule.spec
        hits: list[FilterHit] = []
        if field == "content" and self.content is not None:
            if candidates.may_match(position, field, self.content.text):
                self.content, count = _run(rule, field, self.content)
                hits += [FilterHit(spec.name, spec.action, field, count)] if count else []
        elif field == "tags" and self.tags is not None:
            for slot, (index, form) in enumerate(self.tags):
                if candidates.may_match(position, field, form.text):
                    after, count = _run(rule, field, form)
                    self.tags[slot] = (index, after)
                    hits += [FilterHit(spec.name, spec.action, f"tags[{index}]", count)] if count else []
        elif (
            field == "metadata"
            and self.has_metadata
            and any(candidates.may_match(position, field, text) for text in self._texts(field))
        ):
            counted = [0]
            collision = f"metadata: two keys are the same once filter {spec.name} redacts them; rename them"
            self.metadata = _map_strings(self.metadata, _on_original(rule, position, candidates, counted), collision)
            if counted[0]:
                hits.append(FilterHit(spec.name, spec.action, field, counted[0]))
                self.metadata_texts = None  # a redaction may have changed some
        if hits and spec.action == "redact":  # the field's texts changed: the next rules look at them anew
            self._possible.pop(field, None)
        return hits

    def filtered(self, draft: Draft) -> Draft:
        """draft with its filtered fields as the rules left them (as sent, but for redactions)."""
        changes: dict[str, Any] = {}
        if self.content is not None and self.content.original != draft.content:
            changes["content"] = self.content.original
        if self.tags is not None:
            tags = tuple(dict.fromkeys(form.original for _, form in self.tags))  # distinct after redaction too
            if tags != draft.tags:
                changes["tags"] = tags
        if self.has_metadata:
            metadata_json = canonical_json(self.metadata)
            if metadata_json != draft.metadata_json:
                changes["metadata_json"] = metadata_json
        return replace(draft, **changes) if changes else draft


def _on_original(rule: _Rule, position: int, candidates: _Candidates, counted: list[int]) -> Callable[[str], str]:
    """rule as a change of one metadata string as sent (a key or a value): scanned, redacted where it matched.

    Adds the matches to counted[0].
    """

    def change(text: str) -> str:
        form = ScanForm.of(text)
        if not candidates.may_match(position, "metadata", form.text):
            return text
        after, count = _run(rule, "metadata", form)
        counted[0] += count
        return after.original

    return change


def _strings(value: Any) -> list[str]:
    """Every string in value (parsed JSON), object keys too."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            found.extend(item)
            stack.extend(item.values())
    return found


def _map_strings(value: Any, change: Callable[[str], str], collision: str) -> Any:
    """value (parsed JSON) with every string in it, object keys too, passed through change.

    Raises InvalidArgument(collision) when two keys of one object become the same.
    """
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [_map_strings(item, change, collision) for item in value]
    if isinstance(value, dict):
        mapped: dict[str, Any] = {}
        for key, item in value.items():
            new_key = change(key)
            if new_key in mapped:
                raise InvalidArgument(collision)
            mapped[new_key] = _map_strings(item, change, collision)
        return mapped
    return value


# --- the shipped rules -------------------------------------------------------------------------------------------


def _times(cls: str, count: int) -> str:
    """cls repeated count times, as a pattern."""
    return "" if count == 0 else cls if count == 1 else f"{cls}{{{count}}}"


def _run_with(run: str, mark: str, other: str, at_least: int, within: int) -> str:
    """A whole run of run-characters, at least at_least long, with a mark-character among its first within.

    The lookahead-free form of ``(?=RUN{0,WITHIN-1}MARK)RUN{AT_LEAST,}``: other is run without
    mark, and the alternatives enumerate where the first mark is, so exactly one of them fits
    a given run, and the match ends where the run does (as the greedy original did).
    """
    first_in_reach = [
        f"{_times(other, before)}{mark}{_times(run, at_least - 1 - before)}" for before in range(at_least - 1)
    ]
    return f"(?:{'|'.join([*first_in_reach, f'{other}{{{at_least - 1},{within - 1}}}{mark}'])}){run}*"


# The shipped rules: the one source of default_filter_specs() and DEFAULT_FILTERS_YAML.
# Order matters: rejects run first, so a credential is refused before a redaction could hide it.
# A token is bounded where \b cannot bound it (a key after "_" or ending in "-") without lookaround:
# - before it, (?:^|[^A-Za-z0-9]) takes the character in front, so a redact rule puts the token in
#   (?P<redact>...) and the character stays;
# - after a token of fixed or bounded length, a reject rule takes the next character, (?:[^A-Za-z0-9]|$);
# - after an unbounded run nothing is needed: the greedy run already took every character it could.
_DEFAULTS: Final[tuple[tuple[str, FilterSpec], ...]] = (
    (
        "PEM, OpenSSH and PGP private keys (public keys and certificates pass)",
        FilterSpec(
            "private-key-block",
            r"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY(?: BLOCK)?-----",
            "reject",
        ),
    ),
    (
        "AWS access key ids: AKIA (long-lived) or ASIA (temporary) + 16",
        FilterSpec(
            "aws-access-key-id",
            r"(?:^|[^A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?:[^A-Za-z0-9]|$)",
            "reject",
        ),
    ),
    (
        "AWS secret access keys assigned in credentials files, env, JSON or code",
        FilterSpec(
            "aws-secret-access-key",
            r"""aws[_-]?secret[_-]?access[_-]?key["']?\s*(?:=>?|:)\s*["']?[A-Za-z0-9/+]{40}(?:[^A-Za-z0-9/+=]|$)""",
            "reject",
            ignore_case=True,
        ),
    ),
    (
        "GitHub personal, OAuth, user-to-server, server-to-server, refresh and fine-grained tokens",
        FilterSpec(
            "github-token",
            r"(?:^|[^A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})(?:[^A-Za-z0-9_]|$)",
            "reject",
        ),
    ),
    (
        "Slack bot, user, app, refresh and legacy tokens",
        FilterSpec(
            "slack-token",
            r"(?:^|[^A-Za-z0-9-])xox[abprs]-" + _run_with("[A-Za-z0-9-]", "[0-9]", "[A-Za-z-]", at_least=10, within=65),
            "reject",
        ),
    ),
    (
        "Slack incoming-webhook and workflow URLs (anyone holding one can post)",
        FilterSpec(
            "slack-webhook",
            r"https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{20,}",
            "reject",
        ),
    ),
    (
        "Google API keys: AIza + 35",
        FilterSpec(
            "google-api-key",
            r"(?:^|[^A-Za-z0-9_-])AIza[A-Za-z0-9_-]{35}(?:[^A-Za-z0-9_-]|$)",
            "reject",
        ),
    ),
    (
        "Stripe live secret and restricted keys (test keys pass)",
        FilterSpec(
            "stripe-live-key",
            r"(?:^|[^A-Za-z0-9])(?:sk|rk)_live_[A-Za-z0-9]{16,}",
            "reject",
        ),
    ),
    (
        "OpenAI (sk-proj-, sk-svcacct-, sk-admin-, sk-) and Anthropic (sk-ant-) keys; a bare sk- key needs a digit",
        FilterSpec(
            "llm-api-key",
            r"(?:^|[^A-Za-z0-9_-])sk-(?:(?:ant|proj|svcacct|admin)-[A-Za-z0-9_-]{32,}|"
            + _run_with("[A-Za-z0-9_-]", "[0-9]", "[A-Za-z_-]", at_least=32, within=65)
            + ")",
            "reject",
        ),
    ),
    (
        "JSON Web Tokens: header.payload.signature, header and payload starting eyJ",
        FilterSpec(
            "jwt",
            r"(?:^|[^A-Za-z0-9_-])(?P<redact>eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})",
            "redact",
        ),
    ),
    (
        "HTTP bearer tokens (Authorization: Bearer ...)",
        FilterSpec(
            "bearer-token",
            r"\bbearer[ \t]+"
            + _run_with("[A-Za-z0-9._~+/-]", "[0-9]", "[A-Za-z._~+/-]", at_least=20, within=65)
            + "=*",
            "redact",
            ignore_case=True,
        ),
    ),
    (
        "user:password@ in a URL (database, broker and proxy URLs)",
        FilterSpec(
            "url-credentials",
            r"\b[a-z][a-z0-9+.-]{1,30}://[^\s/:@]{1,256}:[^\s/@]{1,256}@",
            "redact",
            ignore_case=True,
        ),
    ),
    (
        "password, secret, api_key, access_token ... = value; after ':' only a quoted value or one with a digit or symbol",
        FilterSpec(
            "password-assignment",
            r"(?:^|[^A-Za-z0-9])(?P<redact>(?:password|passwd|passphrase|(?:client[_-]?)?secret(?:[_-]?key)?|api[_-]?key"
            r"""|(?:access|auth|refresh)[_-]?token)["']?[ \t]*"""
            r"""(?:=>?[ \t]*["']?[^\s"',;]{4,}"""
            r"""|:[ \t]*(?:["'][^"'\n]{4,}|"""
            + _run_with(
                r"""[^\s"',;]""",
                r"[0-9!@#$%^&*_+=/\\|~?<>]",
                r"""[^\s"',;0-9!@#$%^&*_+=/\\|~?<>]""",
                at_least=4,
                within=33,
            )
            + ")))",
            "redact",
            ignore_case=True,
        ),
    ),
    (
        "script and HTML injection: script-capable tags, javascript:/vbscript: URLs, event-handler attributes",
        FilterSpec(
            "script-injection",
            r"<\s*(?:script|iframe|frame|object|embed|applet)\b|\b(?:javascript|vbscript):\S|\bdata:text/html"
            r"|\bon(?:error|load|click|mouseover|mouseenter|focus|blur|toggle|animationstart|pointerover)\s*=",
            "quarantine",
            ignore_case=True,
        ),
    ),
    (
        "prompt injection aimed at the agent that later reads the memory",
        FilterSpec(
            "prompt-injection",
            r"\b(?:ignore|disregard|forget|override)\s+(?:all\s+(?:of\s+)?)?(?:the\s+|your\s+|any\s+)?"
            r"(?:previous|prior|above|earlier|preceding)\s+(?:instructions|prompts?|rules|directions|guidelines)\b"
            r"|\b(?:ignore|disregard|forget|override|bypass)\s+(?:the|your)\s+system\s+prompt\b"
            r"|\breveal\s+(?:your|the)\s+(?:system\s+prompt|hidden\s+instructions)\b"
            r"|\b(?:print|repeat|output)\s+your\s+system\s+prompt\b"
            r"|\byou\s+are\s+now\s+(?:(?-i:DAN)\b|in\s+(?:developer|god|jailbreak|unrestricted|unfiltered)\s+mode\b"
            r"|an?\s+(?:unrestricted|unfiltered|uncensored|jailbroken)\b|no\s+longer\s+(?:bound|restricted|limited)\b)",
            "flag",
            ignore_case=True,
        ),
    ),
)


def default_filter_specs() -> tuple[FilterSpec, ...]:
    """The shipped rules (used when the policy leaves ``filters`` out), in order."""
    return tuple(spec for _, spec in _DEFAULTS)


def _yaml_quoted(text: str) -> str:
    """text as a YAML single-quoted scalar: no escapes inside, a quote is doubled."""
    if any(char in text for char in "\n\r") or not text.isprintable():
        raise ValueError("a single-quoted YAML scalar here must be one line of printable characters")
    return "'" + text.replace("'", "''") + "'"


def _render_yaml(rules: Sequence[tuple[str, FilterSpec]]) -> str:
    lines = [
        "filters:",
        "  # name: unique; pattern: an RE2 regular expression (linear time: no lookahead, lookbehind,",
        "  # backreferences, atomic groups or possessive quantifiers), single-quoted (write '' for ');",
        "  # fields: any of content, tags, metadata (all three when left out); ignore_case: false when left out.",
        "  # A redact rule replaces the whole match, or only its group named redact, (?P<redact>...),",
        "  # when it has one: the rest of the match is context that stays, such as the character before a token.",
    ]
    for comment, spec in rules:
        options = [f"name: {spec.name}", f"action: {spec.action}"]
        if spec.ignore_case:
            options.append("ignore_case: true")
        if spec.fields != FILTER_FIELDS:
            options.append(f"fields: [{', '.join(sorted(spec.fields))}]")
        options.append(f"pattern: {_yaml_quoted(spec.pattern)}")
        lines += [f"  # {comment}", f"  - {{{', '.join(options)}}}"]
    return "\n".join(lines) + "\n"


#: The shipped rules as the ``filters:`` section of policy.yaml (a comment above each rule says what it catches).
DEFAULT_FILTERS_YAML: Final[str] = _render_yaml(_DEFAULTS)
