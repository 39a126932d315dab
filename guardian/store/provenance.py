"""The provenance graph beside the memories: what was derived from what, and who read what.

Two tables of ids only (never content), both written inside the transaction of
what they record:

- ``memory_derivations`` (parent, child): a memory stored or updated with
  ``derived_from`` names its parents; so everything built on a memory is found
  from it, through any chain (:func:`descendants`).
- ``recalls`` (memory, seq, withheld): each memory an agent's read returned, or
  left out because the caller's profile withholds its trust level, by the seq of
  the read's audit row. The audit row says who (agent, session), when and how
  (get, search, list); this table makes "who read memory X" one index lookup
  instead of a scan of the trail (:func:`reads_of`). It refuses UPDATE and DELETE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from guardian.store.database import Connection

__all__ = ["Read", "descendants", "forget_children", "reads_of", "record_derivations", "record_reads"]

#: Ids looked up per query (SQLite's parameter limit is far above it).
_BATCH: Final = 500


@dataclass(frozen=True)
class Read:
    """One read of a memory: the audit row that records it, and whether the memory was withheld."""

    memory_id: str
    seq: int
    ts_ms: int
    agent: str
    #: The session's audit reference.
    session: str
    operation: str
    withheld: bool


def record_derivations(connection: Connection, child: str, parents: Iterable[str], *, replace: bool = False) -> None:
    """Record that child was derived from parents (replace: instead of what it was derived from before)."""
    if replace:
        connection.execute("DELETE FROM memory_derivations WHERE child = ?", (child,))
    connection.executemany(
        "INSERT OR IGNORE INTO memory_derivations (parent, child) VALUES (?, ?)",
        [(parent, child) for parent in parents],
    )


def forget_children(connection: Connection, children: Sequence[str]) -> None:
    """The memories were deleted: they are nobody's child any more (what was built on them keeps its link)."""
    connection.executemany("DELETE FROM memory_derivations WHERE child = ?", [(child,) for child in children])


def descendants(connection: Connection, roots: Iterable[str]) -> set[str]:
    """Every memory derived from any of roots, through any chain (roots not included unless derived too)."""
    found: set[str] = set()
    frontier = list(dict.fromkeys(roots))
    while frontier:
        batch, frontier = frontier[:_BATCH], frontier[_BATCH:]
        placeholders = ", ".join("?" for _ in batch)
        for (child,) in connection.execute(
            f"SELECT child FROM memory_derivations WHERE parent IN ({placeholders})",  # noqa: S608 - placeholders
            batch,
        ).fetchall():
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def record_reads(connection: Connection, seq: int, *, returned: Sequence[str], withheld: Sequence[str]) -> None:
    """Record that the read of audit row seq returned these memories and withheld those."""
    rows = [(memory_id, seq, 0) for memory_id in dict.fromkeys(returned)]
    rows += [(memory_id, seq, 1) for memory_id in dict.fromkeys(withheld)]
    if rows:
        connection.executemany("INSERT OR IGNORE INTO recalls (memory, seq, withheld) VALUES (?, ?, ?)", rows)


def reads_of(connection: Connection, memory_ids: Iterable[str], limit: int) -> list[Read]:
    """Up to limit reads of any of memory_ids, oldest first."""
    ids = list(dict.fromkeys(memory_ids))
    reads: list[Read] = []
    for start in range(0, len(ids), _BATCH):
        batch = ids[start : start + _BATCH]
        placeholders = ", ".join("?" for _ in batch)
        query = (
            "SELECT r.memory, r.seq, a.ts_ms, a.agent, a.session, a.operation, r.withheld FROM recalls r"  # noqa: S608
            f" JOIN audit a ON a.seq = r.seq WHERE r.memory IN ({placeholders}) ORDER BY r.seq LIMIT ?"
        )
        reads += [
            Read(str(memory), int(seq), int(ts_ms), str(agent), str(session), str(operation), bool(withheld))
            for memory, seq, ts_ms, agent, session, operation, withheld in connection.execute(
                query, (*batch, limit)
            ).fetchall()
        ]
    reads.sort(key=lambda read: (read.seq, read.memory_id))
    return reads[:limit]
