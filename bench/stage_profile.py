"""Where the guardian's CPU goes per call, by pipeline stage (``python -m bench --profile``).

The guardian counts its requests' thread CPU by stage when its config's
``tracing.profile_stages`` is on (guardian/state/profile.py) and serves the sums on
``/metrics``. A measurement scrapes them before and after, and divides the growth by
the calls it made: :func:`per_call_us`. What no stage covers (gRPC's own work:
framing, (de)serialising, its threads; the interpreter's) is the process's CPU per
call less the stages' sum, shown as ``other``.
"""

from __future__ import annotations

import re
import urllib.request
from typing import Final

from bench.load import Meter

__all__ = ["COMMIT", "StageMeter", "StageSums", "per_call_us", "scrape"]

#: The stage name under which a group commit's own CPU is reported (one sum for all operations).
COMMIT: Final = "commit"

#: The operation under which the guardian reports its background work (guardian/state/profile.py).
BACKGROUND: Final = "background"

#: (operation, stage) -> CPU seconds; (COMMIT, COMMIT) for the group commits.
StageSums = dict[tuple[str, str], float]

_STAGE_LINE: Final = re.compile(
    r'^guardian_stage_cpu_seconds_total\{operation="([^"]+)",stage="([^"]+)"\} ([0-9.eE+-]+)$', re.MULTILINE
)
_COMMIT_LINE: Final = re.compile(r"^guardian_group_commit_cpu_seconds_total ([0-9.eE+-]+)$", re.MULTILINE)


def scrape(port: int) -> StageSums:
    """The guardian's stage sums now, from its /metrics on 127.0.0.1:port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    sums: StageSums = {(operation, stage): float(value) for operation, stage, value in _STAGE_LINE.findall(text)}
    commit = _COMMIT_LINE.search(text)
    if commit is not None:
        sums[(COMMIT, COMMIT)] = float(commit.group(1))
    return sums


def per_call_us(before: StageSums, after: StageSums, operation: str, calls: int) -> dict[str, float]:
    """Microseconds of guardian CPU per call of operation, by stage, between two scrapes: the group commits' and
    the background's work too (all of it: a measurement runs one operation at a time)."""
    if calls <= 0:
        return {}
    spent = {
        stage: (value - before.get((name, stage), 0.0)) * 1e6 / calls
        for (name, stage), value in after.items()
        if name == operation
    }
    for key, stage in (((COMMIT, COMMIT), COMMIT), ((BACKGROUND, "embed"), "embed (background)")):
        grown = after.get(key, 0.0) - before.get(key, 0.0)
        if grown > 0:
            spent[stage] = grown * 1e6 / calls
    return {stage: round(us, 1) for stage, us in spent.items() if us > 0}


class StageMeter:
    """A meter (bench/load.py) that also scrapes the stage sums around the timed calls.

    The scrapes fall outside the inner meter's window, so their own CPU is not counted.
    """

    def __init__(self, inner: Meter, port: int) -> None:
        self._inner = inner
        self._port = port
        self._before: StageSums = {}
        self._after: StageSums = {}

    def start(self) -> None:
        """Scrape, then start the inner meter."""
        self._before = scrape(self._port)
        self._inner.start()

    def stop(self) -> None:
        """Stop the inner meter, then scrape."""
        self._inner.stop()
        self._after = scrape(self._port)

    def per_call_us(self, operation: str, calls: int) -> dict[str, float]:
        """µs of guardian CPU per call of operation by stage, over the timed calls."""
        return per_call_us(self._before, self._after, operation, calls)
