"""How guardianctl shows things: times and JSON."""

from __future__ import annotations

import datetime
import json

__all__ = ["print_json", "when"]


def when(ms: int) -> str:
    """A Unix time in milliseconds as UTC ISO 8601 to the second; "-" for none (0)."""
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(value: object) -> None:
    """Print value as one line of JSON (non-ASCII kept)."""
    print(json.dumps(value, indent=None, ensure_ascii=False))
