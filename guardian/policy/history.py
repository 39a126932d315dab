"""The policy history: every policy ever put in force, who applied it, when, and how.

Rows are appended in the transaction that records the change in the audit
trail; the in-memory policy is swapped only after that commits. Which policy
runs after a restart:

- the policy file, when it differs from the last one loaded from the file
  (someone edited it: the newer intent wins);
- otherwise the newest entry of the history, so a ``guardianctl policy apply``
  or ``rollback`` survives a restart without anyone editing the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from guardian.store.database import Connection
from shared.errors import InvalidArgument, NotFound

__all__ = ["PolicyEntry", "Source", "append", "entries", "find", "latest", "newest_of"]

Source = Literal["file", "apply", "rollback"]
_COLUMNS: Final = "seq, version, text, applied_at_ms, applied_by, source"


@dataclass(frozen=True)
class PolicyEntry:
    """One applied policy."""

    seq: int
    version: str
    text: str
    applied_at_ms: int
    applied_by: str
    source: str


def append(
    connection: Connection, *, version: str, text: str, applied_at_ms: int, applied_by: str, source: Source
) -> None:
    """Record a policy put in force (inside the caller's transaction)."""
    connection.execute(
        "INSERT INTO policy_history (version, text, applied_at_ms, applied_by, source) VALUES (?, ?, ?, ?, ?)",
        (version, text, applied_at_ms, applied_by, source),
    )


def latest(connection: Connection, source: Source | None = None) -> PolicyEntry | None:
    """The newest entry (of one source, if given)."""
    if source is None:
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM policy_history ORDER BY seq DESC LIMIT 1"  # noqa: S608 - constant columns
        ).fetchone()
    else:
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM policy_history WHERE source = ? ORDER BY seq DESC LIMIT 1",  # noqa: S608
            (source,),
        ).fetchone()
    return PolicyEntry(*row) if row else None


def newest_of(connection: Connection, version: str) -> PolicyEntry | None:
    """The newest entry that put exactly this version in force."""
    row = connection.execute(
        f"SELECT {_COLUMNS} FROM policy_history WHERE version = ? ORDER BY seq DESC LIMIT 1",  # noqa: S608
        (version,),
    ).fetchone()
    return PolicyEntry(*row) if row else None


def entries(connection: Connection, limit: int) -> list[PolicyEntry]:
    """The newest limit entries, newest first."""
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM policy_history ORDER BY seq DESC LIMIT ?",  # noqa: S608 - constant columns
        (limit,),
    ).fetchall()
    return [PolicyEntry(*row) for row in rows]


def find(connection: Connection, version: str) -> PolicyEntry:
    """The newest entry whose version is, or starts with, version (at least 8 hex digits, unambiguous)."""
    if len(version) < 8 or len(version) > 64 or any(char not in "0123456789abcdef" for char in version):
        raise InvalidArgument("version: give a policy version, or at least its first 8 hex digits")
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM policy_history WHERE substr(version, 1, ?) = ? ORDER BY seq DESC",  # noqa: S608
        (len(version), version),
    ).fetchall()
    if not rows:
        raise NotFound("no policy with that version in the history")
    if len({row[1] for row in rows}) > 1:
        raise InvalidArgument("version: that prefix matches more than one policy; give more digits")
    return PolicyEntry(*rows[0])
