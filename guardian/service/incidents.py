"""Incident response: the security team's handlers for who read a memory, incidents, and re-screening.

Opening an incident quarantines, in one transaction, every memory its selector
matches (by author, session, source and creation time) and everything derived
from them through any chain (guardian/store/provenance.py), whatever namespace
they are in; each memory held gets an audit row of its own. The report answers
"who read it": every read that returned or withheld any of them (from the
recalls index, not a scan of the trail), grouped by session, and what those
sessions wrote after their first read. Closing releases what the incident
quarantined (a memory already held before stays held) or deletes all of it,
again with an audit row per memory. Reports carry ids and provenance, never
content (``guardianctl quarantine show`` shows a held memory's content).

RescanMemories re-screens stored memories with the policy in force, a batch at a
time: a rule written after an attack finds what got in before it. A memory a
reject, redact or quarantine rule matches, or (if its trust is one the policy
reviews) that reads as an instruction to future turns, is quarantined, with an
audit row naming what caught it. The similarity signal is not re-run: it judges
a write against what was stored when it was written.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from guardian.checks import review
from guardian.service import shape
from guardian.service.call import Call
from guardian.service.shape import agent_name, source
from guardian.state.core import GuardianCore
from guardian.store import provenance
from guardian.store.database import Connection
from guardian.store.memories import ACTIVE, QUARANTINED, Draft, StoredMemory
from guardian.store.scan_form import ScanForm
from shared.errors import ContentRefused, FailedPrecondition, InvalidArgument, NotFound
from shared.formats import INCIDENT_ID_RE
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = [
    "MAX_INCIDENT_MEMORIES",
    "check_close",
    "check_incident_id",
    "check_list",
    "check_open",
    "check_rescan",
    "check_who_read",
    "close_incident",
    "list_incidents",
    "open_incident",
    "report_incident",
    "rescan_memories",
    "who_read",
]

#: The most memories one incident holds (a selector matching more is refused: narrow it).
MAX_INCIDENT_MEMORIES: Final = 50_000
#: The most reads, and later writes, one report lists.
_REPORT_LIMIT: Final = 10_000
_MAX_REASON: Final = 500
_MAX_RESCAN: Final = 2_000
#: The most reads one who-read answer lists.
_MAX_READS: Final = 10_000
_SESSION_REF_LEN: Final = 16


@dataclass(frozen=True)
class Opening:
    """An OpenIncident request, checked."""

    selector: provenance.Selector
    reason: str


def check_open(core: GuardianCore, call: Call, request: pb.OpenIncidentRequest) -> Opening:
    """A selector naming at least one of agent, session, source, since, until; a short reason."""
    given = request.selector
    if given.session and (
        len(given.session) != _SESSION_REF_LEN or any(char not in "0123456789abcdef" for char in given.session)
    ):
        raise InvalidArgument("selector.session: a session's audit reference, 16 lowercase hex digits")
    if given.since_ms < 0 or given.until_ms < 0:
        raise InvalidArgument("selector: since and until are Unix milliseconds, not negative")
    if given.since_ms and given.until_ms and given.until_ms <= given.since_ms:
        raise InvalidArgument("selector: until must be after since")
    selector = provenance.Selector(
        agent=agent_name(given.agent, "selector.agent") if given.agent else "",
        session=given.session,
        source=source(given.source, "selector.source") if given.source else "",
        since_ms=given.since_ms,
        until_ms=given.until_ms,
    )
    if selector.empty:
        raise InvalidArgument("selector: name at least one of agent, session, source, since or until")
    if len(request.reason) > _MAX_REASON or any(ord(char) < 32 for char in request.reason):
        raise InvalidArgument(f"reason: at most {_MAX_REASON} characters, on one line")
    return Opening(selector, request.reason)


def open_incident(core: GuardianCore, call: Call, opening: Opening, connection: Connection) -> pb.IncidentReport:
    """Quarantine what the selector matches and everything derived from it; record the incident."""
    matched = provenance.matching(connection, opening.selector, MAX_INCIDENT_MEMORIES + 1)
    if not matched:
        raise NotFound("no memory matches that selector; nothing was held")
    derived = sorted(provenance.descendants(connection, matched) - set(matched))
    if len(matched) + len(derived) > MAX_INCIDENT_MEMORIES:
        raise FailedPrecondition(
            f"that selector holds more than {MAX_INCIDENT_MEMORIES} memories with what was derived from them;"
            " narrow it (a session, a source or a time range)"
        )
    incident_id = call.object_id = "inc_" + secrets.token_hex(8)
    held: list[provenance.IncidentMemory] = []
    for found, ids in (("matched", matched), ("derived", derived)):
        for memory_id in ids:
            was = core.memories.hold(connection, memory_id, call.now_ms)
            if was is None:
                continue
            held.append(provenance.IncidentMemory(memory_id, "derived" if found == "derived" else "matched", was))
            _audit_memory(
                core,
                call,
                connection,
                "admin.incident.hold",
                memory_id,
                reason=f"incident {incident_id}: {found}, was {was}",
            )
    record = provenance.Incident(
        id=incident_id,
        opened_at_ms=call.now_ms,
        opened_by=call.agent,
        selector=opening.selector,
        reason=opening.reason,
        closed_at_ms=0,
        closed_by="",
        resolution="",
    )
    provenance.open_incident(connection, record, held)
    return _report(core, connection, record)


def check_list(core: GuardianCore, call: Call, request: pb.ListIncidentsRequest) -> int:
    """How many incidents to list (1-1000; 0: 100)."""
    if request.limit > 1_000:
        raise InvalidArgument("limit: at most 1000")
    return request.limit or 100


def list_incidents(core: GuardianCore, call: Call, limit: int, connection: Connection) -> pb.ListIncidentsResponse:
    """Incidents, newest first, with how many memories each holds."""
    records = provenance.incidents(connection, limit)
    call.object_id = f"{len(records)} incidents"
    return pb.ListIncidentsResponse(incidents=[_incident_message(connection, record) for record in records])


def check_incident_id(core: GuardianCore, call: Call, request: pb.IncidentRequest) -> str:
    """An incident id of the form the guardian issues."""
    return _incident_id(call, request.id)


def report_incident(core: GuardianCore, call: Call, incident_id: str, connection: Connection) -> pb.IncidentReport:
    """The incident's memories, who read them, and what those sessions wrote afterwards."""
    return _report(core, connection, _existing(connection, incident_id))


Resolution = Literal["release", "delete"]


@dataclass(frozen=True)
class Closing:
    """A CloseIncident request, checked."""

    incident_id: str
    resolution: Resolution


def check_close(core: GuardianCore, call: Call, request: pb.CloseIncidentRequest) -> Closing:
    """An incident id and a resolution: release or delete."""
    incident_id = _incident_id(call, request.id)
    if request.resolution == "release":
        return Closing(incident_id, "release")
    if request.resolution == "delete":
        return Closing(incident_id, "delete")
    raise InvalidArgument("resolution: expected release (back to agents) or delete (for good)")


def close_incident(core: GuardianCore, call: Call, closing: Closing, connection: Connection) -> pb.IncidentReport:
    """Release what the incident quarantined, or delete all it holds; then mark it closed."""
    record = _existing(connection, closing.incident_id)
    if not record.open:
        raise FailedPrecondition(f"that incident is already closed ({record.resolution})")
    items = provenance.incident_memories(connection, record.id)
    present = core.memories.by_ids(connection, [item.memory_id for item in items])
    reason = f"incident {record.id} closed"
    if closing.resolution == "release":
        for item in items:
            memory = present.get(item.memory_id)
            if item.was_status == ACTIVE and memory is not None and memory.status == QUARANTINED:
                core.memories.release(connection, item.memory_id, call.now_ms)
                _audit_memory(core, call, connection, "admin.incident.release", item.memory_id, reason=reason)
    else:
        core.memories.purge(connection, list(present))
        for memory_id in present:
            _audit_memory(core, call, connection, "admin.incident.delete", memory_id, reason=reason)
    resolution = "released" if closing.resolution == "release" else "deleted"
    provenance.close_incident(connection, record.id, call.now_ms, call.agent, resolution)
    closed = _existing(connection, record.id)
    return _report(core, connection, closed)


# -- who read a memory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WhoReadQuery:
    """A who-read question, checked: the memory and how many reads at most."""

    memory_id: str
    limit: int


def check_who_read(core: GuardianCore, call: Call, request: pb.WhoReadRequest) -> WhoReadQuery:
    """A memory id and a limit of 1 to 10,000 reads (0: 1,000)."""
    target = call.object_id = shape.memory_id(request.id)
    if request.limit > _MAX_READS:
        raise InvalidArgument(f"limit: at most {_MAX_READS}")
    return WhoReadQuery(target, request.limit or 1_000)


def who_read(core: GuardianCore, call: Call, query: WhoReadQuery, connection: Connection) -> pb.WhoReadResponse:
    """Every read that returned or withheld the memory, oldest first (one index lookup, not a scan of the trail)."""
    reads = provenance.reads_of(connection, [query.memory_id], query.limit + 1)
    return pb.WhoReadResponse(
        reads=[_read_message(read) for read in reads[: query.limit]], truncated=len(reads) > query.limit
    )


def _read_message(read: provenance.Read) -> pb.MemoryRead:
    return pb.MemoryRead(
        memory_id=read.memory_id,
        seq=read.seq,
        ts_ms=read.ts_ms,
        agent=read.agent,
        session=read.session,
        operation=read.operation,
        outcome=read.outcome,
    )


# -- re-screening ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RescanBatch:
    """A RescanMemories request, checked."""

    after_rowid: int
    limit: int


def check_rescan(core: GuardianCore, call: Call, request: pb.RescanRequest) -> RescanBatch:
    """Where to start and how many (1-2000; 0: 200)."""
    if request.limit > _MAX_RESCAN:
        raise InvalidArgument(f"limit: at most {_MAX_RESCAN} memories a batch")
    return RescanBatch(request.after_rowid, request.limit or 200)


def rescan_memories(core: GuardianCore, call: Call, batch: RescanBatch, connection: Connection) -> pb.RescanResponse:
    """Screen a batch of active memories with the policy in force; quarantine what it catches."""
    memories = core.memories.active_after(connection, batch.after_rowid, batch.limit)
    held: list[pb.RescanHeld] = []
    for _, memory in memories:
        caught = _caught_by(call, memory)
        if caught:
            core.memories.hold(connection, memory.id, call.now_ms, tuple(caught))
            _audit_memory(core, call, connection, "admin.memories.rescan.hold", memory.id, reason=",".join(caught))
            held.append(pb.RescanHeld(id=memory.id, caught_by=caught))
    last = memories[-1][0] if memories else batch.after_rowid
    call.object_id = f"rowids {batch.after_rowid + 1}..{last}: {len(memories)} scanned, {len(held)} held"
    return pb.RescanResponse(scanned=len(memories), held=held, next_rowid=last, done=len(memories) < batch.limit)


def _caught_by(call: Call, memory: StoredMemory) -> list[str]:
    """What catches a stored memory now: filter rules that would not let it be stored as is, the review signal."""
    caught: list[str] = []
    draft = Draft(content=memory.content, tags=memory.tags, metadata_json=memory.metadata_json)
    try:
        outcome = call.policy.filters.scan(draft)
        caught += [f"{hit.action}:{hit.rule}" for hit in outcome.hits if hit.action != "flag"]
    except ContentRefused as refused:  # a reject rule matched (or a rule failed): fail closed
        caught.append(f"reject:{refused.rule}")
    except InvalidArgument:
        pass  # stored before a shape rule it now breaks; not a filter's catch
    rules = call.policy.review
    level = call.policy.trust_view(memory.author).level_now(memory.author, memory.source, memory.trust)
    text = ScanForm.of(memory.content).text + "\n" + ScanForm.of(memory.metadata_json).text
    if rules.instructions and rules.reviews(level) and review.reads_as_instruction(text):
        caught.append(f"quarantine:{review.INSTRUCTION}")
    return list(dict.fromkeys(caught))


# -- the report -----------------------------------------------------------------------------------


def _report(core: GuardianCore, connection: Connection, record: provenance.Incident) -> pb.IncidentReport:
    items = provenance.incident_memories(connection, record.id)
    ids = [item.memory_id for item in items]
    present = core.memories.by_ids(connection, ids)
    reads = provenance.reads_of(connection, ids, _REPORT_LIMIT + 1)
    truncated = len(reads) > _REPORT_LIMIT
    reads = reads[:_REPORT_LIMIT]
    sessions = _sessions(reads)
    first_returned = {
        session.session: session.first_read_ms
        for session in sessions
        if (session.returned or session.labelled) and session.session
    }
    written = provenance.written_in_sessions(connection, first_returned, _REPORT_LIMIT + 1)
    truncated = truncated or len(written) > _REPORT_LIMIT
    held = set(ids)
    memories: list[pb.IncidentMemory] = []
    for item in items:
        memory = present.get(item.memory_id)
        if memory is None:
            memories.append(pb.IncidentMemory(id=item.memory_id, found=item.found, status="deleted"))
            continue
        memories.append(
            pb.IncidentMemory(
                id=memory.id,
                namespace=memory.namespace,
                author=memory.author,
                source=memory.declared_source,
                trust=memory.trust,
                found=item.found,
                status=memory.status,
                created_at_ms=memory.created_at_ms,
                derived_from=list(memory.derived_from),
                session=memory.session,
            )
        )
    return pb.IncidentReport(
        incident=_incident_message(connection, record),
        memories=memories,
        reads=[_read_message(read) for read in reads],
        sessions=sessions,
        written_after=[
            pb.WrittenAfter(
                id=memory_id, agent=agent, session=session, created_at_ms=created, in_incident=memory_id in held
            )
            for memory_id, agent, session, created in written[:_REPORT_LIMIT]
        ],
        truncated=truncated,
    )


def _sessions(reads: Sequence[provenance.Read]) -> list[pb.IncidentSession]:
    """The reads grouped by agent and session, in order of each session's first read."""
    grouped: dict[tuple[str, str], pb.IncidentSession] = {}
    for read in reads:
        key = (read.agent, read.session)
        session = grouped.get(key)
        if session is None:
            session = grouped[key] = pb.IncidentSession(
                agent=read.agent, session=read.session, first_read_ms=read.ts_ms, last_read_ms=read.ts_ms
            )
        session.last_read_ms = max(session.last_read_ms, read.ts_ms)
        into = {"returned": session.returned, "labelled": session.labelled, "withheld": session.withheld}[read.outcome]
        if read.memory_id not in into:
            into.append(read.memory_id)
    return list(grouped.values())


def _incident_message(connection: Connection, record: provenance.Incident) -> pb.Incident:
    matched, derived = provenance.incident_counts(connection, record.id)
    selector = record.selector
    return pb.Incident(
        id=record.id,
        opened_at_ms=record.opened_at_ms,
        opened_by=record.opened_by,
        selector=pb.IncidentSelector(
            agent=selector.agent,
            session=selector.session,
            source=selector.source,
            since_ms=selector.since_ms,
            until_ms=selector.until_ms,
        ),
        reason=record.reason,
        state="open" if record.open else "closed",
        closed_at_ms=record.closed_at_ms,
        closed_by=record.closed_by,
        resolution=record.resolution,
        matched=matched,
        derived=derived,
    )


def _incident_id(call: Call, value: str) -> str:
    if INCIDENT_ID_RE.fullmatch(value) is None:
        raise InvalidArgument("id: not an incident id this guardian issues (expected inc_ and 16 hex digits)")
    call.object_id = value
    return value


def _existing(connection: Connection, incident_id: str) -> provenance.Incident:
    record = provenance.incident(connection, incident_id)
    if record is None:
        raise NotFound("no incident with that id")
    return record


def _audit_memory(
    core: GuardianCore, call: Call, connection: Connection, operation: str, memory_id: str, *, reason: str
) -> None:
    """An audit row for one memory an incident (or a rescan) held, released or deleted, in its transaction."""
    core.audit.record(
        connection,
        ts_ms=call.now_ms,
        agent=call.agent,
        operation=operation,
        object_id=memory_id,
        decision="allow",
        reason=reason,
        policy_version=call.policy.version,
    )
