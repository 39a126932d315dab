"""How many inputs each property was tried with, counted by the tests themselves.

Hypothesis's own statistics count examples per test function; the fuzz
tests call :func:`tried` once per input actually sent (replays and shrinks
included), so the figures are what the guardian and the gateway really saw.
``conftest.py`` prints the totals at the end of the session and writes them
to :data:`LAST_RUN`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

__all__ = [
    "COUNTS",
    "CRASHES",
    "FAILURES",
    "LAST_RUN",
    "OUTCOMES",
    "crashed",
    "failed",
    "outcome",
    "summary",
    "tried",
    "write_summary",
]

#: Inputs tried, by property (the test's name and its parameter, e.g. ``agent_structured[Store]``).
COUNTS: Final[Counter[str]] = Counter()
#: Properties that failed, by property: how many inputs failed it (hypothesis replays a failing input).
FAILURES: Final[Counter[str]] = Counter()
#: What the inputs were answered with, by property: status code or tool outcome -> count.
OUTCOMES: Final[dict[str, Counter[str]]] = {}
#: Times a guardian process was found dead, by property.
CRASHES: Final[Counter[str]] = Counter()
#: Where the last run's figures are written (ignored by git).
LAST_RUN: Final = Path(__file__).resolve().parent / ".last-run.json"
_STARTED: Final = time.monotonic()


def tried(prop: str) -> None:
    """Count one input sent for property ``prop``."""
    COUNTS[prop] += 1


def failed(prop: str) -> None:
    """Count one input that failed property ``prop``."""
    FAILURES[prop] += 1


def outcome(prop: str, what: str) -> None:
    """Count one answer of kind ``what`` (e.g. OK, INVALID_ARGUMENT, is_error) to an input of ``prop``."""
    OUTCOMES.setdefault(prop, Counter())[what] += 1


def crashed(prop: str) -> None:
    """Count a guardian found dead after an input of property ``prop``."""
    CRASHES[prop] += 1


def summary(exit_status: int) -> dict[str, Any]:
    """The run's figures: profile, inputs per property and in total, failures, duration."""
    return {
        "profile": os.environ.get("HYPOTHESIS_PROFILE", "fast"),
        "exit_status": exit_status,
        "seconds": round(time.monotonic() - _STARTED, 1),
        "total_inputs": sum(COUNTS.values()),
        "inputs_per_property": dict(sorted(COUNTS.items())),
        "outcomes_per_property": {prop: dict(sorted(OUTCOMES[prop].items())) for prop in sorted(OUTCOMES)},
        "crashes": sum(CRASHES.values()),
        "crashes_per_property": dict(sorted(CRASHES.items())),
        "failing_inputs_per_property": dict(sorted(FAILURES.items())),
    }


def write_summary(exit_status: int) -> dict[str, Any]:
    """Write :func:`summary` to :data:`LAST_RUN` and return it."""
    figures = summary(exit_status)
    LAST_RUN.write_text(json.dumps(figures, indent=2) + "\n")
    return figures
