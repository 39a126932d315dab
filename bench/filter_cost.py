r"""What a pathological policy regex costs the content filters, against a plain one (issue 19).

The guardian's filters run on RE2 (:mod:`guardian.checks.filter_engine`), whose time is
linear in the text whatever the pattern. This measures it where it matters: the real
:class:`guardian.checks.filters.FilterSet` (the shipped rules plus one rule of the
security team's) scanning a 64 KiB content, as the guardian's content stage does.

- each pathological rule is one a backtracking engine takes exponential or high
  polynomial time on, fed its bait: a long run it almost matches, spoiled at the end
  (the set's one pass rules it out), and the same run unspoiled (it matches, so the
  rule runs its own search and counts its matches);
- each is compared with the same language written plainly (``(a+)+$`` with ``a+$``),
  on the same text.

Each figure is the median of ``--repeat`` scans in this process, and each pathological
rule is printed as a ratio to its plain form on the same bait (1.0: the same cost). For
contrast, the backtracking engine the filters used before (Python's ``regex`` module)
is timed on the same pattern over a 4 KiB bait, stopped after ``--regex-timeout``
seconds.

Run: ``python -m bench.filter_cost`` (``make bench`` runs it too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import regex

from guardian.checks.filters import FilterSet, FilterSpec, default_filter_specs
from guardian.store.memories import Draft

#: The content size a pathological rule is fed (the shipped policy's content limit is 64 KiB).
TEXT_BYTES: Final = 64 * 1024
#: The bait size for the backtracking engine: at 64 KiB it would not finish in any useful time.
REGEX_BAIT_BYTES: Final = 4 * 1024


@dataclass(frozen=True)
class Pathological:
    """A rule a backtracking engine explodes on, and the text that sets it off."""

    name: str
    pattern: str
    #: The same language written plainly (what the security team should have written): the rule it is compared with.
    plain: str
    #: The bait is unit repeated to the size, then end (which spoils the match).
    unit: str
    end: str

    def bait(self, size: int, spoiled: bool = True) -> str:
        """size characters of unit, the last ones end when spoiled (so the rule matches only when not)."""
        end = self.end if spoiled else ""
        body = self.unit * ((size - len(end)) // len(self.unit))
        return body + end


PATHOLOGICAL: Final = (
    Pathological("nested-plus", r"(a+)+$", r"a+$", "a", "!"),
    Pathological("overlapping-alternation", r"(a|aa)+$", r"a+$", "a", "!"),
    Pathological("words-and-spaces", r"^(\w+\s?)+$", r"^\w[\w\s]*$", "word ", "!"),
    Pathological("nested-star-class", r"(x+x+)+y", r"xx+y", "x", "z"),
)


@dataclass(frozen=True)
class Measured:
    """One rule's cost on one bait: the filters' median scan, and the backtracking engine's time (4 KiB)."""

    name: str
    pattern: str
    #: Whether the bait was spoiled at its end (the rule does not match) or not (it matches: it runs its own search).
    spoiled: bool
    scan_ms: float
    plain_ms: float
    regex_ms: float | None

    @property
    def ratio(self) -> float:
        """Scan time with this rule over scan time with the plain rule, on the same bait."""
        return self.scan_ms / self.plain_ms


def _filters(pattern: str) -> FilterSet:
    extra = FilterSpec("security-team-rule", pattern, "flag", frozenset({"content"}))
    return FilterSet.compile([*default_filter_specs(), extra])


def _median_ms(filters: FilterSet, text: str, repeat: int) -> float:
    draft = Draft(content=text, tags=(), metadata_json="{}")
    filters.scan(draft)  # the DFA is built lazily: the first pass pays for it
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        filters.scan(draft)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def _regex_ms(pattern: str, text: str, timeout_s: float) -> float | None:
    """The backtracking engine's time for one search, or None when it ran past timeout_s."""
    compiled = regex.compile(pattern, regex.V0)
    started = time.perf_counter()
    try:
        compiled.search(text, timeout=timeout_s)
    except TimeoutError:
        return None
    return (time.perf_counter() - started) * 1000


def measure(repeat: int, regex_timeout_s: float) -> list[Measured]:
    """Each pathological rule against the plain one, on its own bait."""
    results = []
    for rule in PATHOLOGICAL:
        filters, plain = _filters(rule.pattern), _filters(rule.plain)
        for spoiled in (True, False):
            bait = rule.bait(TEXT_BYTES, spoiled)
            results.append(
                Measured(
                    rule.name,
                    rule.pattern,
                    spoiled,
                    scan_ms=_median_ms(filters, bait, repeat),
                    plain_ms=_median_ms(plain, bait, repeat),
                    regex_ms=_regex_ms(rule.pattern, rule.bait(REGEX_BAIT_BYTES, spoiled), regex_timeout_s),
                )
            )
    return results


def report(results: Sequence[Measured], regex_timeout_s: float) -> str:
    """A table: each rule's scan of 64 KiB, the plain rule's, the ratio, and the old engine on 4 KiB."""
    lines = [
        f"content filters on a {TEXT_BYTES // 1024} KiB content: shipped rules + one rule (median scan, ms)",
        f"{'rule':<26}{'pattern':<14}{'bait':<10}{'with it':>10}{'plain form':>12}{'ratio':>8}"
        "   backtracking engine, 4 KiB",
    ]
    for result in results:
        old = f"{result.regex_ms:.1f} ms" if result.regex_ms is not None else f"> {regex_timeout_s:.0f} s (stopped)"
        lines.append(
            f"{result.name:<26}{result.pattern:<14}{'spoiled' if result.spoiled else 'matches':<10}"
            f"{result.scan_ms:>10.3f}{result.plain_ms:>12.3f}"
            f"{result.ratio:>8.2f}   {old}"
        )
    worst = max(result.ratio for result in results)
    lines.append(f"target: a pathological rule costs the same as a plain one; worst ratio {worst:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.filter_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=31, help="scans per figure (the median is printed)")
    parser.add_argument("--regex-timeout", type=float, default=2.0, help="seconds the backtracking engine may take")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    results = measure(args.repeat, args.regex_timeout)
    print(report(results, args.regex_timeout))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump([{**vars(result), "ratio": result.ratio} for result in results], out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
