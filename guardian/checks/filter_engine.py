r"""The content filters' engine: RE2 (google-re2), linear in the text's length whatever the pattern.

:mod:`guardian.checks.filters` decides what a rule does with a match; this module is
where a rule's pattern meets RE2:

- :func:`compile_pattern` checks one policy pattern and compiles it. What RE2 cannot run
  is refused by name (lookaround, backreferences, atomic groups, possessive quantifiers,
  recursion, conditionals, ``\G``, ``\Z``), and so is what RE2 would read differently
  from Python's ``regex`` module, the engine the policy format started with (``{,N}``,
  ``\C``); anything else RE2 rejects is refused quoting RE2's error, never the pattern;
  and so are a pattern that can match the empty string and one too large for RE2's
  memory budget (:data:`MAX_MEM`).
- :class:`PatternSet` is one ``re2.Set``: one pass over a text (with the GIL released)
  tells which of many patterns can match it.

``\d``, ``\s`` and ``\w`` (and ``\D``, ``\S``, ``\W``) keep the Unicode meaning they had
with ``regex``: RE2's are ASCII, so :func:`compile_pattern` hands RE2 Unicode classes in
their place (:func:`engine_pattern`): decimal digits (``\p{Nd}``); Unicode whitespace;
letters, marks, decimal digits, connector punctuation, letter numbers and the other
alphabetic symbols. Inside a ``[...]`` class ``\S`` and ``\W`` stay ASCII (a class
cannot hold the complement of a union). ``\b`` and ``\B`` stay ASCII too: RE2 has no
Unicode word boundary.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from typing import Final

import re2

from shared.errors import ConfigError

__all__ = ["MAX_MEM", "PatternSet", "compile_pattern", "engine_pattern"]

log = logging.getLogger("agent_guardian")

#: RE2's memory budget for one pattern and for one set (RE2's own default): a pattern that compiles
#: to more than fits is refused at load; a lazily built DFA never grows past it.
MAX_MEM: Final = 8 << 20

#: What RE2 is handed for \d \s \w and their complements, so they mean what they meant to ``regex``.
#: \s: Unicode White_Space (RE2's \s is [\t\n\f\r ]); \w: letters, marks, decimal digits, connector
#: punctuation, letter numbers, the joiners and the circled and squared letters (Other_Alphabetic).
_SPACE_MEMBERS: Final = r"\s\pZ\x{0b}\x{85}"
_WORD_MEMBERS: Final = (
    r"\pL\pM\p{Nd}\p{Nl}\p{Pc}\x{200c}\x{200d}\x{24b6}-\x{24e9}"
    r"\x{1f130}-\x{1f149}\x{1f150}-\x{1f169}\x{1f170}-\x{1f189}"
)
_OUTSIDE: Final = {
    "d": r"\p{Nd}",
    "D": r"\P{Nd}",
    "s": f"[{_SPACE_MEMBERS}]",
    "S": f"[^{_SPACE_MEMBERS}]",
    "w": f"[{_WORD_MEMBERS}]",
    "W": f"[^{_WORD_MEMBERS}]",
}
_INSIDE: Final = {"d": r"\p{Nd}", "D": r"\P{Nd}", "s": _SPACE_MEMBERS, "w": _WORD_MEMBERS}

#: Always matches where a set's pass reaches the end of a text: its absence means the pass did not finish.
_FINISHED: Final = r"\z"
#: The characters around a position that decide every empty-width assertion RE2 has (^ $ \A \z \b \B,
#: and (?m)'s ^ $): none (an end of the text), a word character, another character, a newline.
_NEIGHBOURS: Final = ("", "a", " ", "\n")
#: Ordinary text, markup and punctuation: a set must finish a pass over it at load.
_TRIAL_TEXT: Final = (
    "The quick brown fox jumps over the lazy dog. 0123456789 <p class='x'>Hello, world!</p>\n"
    'key=value; name: "Ada" (https://example.com/a/b?c=d#e) [x] {y} $z 50% a+b=c ~/path\t'
    "Ünïcödé, 日本語, Ελληνικά, emoji 🙂 -- end.\n"
)


def _options(ignore_case: bool = False, capture: bool = True) -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_MEM
    options.log_errors = False  # RE2 would log the whole pattern to stderr
    options.case_sensitive = not ignore_case
    options.never_capture = not capture
    return options


def compile_pattern(pattern: str, ignore_case: bool, where: str, capture: bool = True) -> re2._Regexp:
    """pattern (policy syntax) compiled by RE2, as :func:`engine_pattern` rewrites it.

    Without capture, groups do not capture: a match is only its bounds, which RE2 finds with
    its DFA alone (several times faster on a long match than when it must track groups).

    Raises:
        ConfigError: "WHERE: ..." naming the construct RE2 cannot run, or quoting RE2's error,
            or saying that the pattern is too large or can match the empty string.
    """
    try:
        compiled = re2.compile(engine_pattern(pattern), _options(ignore_case, capture))
    except re2.error as exc:
        # The usual reason is something only a backtracking engine can run: name it, else quote RE2.
        refused = next((text for text, accepted in _constructs(pattern) if not accepted), None)
        raise ConfigError(f"{where}: {refused or _re2_refusal(exc, pattern)}") from None
    different = next((text for text, accepted in _constructs(pattern) if accepted), None)
    if different is not None:
        raise ConfigError(f"{where}: {different}")
    try:
        empty = any(
            compiled.fullmatch(before + after, len(before), len(before)) is not None
            for before in _NEIGHBOURS
            for after in _NEIGHBOURS
        )
    except Exception as exc:  # anything the engine raises is still the rule's fault, not the daemon's
        raise ConfigError(f"{where}: the pattern fails on a sample text ({type(exc).__name__})") from None
    if empty:
        raise ConfigError(f"{where}: matches the empty string, so it would match everything; require some text")
    return compiled


class PatternSet:
    """One ``re2.Set`` of compiled patterns: one pass over a text says which of them can match it.

    Sound because each pattern is in the set as it was compiled, with the same options: the
    set reports a pattern exactly when the pattern's own search would find a match. When a
    pass does not finish (RE2's set, unlike one pattern, has no slower fallback if its DFA
    runs out of memory) or errors, :meth:`possible` says so, and the caller must treat every
    pattern as possible.
    """

    __slots__ = ("_finished", "_keys", "_set")

    def __init__(self, patterns: Sequence[tuple[int, re2._Regexp, bool]]) -> None:
        """patterns: (key, compiled pattern, ignore_case); :meth:`possible` answers with keys.

        Raises ValueError when RE2 cannot run them together in its memory budget.
        """
        self._set = re2.Set.SearchSet(_options())
        #: The set's index of each pattern → its key.
        self._keys: dict[int, int] = {}
        try:
            for key, compiled, ignore_case in patterns:
                self._keys[self._set.Add(("(?i)" if ignore_case else "") + compiled.pattern)] = key
            self._finished = self._set.Add(_FINISHED)
            self._set.Compile()
        except re2.error:
            raise ValueError("the patterns are too large for one RE2 set") from None
        if self.possible(_TRIAL_TEXT) is None:
            raise ValueError("one RE2 set of the patterns cannot finish a pass over a short text")

    def possible(self, text: str) -> frozenset[int] | None:
        """The keys of the patterns that match text; None when the pass did not finish (any may match)."""
        try:
            found = self._set.Match(text)
        except Exception as exc:  # never BaseException; the patterns' own searches decide then
            log.warning("content filters: one pass over a text failed (%s); each rule searches it", type(exc).__name__)
            return None
        if not found or self._finished not in found:
            log.warning("content filters: one pass over a text did not finish; each rule searches it")
            return None
        return frozenset(self._keys[index] for index in found if index != self._finished)


def engine_pattern(pattern: str) -> str:
    r"""pattern as RE2 is handed it: \d \s \w (\D \S \W) as the Unicode classes they were to ``regex``."""
    pieces: list[str] = []
    for kind, start, end in _tokens(pattern):
        text = pattern[start:end]
        if kind == "escape" and end - start == 2:
            pieces.append(_OUTSIDE.get(text[1], text))
        elif kind == "class":
            pieces.append(_class_members(text))
        else:
            pieces.append(text)
    return "".join(pieces)


def _class_members(text: str) -> str:
    r"""A [...] class with \d \s \w \D inside it as Unicode members."""
    pieces: list[str] = []
    at = 0
    while at < len(text):
        if text[at] == "\\" and at + 1 < len(text):
            pieces.append(_INSIDE.get(text[at + 1], text[at : at + 2]))
            at += 2
        else:
            pieces.append(text[at])
            at += 1
    return "".join(pieces)


def _re2_refusal(exc: re2.error, pattern: str) -> str:
    """Why RE2 refused pattern, in its own words, quoting at most a short fragment (never the whole pattern)."""
    raw = exc.args[0] if exc.args else ""
    message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if message.startswith("pattern too large"):
        return (
            f"is too large for the linear-time engine (RE2 compiles it to more than its {MAX_MEM >> 20} MiB"
            " memory budget); use smaller repetition counts, or split it into several rules"
        )
    what, _, fragment = message.partition(": ")
    if what == "invalid repetition size":
        return (
            f"repeats more than the linear-time engine (RE2) allows ({fragment!r}: a count is at most 1000,"
            " and nested counts multiply); use smaller counts"
        )
    # RE2 quotes the offending part, which for some errors is the whole pattern: keep only a short fragment.
    quotable = fragment and len(fragment) <= 16 and fragment in pattern and fragment != pattern
    shown = f"{what}: {fragment}" if quotable else what
    return f"not a valid regular expression for the linear-time engine (RE2: {shown}); check the syntax"


# --- what RE2 cannot run, named for the person who wrote the pattern --------------------------------------------

_NO_LOOKAROUND: Final = "rewrite it without lookaround"
_NO_RECURSION: Final = "spell the repeated part out (to a fixed depth)"
_NO_POSSESSIVE: Final = "drop the last '+' (RE2 never backtracks, so it is not needed)"
#: After "(?": what each construct is called, and how to do without it.
_GROUP_CONSTRUCTS: Final = (
    ("<=", "a lookbehind", _NO_LOOKAROUND),
    ("<!", "a lookbehind", _NO_LOOKAROUND),
    ("=", "a lookahead", _NO_LOOKAROUND),
    ("!", "a lookahead", _NO_LOOKAROUND),
    (">", "an atomic group", "use a plain group '(?:' (RE2 never backtracks, so it is not needed)"),
    ("P=", "a backreference", "match the text itself"),
    ("P>", "recursion", _NO_RECURSION),
    ("&", "recursion", _NO_RECURSION),
    ("R)", "recursion", _NO_RECURSION),
    ("(", "a conditional", "write the cases as alternatives"),
    ("#", "a comment", "remove it"),
)
#: (?1) (?+1) (?-1) (?0): a call of a group, which is recursion when inside it.
_GROUP_CALL_RE: Final = re.compile(r"[+-]?[0-9]+\)")
#: \1 .. \9 (but a three-digit octal escape such as \101), \k<name> \k'name' \k{name}, \g<name> \g{name}.
_BACKREFERENCE_RE: Final = re.compile(r"\\(?:[1-9](?![0-7]{2})|k[<'{]|g[<{])")
#: A counted repetition as Python reads it: {N}, {N,}, {N,M} and {,M}.
_COUNT_RE: Final = re.compile(r"\{([0-9]*)(,?)([0-9]*)\}")


def _cannot_run(construct: str, fragment: str, advice: str) -> str:
    return f"uses {construct} '{fragment}', which the linear-time engine (RE2) cannot run; {advice}"


def _constructs(pattern: str) -> Iterator[tuple[str, bool]]:
    r"""Each construct of pattern that RE2 cannot run as ``regex`` did: (what to say, whether RE2 accepts it).

    RE2 refuses lookaround, backreferences and the rest; it accepts ``{,N}`` (as literal text)
    and ``\C`` (one byte) but reads them differently.
    """
    for kind, start, end in _tokens(pattern):
        text = pattern[start:end]
        if kind == "escape":
            backreference = _BACKREFERENCE_RE.match(pattern, start)
            if backreference is not None:
                yield _cannot_run("a backreference", backreference.group(), "match the text itself"), False
            elif text == "\\G":
                yield _cannot_run("the previous-match anchor", text, "anchor with ^ or drop it"), False
            elif text == "\\Z":
                yield _cannot_run("the end anchor", text, "write \\z for the end of the text"), False
            elif text == "\\C":
                yield "uses '\\C' (one byte, which can split a character); write '.' or a class instead", True
        elif kind == "group":
            named = next((item for item in _GROUP_CONSTRUCTS if pattern.startswith(item[0], end)), None)
            call = _GROUP_CALL_RE.match(pattern, end)
            if named is not None:
                opener, construct, advice = named
                yield _cannot_run(construct, "(?" + opener, advice), False
            elif call is not None:
                yield _cannot_run("recursion", "(?" + call.group(), _NO_RECURSION), False
        elif kind == "quantifier" and pattern.startswith("+", end):
            yield _cannot_run("a possessive quantifier", text + "+", _NO_POSSESSIVE), False
        elif kind == "count":
            count = _COUNT_RE.fullmatch(text)
            if count is not None and not count[1] and count[2]:  # {,N}: a repetition to Python, text to RE2
                yield (
                    f"uses '{text}', which the linear-time engine (RE2) reads as literal text, not as a"
                    f" repetition; write '{{0,{count[3]}}}'",
                    True,
                )
            elif pattern.startswith("+", end):
                yield _cannot_run("a possessive quantifier", text + "+", _NO_POSSESSIVE), False


def _tokens(pattern: str) -> Iterator[tuple[str, int, int]]:
    r"""pattern cut into (kind, start, end): enough of a tokenizer to find constructs and rewrite escapes.

    Kinds: "escape" (``\x``, ``\p{...}``, and RE2's ``\Q...\E`` literal text), "class" (``[...]``),
    "group" (the ``(?`` that opens an extension), "quantifier" (``*`` ``+`` ``?``), "count"
    (``{N,M}`` and the other counted repetitions) and "char" (anything else, one character).
    So a '(?=' inside a class or after a backslash is not taken for a lookahead.
    """
    at = 0
    end = len(pattern)
    while at < end:
        char = pattern[at]
        if char == "\\":
            escape = pattern[at + 1 : at + 2]
            if escape == "Q":  # literal text, up to \E
                closing = pattern.find("\\E", at + 2)
                after = end if closing < 0 else closing + 2
            elif escape in ("p", "P", "x", "N") and pattern.startswith("{", at + 2):
                closing = pattern.find("}", at + 3)
                after = end if closing < 0 else closing + 1
            else:
                after = min(at + 2, end)
            yield "escape", at, after
        elif char == "[":
            after = _class_end(pattern, at)
            yield "class", at, after
        elif char == "(" and pattern.startswith("?", at + 1):
            after = at + 2
            yield "group", at, after
        elif char in "*+?":
            after = at + 1
            yield "quantifier", at, after
        elif char == "{" and (count := _COUNT_RE.match(pattern, at)) is not None and (count[1] or count[3]):
            after = count.end()
            yield "count", at, after
        else:
            after = at + 1
            yield "char", at, after
        at = after


def _class_end(pattern: str, start: int) -> int:
    """The index just past the character class that opens at start (a ']' first in it is a member)."""
    at = start + 1
    if pattern.startswith("^", at):
        at += 1
    if pattern.startswith("]", at):
        at += 1
    while at < len(pattern):
        char = pattern[at]
        if char == "\\":
            at += 2
        elif char == "[" and pattern.startswith(":", at + 1):  # [:alpha:]
            closing = pattern.find(":]", at + 2)
            at = at + 1 if closing < 0 else closing + 2
        elif char == "]":
            return at + 1
        else:
            at += 1
    return len(pattern)
