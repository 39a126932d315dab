"""The content stage: scan what an agent writes with the policy's filters, store it as it was sent.

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
                storing, and the reply names the rule (``redacted_by``)
``quarantine``  stored unchanged but hidden from agents until the security team
                releases it
``flag``        stored unchanged; the hit is recorded in the audit trail
==============  ===================================================================

Every hit (rule, action, field, number of matches) is returned for the audit
record; the matched text never leaves this module.

Patterns use the ``regex`` module (version 0 syntax) because its searches take
a timeout: one rule has :data:`SEARCH_TIMEOUT_S` of the request thread's CPU
time for one field, however many tags or metadata strings that field holds (so
a busy daemon does not refuse ordinary content). A rule that errors or runs out
of time refuses the request (fail closed): it never crashes the daemon and
never lets the content through. Rules are compiled and trial-run by
:meth:`FilterSet.compile` when the policy loads, so a broken rule (bad syntax, a
pattern that matches the empty string, a pattern too slow on a short sample)
fails the load, not a request. A :class:`FilterSet` is immutable and safe to
share between threads.

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import regex

from guardian.store.integrity import canonical_json
from guardian.store.memories import Draft
from guardian.store.scan_form import ScanForm
from shared.errors import ConfigError, ContentRefused, InvalidArgument

__all__ = [
    "DEFAULT_FILTERS_YAML",
    "FILTER_ACTIONS",
    "FILTER_FIELDS",
    "SEARCH_TIMEOUT_S",
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
#: CPU seconds one rule may spend on one field (all its tags, or all its metadata strings) before the request is refused.
SEARCH_TIMEOUT_S: Final[float] = 0.05

#: A rule must finish the sample text, when the policy loads, within this many times SEARCH_TIMEOUT_S.
_TRIAL_BUDGETS: Final = 5
_NAME_RE: Final = regex.compile(r"[a-z0-9][a-z0-9-]{0,63}")
#: Ordinary text, markup and punctuation, but no long runs of one character: a rule must finish on it quickly
#: and must not match the empty string anywhere in it.
_TRIAL_TEXT: Final = (
    "The quick brown fox jumps over the lazy dog. 0123456789 <p class='x'>Hello, world!</p>\n"
    'key=value; name: "Ada" (https://example.com/a/b?c=d#e) [x] {y} $z 50% a+b=c ~/path\t'
    "Ünïcödé, 日本語, Ελληνικά, emoji 🙂 -- end.\n"
)


@dataclass(frozen=True)
class FilterSpec:
    """One rule as the policy states it; :meth:`FilterSet.compile` validates it."""

    #: 1-64 lowercase letters, digits and '-', starting with a letter or digit; unique in a policy.
    name: str
    #: A regular expression in ``regex`` module (version 0) syntax.
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
    compiled: regex.Pattern[str]
    #: What a redaction puts in place of a match (the name is [a-z0-9-], so no template escapes).
    marker: str
    #: Whether the field screens (:class:`_Screen`) cover this rule: its pattern can join an alternation unchanged.
    screenable: bool


#: Pattern text that cannot join an alternation of other rules unchanged: backreferences,
#: recursion and conditionals (group numbers shift), named groups (names could clash) and global
#: inline flags such as ``(?i)`` (in version 0 syntax they apply to the whole pattern; scoped
#: flags such as ``(?-i:DAN)`` are fine).
_UNSCREENABLE_RE: Final = regex.compile(
    r"\\[1-9gk]|\(\?P[=>]|\(\?P?<[A-Za-z_]|\(\?[A-Za-z-]+\)|\(\?[R0-9&+(]|\(\?-[0-9]"
)


#: Texts longer than this are not screened: an alternation loses each rule's fast scan for its
#: literal prefix and costs about a microsecond a character, so it only wins on short texts
#: (tags, metadata keys and values), where a pass per rule costs more than the text's length.
_SCREEN_MAX_CHARS: Final = 48


class _Screen:
    """One alternation of every screenable rule for a field: a quick "can any of them match here?".

    The common case is a field no rule matches; for short texts (:data:`_SCREEN_MAX_CHARS`)
    one search of the alternation tells that more cheaply than running each rule. Sound because, at the position where any one rule would match,
    the alternation matches too (no alternative refers to another's groups or flags). Any
    doubt (a hit, an error, a timeout) sends the text through every rule, exactly as without
    a screen, so a screen only ever saves work and never changes an outcome.
    """

    __slots__ = ("_pattern",)

    def __init__(self, pattern: regex.Pattern[str]) -> None:
        self._pattern = pattern

    @classmethod
    def build(cls, rules: Sequence[_Rule]) -> _Screen | None:
        """The screen of rules (the screenable ones), or None when there is nothing to screen."""
        parts = [f"(?{'i' if rule.spec.ignore_case else ''}:{rule.spec.pattern})" for rule in rules if rule.screenable]
        if not parts:
            return None
        try:
            return cls(regex.compile("|".join(parts), regex.V0))
        except Exception:  # the rules compiled alone; a screen is only an optimisation
            log.warning("content filters: no screen for a field; every rule runs on every text")
            return None

    def clear(self, texts: Sequence[str]) -> bool:
        """True only when no screened rule can match any of texts (always False for a long text)."""
        if any(len(text) > _SCREEN_MAX_CHARS for text in texts):
            return False
        try:
            return not any(
                self._pattern.search(text, timeout=SEARCH_TIMEOUT_S, concurrent=False) is not None for text in texts
            )
        except Exception:  # e.g. a timeout: let every rule look, with its own budget
            return False


class _Pass:
    """One rule over one field: one time budget for every string in the field, and the matches so far.

    The budget is this thread's CPU time, and every search holds the GIL (``concurrent=False``):
    time spent waiting while other request threads run must not count against a rule, or
    ordinary content would be refused under load. A search therefore blocks other threads for
    at most its timeout.
    """

    __slots__ = ("count", "field", "rule", "spent")

    def __init__(self, rule: _Rule, field: str) -> None:
        self.rule = rule
        self.field = field
        self.spent = 0.0
        self.count = 0

    def __call__(self, form: ScanForm) -> ScanForm:
        """The text after this rule (redacted where it matched, for a redact rule).

        Raises ContentRefused on a reject match or when the rule cannot run.
        """
        rule = self.rule
        spec = rule.spec
        text = form.text
        spans: list[tuple[int, int]] = []
        try:
            remaining = SEARCH_TIMEOUT_S - self.spent
            if remaining <= 0:  # checked here: regex takes a negative timeout as "no timeout"
                raise TimeoutError("regex timed out")
            started = time.thread_time()
            try:
                if spec.action == "redact":
                    found_all = rule.compiled.finditer(text, timeout=remaining, concurrent=False)
                    spans = [match.span() for match in found_all]
                    count = len(spans)
                elif spec.action == "reject":
                    found = rule.compiled.search(text, timeout=remaining, concurrent=False)
                    count = 0 if found is None else 1
                else:
                    count = len(rule.compiled.findall(text, timeout=remaining, concurrent=False))
            finally:
                self.spent += time.thread_time() - started
        except Exception as exc:  # fail closed: a rule that cannot run refuses the request (never BaseException)
            # The exception's type only: its text could quote the content.
            log.warning("content filter %s could not run on %s: %s", spec.name, self.field, type(exc).__name__)
            raise ContentRefused(
                f"content filter {spec.name} could not run; the request is refused", rule=spec.name
            ) from None
        if count and spec.action == "reject":
            raise ContentRefused(f"content refused by filter {spec.name}: remove that part and try again", spec.name)
        self.count += count
        # The redaction replaces what the matches came from in the text as sent; the next rule scans the result.
        return ScanForm.of(form.replaced(spans, rule.marker)) if spans else form


class FilterSet:
    """The policy's compiled rules, in order; immutable and safe to share between threads.

    Build one with :meth:`compile`.
    """

    __slots__ = ("_rules", "_screens")

    def __init__(self, rules: tuple[_Rule, ...] = ()) -> None:
        self._rules = rules
        self._screens = {
            field: _Screen.build([rule for rule in rules if field in rule.spec.fields]) for field in FILTER_FIELDS
        }

    @classmethod
    def compile(cls, specs: Sequence[FilterSpec], path: str = "filters") -> FilterSet:
        """Validate, compile and trial-run every rule.

        Raises:
            ConfigError: naming ``PATH[INDEX].FIELD`` of the first bad rule: a bad or duplicate
                name, an unknown action, no or unknown fields, a pattern that does not compile,
                matches the empty string or is too slow on a short sample text. The message
                quotes the regex error, never the pattern.
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
            compiled = _compile_pattern(spec, f"{where}.pattern")
            screenable = _UNSCREENABLE_RE.search(spec.pattern) is None
            rules.append(_Rule(spec, compiled, f"[redacted:{spec.name}]", screenable))
        return cls(tuple(rules))

    @property
    def names(self) -> tuple[str, ...]:
        """The rule names, in order."""
        return tuple(rule.spec.name for rule in self._rules)

    def __len__(self) -> int:
        """The number of rules."""
        return len(self._rules)

    def scan(self, draft: Draft, changed: frozenset[str] | None = None) -> FilterOutcome:
        """Filter draft's fields (for an update, only those in changed) as their scan forms.

        What is returned is the draft as sent, but for redactions; tags stay distinct
        after redaction, and metadata is re-serialised canonically.

        Raises:
            ContentRefused (a PermissionDenied): a reject rule matched (the message names the rule, never the
                match), or a rule errored or ran out of time.
            InvalidArgument: the content or a tag is empty once invisible characters are removed, or two
                metadata keys become the same once redacted.
        """
        fields = FILTER_FIELDS if changed is None else FILTER_FIELDS & changed
        content: ScanForm | None = None
        if "content" in fields:
            content = ScanForm.of(draft.content)
            if not content.text.strip():
                raise InvalidArgument("content: is empty once control and zero-width characters are removed")
        # (index in the draft as given, scan form): the index names the tag in a hit.
        tags: list[tuple[int, ScanForm]] = []
        if "tags" in fields:
            for index, tag in enumerate(draft.tags):
                form = ScanForm.of(tag)
                if not form.text.strip():
                    raise InvalidArgument(f"tags[{index}]: is empty once control and zero-width characters are removed")
                tags.append((index, form))
        metadata: Any = None
        if "metadata" in fields:
            try:
                metadata = json.loads(draft.metadata_json)
            except ValueError:
                raise InvalidArgument("metadata: expected a JSON object") from None

        # Fields in which no screenable rule can match: those rules skip them. A redaction in a
        # field changes its text, so from then on every rule looks at that field again.
        clear = {
            field
            for field, texts in (
                ("content", [content.text] if content is not None else []),
                ("tags", [form.text for _, form in tags]),
                ("metadata", [ScanForm.of(text).text for text in _strings(metadata)] if "metadata" in fields else []),
            )
            if (screen := self._screens[field]) is not None and screen.clear(texts)
        }
        hits: list[FilterHit] = []
        for rule in self._rules:
            spec = rule.spec
            skip = clear if rule.screenable else set()
            if content is not None and "content" in spec.fields and "content" not in skip:
                run = _Pass(rule, "content")
                content = run(content)
                if run.count:
                    hits.append(FilterHit(spec.name, spec.action, "content", run.count))
                    clear.discard("content")
            if "tags" in fields and "tags" in spec.fields and "tags" not in skip:
                run = _Pass(rule, "tags")
                for position, (index, form) in enumerate(tags):
                    before = run.count
                    tags[position] = (index, run(form))
                    if run.count > before:
                        hits.append(FilterHit(spec.name, spec.action, f"tags[{index}]", run.count - before))
                        clear.discard("tags")
            if "metadata" in fields and "metadata" in spec.fields and "metadata" not in skip:
                run = _Pass(rule, "metadata")
                collision = f"metadata: two keys are the same once filter {spec.name} redacts them; rename them"
                metadata = _map_strings(metadata, _on_original(run), collision)
                if run.count:
                    hits.append(FilterHit(spec.name, spec.action, "metadata", run.count))
                    clear.discard("metadata")

        filtered = draft
        if content is not None:
            filtered = replace(filtered, content=content.original)
        if "tags" in fields:
            filtered = replace(filtered, tags=tuple(dict.fromkeys(form.original for _, form in tags)))
        if "metadata" in fields:
            filtered = replace(filtered, metadata_json=canonical_json(metadata))
        return FilterOutcome(filtered, tuple(hits), any(hit.action == "quarantine" for hit in hits))


def _compile_pattern(spec: FilterSpec, where: str) -> regex.Pattern[str]:
    """spec's pattern compiled and trial-run; ConfigError naming where if it is unusable."""
    flags = regex.V0 | (regex.IGNORECASE if spec.ignore_case else 0)
    timeout = SEARCH_TIMEOUT_S * _TRIAL_BUDGETS
    try:
        compiled = regex.compile(spec.pattern, flags)
        empty = compiled.search("", timeout=timeout, concurrent=False) is not None or any(
            match.end() == match.start() for match in compiled.finditer(_TRIAL_TEXT, timeout=timeout, concurrent=False)
        )
    except regex.error as exc:
        raise ConfigError(f"{where}: not a valid regular expression ({exc}); check the syntax") from None
    except TimeoutError:
        raise ConfigError(f"{where}: too slow on a short sample text; simplify the pattern") from None
    except Exception as exc:  # anything else the engine raises is still the rule's fault, not the daemon's
        raise ConfigError(f"{where}: the pattern fails on a sample text ({type(exc).__name__})") from None
    if empty:
        raise ConfigError(f"{where}: matches the empty string, so it would match everything; require some text")
    return compiled


def _on_original(run: _Pass) -> Callable[[str], str]:
    """run as a change of one string as sent (a metadata key or value): scanned, redacted where it matched."""

    def change(text: str) -> str:
        return run(ScanForm.of(text)).original

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


# The shipped rules: the one source of default_filter_specs() and DEFAULT_FILTERS_YAML.
# Order matters: rejects run first, so a credential is refused before a redaction could hide it.
# Lookarounds such as (?<![A-Za-z0-9]) bound a token where \b cannot (a key after "_" or ending in "-"),
# and keep each rule linear: a token is only tried where one can start.
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
            r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])",
            "reject",
        ),
    ),
    (
        "AWS secret access keys assigned in credentials files, env, JSON or code",
        FilterSpec(
            "aws-secret-access-key",
            r"""aws[_-]?secret[_-]?access[_-]?key["']?\s*(?:=>?|:)\s*["']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])""",
            "reject",
            ignore_case=True,
        ),
    ),
    (
        "GitHub personal, OAuth, user-to-server, server-to-server, refresh and fine-grained tokens",
        FilterSpec(
            "github-token",
            r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{22,255})(?![A-Za-z0-9_])",
            "reject",
        ),
    ),
    (
        "Slack bot, user, app, refresh and legacy tokens",
        FilterSpec(
            "slack-token",
            r"(?<![A-Za-z0-9-])xox[abprs]-(?=[A-Za-z0-9-]{0,64}[0-9])[A-Za-z0-9-]{10,}",
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
            r"(?<![A-Za-z0-9_-])AIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])",
            "reject",
        ),
    ),
    (
        "Stripe live secret and restricted keys (test keys pass)",
        FilterSpec(
            "stripe-live-key",
            r"(?<![A-Za-z0-9])(?:sk|rk)_live_[A-Za-z0-9]{16,}(?![A-Za-z0-9])",
            "reject",
        ),
    ),
    (
        "OpenAI (sk-proj-, sk-svcacct-, sk-admin-, sk-) and Anthropic (sk-ant-) keys; a bare sk- key needs a digit",
        FilterSpec(
            "llm-api-key",
            r"(?<![A-Za-z0-9_-])sk-(?:(?:ant|proj|svcacct|admin)-|(?=[A-Za-z0-9_-]{0,64}[0-9]))[A-Za-z0-9_-]{32,}(?![A-Za-z0-9_-])",
            "reject",
        ),
    ),
    (
        "JSON Web Tokens: header.payload.signature, header and payload starting eyJ",
        FilterSpec(
            "jwt",
            r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}(?![A-Za-z0-9_-])",
            "redact",
        ),
    ),
    (
        "HTTP bearer tokens (Authorization: Bearer ...)",
        FilterSpec(
            "bearer-token",
            r"\bbearer[ \t]+(?=[A-Za-z0-9._~+/-]{0,64}[0-9])[A-Za-z0-9._~+/-]{20,}=*",
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
            r"(?<![A-Za-z0-9])(?:password|passwd|passphrase|(?:client[_-]?)?secret(?:[_-]?key)?|api[_-]?key"
            r"""|(?:access|auth|refresh)[_-]?token)["']?[ \t]*"""
            r"""(?:=>?[ \t]*["']?[^\s"',;]{4,}"""
            r"""|:[ \t]*(?:["'][^"'\n]{4,}|(?=[^\s"',;]{0,32}[0-9!@#$%^&*_+=/\\|~?<>])[^\s"',;]{4,}))""",
            "redact",
            ignore_case=True,
        ),
    ),
    (
        "script and HTML injection: script-capable tags, javascript:/vbscript: URLs, event-handler attributes",
        FilterSpec(
            "script-injection",
            r"<\s*(?:script|iframe|frame|object|embed|applet)\b|\b(?:javascript|vbscript):(?=\S)|\bdata:text/html"
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
        "  # name: unique; pattern: a regex (Python `regex` module syntax), single-quoted (write '' for ');",
        "  # fields: any of content, tags, metadata (all three when left out); ignore_case: false when left out.",
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
