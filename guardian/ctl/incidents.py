"""``guardianctl incident`` and ``memories rescan``: the security team's incident response over the admin socket.

- ``open --agent A [--session REF] [--source S] [--since T] [--until T] --reason TEXT``:
  quarantine what the selector matches and everything derived from it; prints the report.
- ``list``: incidents, newest first.
- ``report ID``: its memories, every session that read any of them (returned or
  withheld, when) and what those sessions wrote afterwards. ``--json`` for machines.
- ``close ID --release | --delete``: memories back to agents, or deleted for good.

``memories rescan [--batch N]`` runs the policy's current filters and the
instruction review signal over every active memory, a batch at a time, and
quarantines what they catch (printing each id and what caught it).

Reports hold ids and provenance, never content.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf.json_format import MessageToDict

from guardian.ctl.admins import add_propose_flag
from guardian.ctl.audit import parse_time
from guardian.ctl.connection import call
from guardian.ctl.output import when
from shared.rpc.guardian.v1 import admin_pb2

__all__ = ["add_incident_commands", "add_memory_commands"]


def cmd_incident_open(args: argparse.Namespace) -> int:
    """guardianctl incident open [selector] --reason TEXT."""
    selector = admin_pb2.IncidentSelector(
        agent=args.agent or "",
        session=args.session or "",
        source=args.source or "",
        since_ms=args.since or 0,
        until_ms=args.until or 0,
    )
    report = call(args, "OpenIncident", admin_pb2.OpenIncidentRequest(selector=selector, reason=args.reason))
    _print_report(report, args.json)
    return 0


def cmd_incident_list(args: argparse.Namespace) -> int:
    """guardianctl incident list."""
    response = call(args, "ListIncidents", admin_pb2.ListIncidentsRequest(limit=args.limit))
    if args.json:
        for incident in response.incidents:
            print(json.dumps(_as_dict(incident), ensure_ascii=False))
        return 0
    for incident in response.incidents:
        print(
            f"{incident.id}  {incident.state:<6}  opened {when(incident.opened_at_ms)} by {incident.opened_by}"
            f"  {_selector_text(incident.selector)}  held {incident.matched} + {incident.derived} derived"
            + (f"  {incident.resolution}" if incident.resolution else "")
        )
    if not response.incidents:
        print("no incidents")
    return 0


def cmd_incident_report(args: argparse.Namespace) -> int:
    """guardianctl incident report ID."""
    _print_report(call(args, "ReportIncident", admin_pb2.IncidentRequest(id=args.id)), args.json)
    return 0


def cmd_incident_close(args: argparse.Namespace) -> int:
    """guardianctl incident close ID --release | --delete."""
    resolution = "release" if args.release else "delete"
    report = call(args, "CloseIncident", admin_pb2.CloseIncidentRequest(id=args.id, resolution=resolution))
    _print_report(report, args.json)
    return 0


def cmd_memories_rescan(args: argparse.Namespace) -> int:
    """guardianctl memories rescan [--batch N]."""
    after, scanned, held = 0, 0, 0
    while True:
        response = call(args, "RescanMemories", admin_pb2.RescanRequest(after_rowid=after, limit=args.batch))
        scanned += response.scanned
        for caught in response.held:
            held += 1
            if args.json:
                print(json.dumps({"id": caught.id, "caught_by": list(caught.caught_by)}))
            else:
                print(f"held {caught.id}: {', '.join(caught.caught_by)}")
        after = response.next_rowid
        if response.done:
            break
    if not args.json:
        print(f"rescanned {scanned} active memories; {held} quarantined (guardianctl quarantine list)")
    return 0


def _as_dict(message: Any) -> dict[str, Any]:
    converted: dict[str, Any] = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return converted


def _selector_text(selector: admin_pb2.IncidentSelector) -> str:
    parts = [
        f"agent={selector.agent}" if selector.agent else "",
        f"session={selector.session}" if selector.session else "",
        f"source={selector.source}" if selector.source else "",
        f"since={when(selector.since_ms)}" if selector.since_ms else "",
        f"until={when(selector.until_ms)}" if selector.until_ms else "",
    ]
    return " ".join(part for part in parts if part)


def _print_report(report: admin_pb2.IncidentReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_as_dict(report), ensure_ascii=False))
        return
    incident = report.incident
    print(f"incident {incident.id} ({incident.state}{', ' + incident.resolution if incident.resolution else ''})")
    print(f"  opened {when(incident.opened_at_ms)} by {incident.opened_by}: {incident.reason or '-'}")
    if incident.closed_at_ms:
        print(f"  closed {when(incident.closed_at_ms)} by {incident.closed_by}")
    print(f"  selector: {_selector_text(incident.selector)}")
    print(f"memories: {incident.matched} matched, {incident.derived} derived from them")
    for memory in report.memories:
        origin = f"from {', '.join(memory.derived_from)}" if memory.derived_from else ""
        print(
            f"  {memory.id}  {memory.found:<7}  {memory.status:<11}  {memory.namespace or '-':<16}"
            f"  by {memory.author or '-'} (session {memory.session or '-'})  source {memory.source or '-'}"
            f"  {memory.trust or '-'}  {when(memory.created_at_ms)}  {origin}".rstrip()
        )
    print(f"sessions that read them: {len(report.sessions)}")
    for session in report.sessions:
        print(
            f"  {session.agent:<20} session {session.session or '-':<16}  {when(session.first_read_ms)}"
            f" .. {when(session.last_read_ms)}  returned {len(session.returned)}, labelled {len(session.labelled)},"
            f" withheld {len(session.withheld)}"
        )
    print(f"written by those sessions after reading: {len(report.written_after)}")
    for written in report.written_after:
        mark = "  (held by this incident)" if written.in_incident else ""
        print(f"  {written.id}  {written.agent} session {written.session}  {when(written.created_at_ms)}{mark}")
    if report.truncated:
        print("(the report lists the first 10,000 reads and writes)")


def add_incident_commands(commands: Any) -> None:
    """Register ``incident open|list|report|close`` under the top-level subcommands."""
    incident = commands.add_parser(
        "incident", help="hold what an agent, session or source wrote (and what was built on it); who read it"
    )
    actions = incident.add_subparsers(dest="incident_command", required=True, metavar="ACTION")

    opening = actions.add_parser(
        "open",
        help="quarantine every memory the selector matches and everything derived from them",
        description="Hold, in one step, the memories written by an agent (or in a session, or declared from a"
        " source, or in a time range: at least one) and every memory derived from them, in any namespace;"
        " print the report. Each memory held gets an audit row.",
    )
    opening.add_argument("--agent", help="memories this agent wrote (or last changed)")
    opening.add_argument("--session", help="... in this session (its 16-hex audit reference)")
    opening.add_argument("--source", help="... declared from this source (a kind such as tool covers tool:NAME)")
    opening.add_argument("--since", type=parse_time, help="... created from this time: ISO 8601 or an age (2h, 7d)")
    opening.add_argument("--until", type=parse_time, help="... created before this time")
    opening.add_argument("--reason", default="", help="why, for the record")
    opening.set_defaults(func=cmd_incident_open)

    listing = actions.add_parser("list", help="incidents, newest first")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (1-1000; 100)")
    listing.set_defaults(func=cmd_incident_list)

    report = actions.add_parser(
        "report", help="its memories, every session that read any of them, what they wrote afterwards"
    )
    report.add_argument("id", help="an incident id (inc_...)")
    report.set_defaults(func=cmd_incident_report)

    closing = actions.add_parser("close", help="release the incident's memories to agents, or delete them")
    closing.add_argument("id", help="an incident id (inc_...)")
    how = closing.add_mutually_exclusive_group(required=True)
    how.add_argument("--release", action="store_true", help="back to agents (those the incident quarantined)")
    how.add_argument("--delete", action="store_true", help="deleted for good")
    add_propose_flag(closing)
    closing.set_defaults(func=cmd_incident_close)


def add_memory_commands(commands: Any) -> None:
    """Register ``memories rescan`` under the top-level subcommands."""
    memories = commands.add_parser("memories", help="re-screen stored memories with the policy in force")
    actions = memories.add_subparsers(dest="memories_command", required=True, metavar="ACTION")
    rescan = actions.add_parser(
        "rescan",
        help="run the current filters and the instruction review over every active memory; hold what they catch",
        description="So a rule written after an attack finds what got in before it. Each memory held is"
        " quarantined with an audit row naming the rules that caught it.",
    )
    rescan.add_argument("--batch", type=int, default=200, help="memories per request (1-2000; 200)")
    rescan.set_defaults(func=cmd_memories_rescan)
