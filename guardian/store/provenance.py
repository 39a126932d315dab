"""The provenance graph beside the memories: what was derived from what, and who read what.

Two tables of ids only (never content), both written inside the transaction of
what they record:

- ``memory_derivations`` (parent, child): a memory stored or updated with
  ``derived_from`` names its parents; so everything built on a memory is found
  from it, through any chain (:func:`descendants`).
- ``recalls`` (memory, seq, outcome): each memory an agent's read returned
  (``returned``, or ``labelled`` as quoted data), or left out because the caller's
  profile withholds its trust level (``withheld``), by the seq of
  the read's audit row. The audit row says who (agent, session), when and how
  (get, search, list); this table makes "who read memory X" one index lookup
  instead of a scan of the trail (:func:`reads_of`). It refuses UPDATE and DELETE.
- ``incidents`` and ``incident_memories``: what the security team held, by whom
  and why, and which memories (matched by the selector, or derived from those)
  with the status each had before (guardian/service/incidents.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Final, Literal

from guardian.store.database import Connection

__all__ = [
    "Incident",
    "IncidentMemory",
    "Read",
    "Selector",
    "close_incident",
    "descendants",
    "forget_children",
    "incident",
    "incident_counts",
    "incident_memories",
    "incidents",
    "matching",
    "open_incident",
    "reads_of",
    "record_derivations",
    "record_reads",
    "written_in_sessions",
]

#: Ids looked up per query (SQLite's parameter limit is far above it).
_BATCH: Final = 500

#: What a read gave the reader of a memory: it plainly, it labelled as quoted data, or nothing (its trust).
ReadOutcome = Literal["returned", "labelled", "withheld"]


def _outcome(text: object) -> ReadOutcome:
    if text == "labelled":
        return "labelled"
    return "withheld" if text == "withheld" else "returned"


@dataclass(frozen=True)
class Read:
    """One read of a memory: the audit row that records it, and what the reader got."""

    memory_id: str
    seq: int
    ts_ms: int
    agent: str
    #: The session's audit reference.
    session: str
    operation: str
    outcome: ReadOutcome


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


def record_reads(
    connection: Connection, seq: int, *, returned: Sequence[str], labelled: Sequence[str], withheld: Sequence[str]
) -> None:
    """Record what the read of audit row seq returned (labelled: those of them returned labelled) and withheld."""
    marked = set(labelled)
    rows = [
        (memory_id, seq, "labelled" if memory_id in marked else "returned") for memory_id in dict.fromkeys(returned)
    ]
    rows += [(memory_id, seq, "withheld") for memory_id in dict.fromkeys(withheld)]
    if rows:
        connection.executemany("INSERT OR IGNORE INTO recalls (memory, seq, outcome) VALUES (?, ?, ?)", rows)


def reads_of(connection: Connection, memory_ids: Iterable[str], limit: int) -> list[Read]:
    """Up to limit reads of any of memory_ids, oldest first."""
    ids = list(dict.fromkeys(memory_ids))
    reads: list[Read] = []
    for start in range(0, len(ids), _BATCH):
        batch = ids[start : start + _BATCH]
        placeholders = ", ".join("?" for _ in batch)
        query = (
            "SELECT r.memory, r.seq, a.ts_ms, a.agent, a.session, a.operation, r.outcome FROM recalls r"  # noqa: S608
            f" JOIN audit a ON a.seq = r.seq WHERE r.memory IN ({placeholders}) ORDER BY r.seq LIMIT ?"
        )
        reads += [
            Read(str(memory), int(seq), int(ts_ms), str(agent), str(session), str(operation), _outcome(outcome))
            for memory, seq, ts_ms, agent, session, operation, outcome in connection.execute(
                query, (*batch, limit)
            ).fetchall()
        ]
    reads.sort(key=lambda read: (read.seq, read.memory_id))
    return reads[:limit]


@dataclass(frozen=True)
class Selector:
    """Which memories an incident holds: by author, session, source (or its kind) and creation time."""

    agent: str = ""
    #: A session's audit reference.
    session: str = ""
    #: ``web`` matches ``web``; ``tool`` matches ``tool`` and every ``tool:NAME``.
    source: str = ""
    since_ms: int = 0
    #: Exclusive; 0 for no bound.
    until_ms: int = 0

    @property
    def empty(self) -> bool:
        """Whether it names nothing (it would match every memory)."""
        return not (self.agent or self.session or self.source or self.since_ms or self.until_ms)


def matching(connection: Connection, selector: Selector, limit: int) -> list[str]:
    """Up to limit ids of memories (any status) that selector matches, oldest first."""
    clauses: list[str] = []
    values: list[object] = []
    if selector.agent:
        clauses.append("agent = ?")
        values.append(selector.agent)
    if selector.session:
        clauses.append("session = ?")
        values.append(selector.session)
    if selector.source:
        clauses.append("(source = ? OR substr(source, 1, ?) = ?)")
        values += [selector.source, len(selector.source) + 1, selector.source + ":"]
    if selector.since_ms:
        clauses.append("created_at_ms >= ?")
        values.append(selector.since_ms)
    if selector.until_ms:
        clauses.append("created_at_ms < ?")
        values.append(selector.until_ms)
    where = " AND ".join(clauses) or "1"
    query = f"SELECT id FROM memories WHERE {where} ORDER BY created_at_ms, rowid LIMIT ?"  # noqa: S608 - constants
    return [str(row[0]) for row in connection.execute(query, (*values, limit)).fetchall()]


#: How an incident found a memory: its selector matched it, or it was derived from one that did.
Found = Literal["matched", "derived"]


@dataclass(frozen=True)
class IncidentMemory:
    """A memory an incident holds, and its status before the incident (active, or already quarantined)."""

    memory_id: str
    found: Found
    was_status: str


@dataclass(frozen=True)
class Incident:
    """An incident as recorded."""

    id: str
    opened_at_ms: int
    opened_by: str
    selector: Selector
    reason: str
    closed_at_ms: int
    closed_by: str
    #: "" while open; "released" or "deleted" once closed.
    resolution: str

    @property
    def open(self) -> bool:
        """Whether it is still open."""
        return not self.closed_at_ms


def open_incident(connection: Connection, record: Incident, memories: Sequence[IncidentMemory]) -> None:
    """Record a new incident and the memories it holds."""
    connection.execute(
        "INSERT INTO incidents (id, opened_at_ms, opened_by, selector, reason) VALUES (?, ?, ?, ?, ?)",
        (
            record.id,
            record.opened_at_ms,
            record.opened_by,
            json.dumps(asdict(record.selector), sort_keys=True),
            record.reason,
        ),
    )
    connection.executemany(
        "INSERT INTO incident_memories (incident, memory, found, was_status) VALUES (?, ?, ?, ?)",
        [(record.id, item.memory_id, item.found, item.was_status) for item in memories],
    )


def close_incident(
    connection: Connection, incident_id: str, closed_at_ms: int, closed_by: str, resolution: str
) -> None:
    """Mark an incident closed."""
    connection.execute(
        "UPDATE incidents SET closed_at_ms = ?, closed_by = ?, resolution = ? WHERE id = ?",
        (closed_at_ms, closed_by, resolution, incident_id),
    )


_INCIDENT_COLUMNS: Final = "id, opened_at_ms, opened_by, selector, reason, closed_at_ms, closed_by, resolution"


def incident(connection: Connection, incident_id: str) -> Incident | None:
    """The incident with this id, or None."""
    row = connection.execute(
        f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?",  # noqa: S608 - constant columns
        (incident_id,),
    ).fetchone()
    return _incident(row) if row is not None else None


def incidents(connection: Connection, limit: int) -> list[Incident]:
    """Up to limit incidents, newest first."""
    rows = connection.execute(
        f"SELECT {_INCIDENT_COLUMNS} FROM incidents ORDER BY opened_at_ms DESC, id LIMIT ?",  # noqa: S608
        (limit,),
    ).fetchall()
    return [_incident(row) for row in rows]


def incident_memories(connection: Connection, incident_id: str) -> list[IncidentMemory]:
    """The memories an incident holds, matched ones first."""
    rows = connection.execute(
        "SELECT memory, found, was_status FROM incident_memories WHERE incident = ? ORDER BY found DESC, memory",
        (incident_id,),
    ).fetchall()
    return [
        IncidentMemory(str(memory), "derived" if found == "derived" else "matched", str(was))
        for memory, found, was in rows
    ]


def incident_counts(connection: Connection, incident_id: str) -> tuple[int, int]:
    """How many memories an incident holds: (matched, derived)."""
    counts = dict(
        connection.execute(
            "SELECT found, count(*) FROM incident_memories WHERE incident = ? GROUP BY found", (incident_id,)
        ).fetchall()
    )
    return int(counts.get("matched", 0)), int(counts.get("derived", 0))


def written_in_sessions(
    connection: Connection, first_read_ms: dict[str, int], limit: int
) -> list[tuple[str, str, str, int]]:
    """Memories written in these sessions at or after the session's first read, oldest first:
    (id, agent, session, created). One pass over the memories (an incident report is rare)."""
    sessions = sorted(first_read_ms)[:_BATCH]
    if not sessions:
        return []
    placeholders = ", ".join("?" for _ in sessions)
    rows = connection.execute(
        f"SELECT id, agent, session, created_at_ms FROM memories WHERE session IN ({placeholders})"  # noqa: S608
        " ORDER BY created_at_ms, rowid",
        sessions,
    ).fetchall()
    written = [
        (str(memory_id), str(agent), str(session), int(created))
        for memory_id, agent, session, created in rows
        if int(created) >= first_read_ms[str(session)]
    ]
    return written[:limit]


def _incident(row: Sequence[object]) -> Incident:
    selector = json.loads(str(row[3]))
    return Incident(
        id=str(row[0]),
        opened_at_ms=int(str(row[1])),
        opened_by=str(row[2]),
        selector=Selector(**selector),
        reason=str(row[4]),
        closed_at_ms=int(str(row[5])),
        closed_by=str(row[6]),
        resolution=str(row[7]),
    )
