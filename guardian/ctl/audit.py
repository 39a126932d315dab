"""``guardianctl audit``: read, follow, export and verify the audit trail over the admin socket.

- ``tail [-n N] [-f]``: the newest rows; ``-f`` keeps printing new ones.
- ``query``: rows filtered by agent, operation, decision and time range.
- ``export [--after-seq N]``: the trail as JSON lines anyone can verify (rows,
  their public chain links, the signed heads, the audit-signing public keys;
  the format is in guardian/keys/audit_proof.py and the README);
  ``--format jsonl`` with filters: the matching rows alone, for reading.
- ``verify [--security-log FILE]``: walk the whole chain and check it still
  holds every head published to the security log; exit 1 naming the first
  row that does not hold.
- ``verify --public-key FILE EXPORT``: verify an export offline, with nothing
  but the audit-signing public keys (no socket, no guardian, no secret key).
- ``who-read ID``: every read that returned the memory (or withheld it for its
  trust level): when, which agent and session, which operation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from guardian.ctl.connection import call
from guardian.ctl.output import print_json, when
from guardian.keys.audit_proof import EXPORT_FORMAT, ROW_FIELDS, ExportReport, verify_export
from guardian.keys.signing import ALGORITHM, parse_public_keys, public_key_text
from shared.errors import ConfigError
from shared.rpc.guardian.v1 import admin_pb2

__all__ = ["add_audit_commands", "key_record", "parse_duration_ms", "parse_time"]

#: Calls one AdminService method: (parsed arguments, method name, request) -> response.

_RELATIVE_RE: Final = re.compile(r"(\d+)([smhd])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PAGE: Final = 1000
_FOLLOW_WAIT_MS: Final = 5000
_MAX_PUBLISHED_HEADS: Final = 10_000
#: A row as guardianctl prints and exports it: the canonical fields, the mac and the trace.
_FIELDS: Final = (*ROW_FIELDS, "mac", "trace")


def parse_time(text: str) -> int:
    """Unix ms from an ISO 8601 time (UTC unless it says otherwise) or an age such as 15m, 2h, 7d."""
    relative = _RELATIVE_RE.fullmatch(text.strip())
    if relative:
        return int((time.time() - int(relative[1]) * _UNIT_S[relative[2]]) * 1000)
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO 8601 (2026-11-25T10:00:00Z) or an age (30s, 15m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def parse_duration_ms(text: str) -> int:
    """An argparse type: a duration such as 30s, 15m, 2h or 7d, in ms (0 for "0")."""
    relative = _RELATIVE_RE.fullmatch(text.strip())
    if text.strip() == "0":
        return 0
    if relative is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use 30s, 15m, 2h or 7d")
    return int(relative[1]) * _UNIT_S[relative[2]] * 1000


def _row_count(text: str) -> int:
    """An argparse type: a whole number of rows from 1 to 1000."""
    if not text.isdigit() or not 1 <= int(text) <= _PAGE:
        raise argparse.ArgumentTypeError(f"expected a number of rows from 1 to {_PAGE}, got {text!r}")
    return int(text)


def _seq(text: str) -> int:
    """An argparse type: a row's sequence number (0 or more)."""
    if not text.isdigit() or int(text) > 2**63 - 1:
        raise argparse.ArgumentTypeError(f"expected a row number from 0, got {text!r}")
    return int(text)


def _row_dict(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in _FIELDS}


def _print_rows(rows: list[Any], as_json: bool) -> None:
    for row in rows:
        if as_json:
            print(json.dumps(_row_dict(row), ensure_ascii=False), flush=True)
            continue
        when = datetime.datetime.fromtimestamp(row.ts_ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")
        print(
            f"{row.seq:>7}  {when[:-3]}Z  {row.decision:<5}  {row.agent or '-':<24} {row.operation:<24}"
            f" {row.object_id[:40] or '-':<40}  {row.reason}",
            flush=True,
        )


def _query(args: argparse.Namespace, **fields: Any) -> admin_pb2.AuditQuery:
    return admin_pb2.AuditQuery(
        agent=getattr(args, "agent", "") or "",
        operation=getattr(args, "operation", "") or "",
        decision=getattr(args, "decision", "") or "",
        since_ms=getattr(args, "since", 0) or 0,
        until_ms=getattr(args, "until", 0) or 0,
        **fields,
    )


def _pages(args: argparse.Namespace) -> Iterator[list[Any]]:
    """Every matching row up to the head when the export began, a page at a time, oldest first.

    (Each page's query is itself audited, so without that bound the export would chase its own rows.)
    """
    after = 0
    end: int | None = None
    while end is None or after < end:
        response = call(args, "QueryAudit", _query(args, after_seq=after, limit=_PAGE))
        end = response.head_seq if end is None else end
        rows = [row for row in response.rows if row.seq <= end]
        if not rows:
            return
        yield rows
        after = rows[-1].seq


def cmd_audit_tail(args: argparse.Namespace) -> int:
    """guardianctl audit tail [-n N] [-f]."""
    response = call(args, "QueryAudit", _query(args, limit=args.lines, newest_first=True))
    rows = list(response.rows)
    _print_rows(rows, args.json)
    if not args.follow:
        return 0
    after = rows[-1].seq if rows else response.head_seq
    # Ctrl-C sets stop, which the call in progress looks at while it waits: a KeyboardInterrupt raised
    # wherever the signal lands (inside gRPC's code, or a channel closing) could leave the process hanging.
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        while not stop.is_set():
            query = _query(args, after_seq=after, limit=_PAGE, wait_ms=_FOLLOW_WAIT_MS, exclude_audit_reads=True)
            response = call(args, "QueryAudit", query, stop=stop)
            if response is not None and response.rows:
                _print_rows(list(response.rows), args.json)
                after = response.rows[-1].seq
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def cmd_audit_query(args: argparse.Namespace) -> int:
    """guardianctl audit query [filters] [--limit N]."""
    response = call(args, "QueryAudit", _query(args, limit=args.limit))
    _print_rows(list(response.rows), args.json)
    if not args.json and len(response.rows) == args.limit:
        print(f"(first {args.limit} rows; use --limit, a narrower filter, or `audit export`)", file=sys.stderr)
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    """guardianctl audit export [--after-seq N] [--output FILE]; --format jsonl [filters] for rows alone."""
    filtered = any(getattr(args, name, None) for name in ("agent", "operation", "decision", "since", "until"))
    if args.format == "verifiable" and filtered:
        raise ConfigError(
            "filters leave gaps a verifier cannot tell from removed rows: use them with --format jsonl,"
            " or export everything (optionally --after-seq N)"
        )
    if args.format == "jsonl" and args.after_seq:
        raise ConfigError("--after-seq belongs to the verifiable export; with --format jsonl use --since")
    output = sys.stdout if args.output == "-" else _create(args.output)
    count = heads = 0
    try:
        if args.format == "jsonl":
            for page in _pages(args):
                for row in page:
                    output.write(json.dumps(_row_dict(row), ensure_ascii=False) + "\n")
                count += len(page)
        else:
            count, heads = _export_verifiable(args, output)
    finally:
        if output is not sys.stdout:
            output.close()
    print(
        f"exported {count} rows" + (f" and {heads} signed heads" if args.format == "verifiable" else ""),
        file=sys.stderr,
    )
    return 0


def _create(name: str) -> Any:
    try:
        return Path(name).open("x", encoding="utf-8")  # closed by the caller
    except FileExistsError:
        raise ConfigError(f"{name} exists: choose another file (an export never overwrites one)") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {name}: {exc.strerror}") from None


def key_record(key: Any) -> dict[str, Any]:
    """The export's ``public_key`` record of an AuditSigningKey."""
    return {
        "type": "public_key",
        "key_id": key.key_id,
        "algorithm": ALGORITHM,
        "public_key": public_key_text(key.public_key),
        "created_at_ms": key.created_at_ms,
        "primary": key.primary,
        "heads": key.heads,
        "first_seq": key.first_seq,
        "last_seq": key.last_seq,
        "first_ts_ms": key.first_ts_ms,
        "last_ts_ms": key.last_ts_ms,
    }


def _export_verifiable(args: argparse.Namespace, output: Any) -> tuple[int, int]:
    """Write the export of guardian/keys/audit_proof.py, a page at a time; (rows, signed heads) written.

    The rows end at the chain's head when the export began (each page's request is itself
    audited, so without that bound the export would chase its own rows).
    """

    def write(record: dict[str, Any]) -> None:
        output.write(json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n")

    keys = call(args, "AuditSigningKeys", admin_pb2.AuditSigningKeysRequest()).keys
    after, link, until, rows, heads = args.after_seq, "", 0, 0, 0
    while True:
        page = call(
            args,
            "ExportAudit",
            admin_pb2.ExportAuditRequest(after_seq=after, until_seq=until, limit=_PAGE, after_link=link),
        )
        if not link:
            until = page.until_seq
            write(
                {
                    "type": "export",
                    "format": EXPORT_FORMAT,
                    "after_seq": after,
                    "until_seq": max(until, after),
                    "start_link": page.start_link,
                    "exported_at_ms": int(time.time() * 1000),
                }
            )
            for key in keys:
                write(key_record(key))
        signed = {head.seq: head for head in page.signed_heads}
        for exported in page.rows:
            write({"type": "row", **_row_dict(exported.row), "link": exported.link})
            head = signed.get(exported.row.seq)
            if head is not None:
                write(
                    {
                        "type": "signed_head",
                        "seq": head.seq,
                        "ts_ms": head.ts_ms,
                        "link": head.link,
                        "key_id": head.key_id,
                        "signature": head.signature,
                    }
                )
                heads += 1
        rows += len(page.rows)
        if not page.rows or page.rows[-1].row.seq >= until:
            return rows, heads
        after, link = page.rows[-1].row.seq, page.rows[-1].link


def published_heads(paths: list[str]) -> list[admin_pb2.ChainHead]:
    """The ``audit_chain_head`` entries of security log files (JSON lines; other lines are skipped)."""
    heads: dict[int, str] = {}
    for name in paths:
        try:
            lines = Path(name).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the security log {name}: {exc.strerror}") from None
        for line in lines:
            if '"audit_chain_head"' not in line:
                continue
            try:
                entry = json.loads(line[line.index("{") :])
                heads[int(entry["seq"])] = str(entry["mac"])
            except (ValueError, KeyError, TypeError):
                continue
    newest = sorted(heads)[-_MAX_PUBLISHED_HEADS:]
    return [admin_pb2.ChainHead(seq=seq, mac=heads[seq]) for seq in newest]


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """guardianctl audit verify [--security-log FILE]...; or --public-key FILE EXPORT (offline); exit 1 if it fails."""
    if args.public_key or args.export:
        return _verify_export(args)
    heads = published_heads(args.security_log)
    response = call(args, "VerifyAudit", admin_pb2.VerifyAuditRequest(published_heads=heads))
    result = {
        "intact": response.intact,
        "rows_checked": response.rows_checked,
        "head_seq": response.head.seq,
        "head_mac": response.head.mac,
        "first_bad_seq": response.first_bad_seq,
        "problem": response.problem,
        "published_heads_given": len(heads),
        "last_published_seq": response.last_published.seq,
    }
    if args.json:
        print(json.dumps(result))
    elif response.intact:
        print(
            f"intact: {response.rows_checked} rows verified, head at row {response.head.seq}"
            f" (mac {response.head.mac[:16]}…); last published head: row {response.last_published.seq or '-'}"
        )
    else:
        print(f"BROKEN at row {response.first_bad_seq}: {response.problem}")
        print(f"rows verified before it: {response.rows_checked}")
    return 0 if response.intact else 1


def _trusted_keys(names: list[str]) -> dict[str, Any]:
    """The public keys of the files named (guardianctl keys public writes them); ConfigError naming a bad one."""
    trusted: dict[str, Any] = {}
    for name in names:
        try:
            text = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read the public key file {name}: {why}") from None
        for key_id, public in parse_public_keys(text, name).items():
            known = trusted.get(key_id)
            if known is not None and known.public_bytes_raw() != public.public_bytes_raw():
                raise ConfigError(f"{name}: key id {key_id!r} is also in another public key file, with another key")
            trusted[key_id] = public
    return trusted


def _verify_export(args: argparse.Namespace) -> int:
    """guardianctl audit verify --public-key FILE EXPORT: offline, with the public keys alone."""
    if not args.public_key:
        raise ConfigError("an export is verified with --public-key FILE (written by guardianctl keys public)")
    if not args.export:
        raise ConfigError("--public-key verifies an export: name the export file too")
    if args.security_log:
        raise ConfigError("--security-log checks the running guardian's chain; an export is verified without it")
    trusted = _trusted_keys(args.public_key)
    path = Path(args.export)
    try:
        path.open("rb").close()
    except OSError as exc:
        raise ConfigError(f"cannot read the export {args.export}: {exc.strerror}") from None

    def lines() -> Iterator[bytes]:
        with path.open("rb") as handle:
            yield from handle

    report = verify_export(lines, trusted)
    if args.json:
        print_json(_report_dict(report))
    else:
        _print_report(report)
    return 0 if report.verified else 1


def _report_dict(report: ExportReport) -> dict[str, Any]:
    problem = report.problem
    return {
        "verified": report.verified,
        "rows": report.rows,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "signed_through": report.signed_through,
        "heads_checked": report.heads_checked,
        "keys_used": list(report.keys_used),
        "not_covered": report.not_covered,
        "kind": problem.kind if problem else "",
        "line": problem.line if problem else 0,
        "seq": problem.seq if problem else 0,
        "problem": problem.message if problem else "",
        "warnings": list(report.warnings),
    }


def _print_report(report: ExportReport) -> None:
    for warning in report.warnings:
        print(f"warning: {warning}")
    problem = report.problem
    if problem is not None:
        where = f" at line {problem.line}" if problem.line else ""
        row = f" (row {problem.seq})" if problem.seq else ""
        print(f"FAILED{where}{row}: {problem.message}")
        print(f"proven before it: rows up to {report.signed_through}" if report.signed_through else "nothing proven")
        return
    print(
        f"verified: rows {report.first_seq}..{report.signed_through} are exactly the guardian's, proven by"
        f" {report.heads_checked} signed heads (keys {', '.join(report.keys_used)}); the last signed row is"
        f" {report.signed_through}"
    )
    if report.not_covered:
        print(
            f"not covered: rows {report.signed_through + 1}..{report.last_seq} ({report.not_covered}) come after"
            " the last signed head: nothing proves them yet"
        )


def cmd_audit_who_read(args: argparse.Namespace) -> int:
    """guardianctl audit who-read ID [--limit N]."""
    response = call(args, "WhoRead", admin_pb2.WhoReadRequest(id=args.id, limit=args.limit))
    for read in response.reads:
        if args.json:
            print_json(
                {
                    "memory_id": read.memory_id,
                    "seq": read.seq,
                    "ts_ms": read.ts_ms,
                    "agent": read.agent,
                    "session": read.session,
                    "operation": read.operation,
                    "outcome": read.outcome,
                }
            )
        else:
            print(
                f"{when(read.ts_ms)}  row {read.seq:<8} {read.agent:<24} session {read.session or '-':<16}"
                f"  {read.operation:<14} {read.outcome}"
            )
    if not args.json and not response.reads:
        print(f"no read returned or withheld {args.id}")
    if response.truncated:
        print(f"(first {args.limit} reads; use --limit)", file=sys.stderr)
    return 0


def add_audit_commands(commands: Any) -> None:
    """Register ``audit tail|query|export|verify`` under the top-level subcommands."""
    audit = commands.add_parser("audit", help="read, follow, export and verify the audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def filters(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--agent", help="only this agent's rows (or a caller such as @admin:alice)")
        sub.add_argument("--operation", help="an operation (memory.store) or a prefix ending in '*' (memory.*)")
        sub.add_argument("--decision", choices=("allow", "deny", "error", "alert"))
        sub.add_argument("--since", type=parse_time, help="from this time: ISO 8601 or an age (30s, 15m, 2h, 7d)")
        sub.add_argument("--until", type=parse_time, help="before this time: ISO 8601 or an age")

    tail = audit_commands.add_parser("tail", help="the newest rows; -f keeps following")
    tail.add_argument("-n", "--lines", type=_row_count, default=20, metavar="N", help="how many (1-1000; 20)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new rows until Ctrl-C")
    filters(tail)
    tail.set_defaults(func=cmd_audit_tail)

    query = audit_commands.add_parser("query", help="rows filtered by agent, operation, decision and time")
    filters(query)
    query.add_argument("--limit", type=_row_count, default=100, metavar="N", help="at most this many (1-1000; 100)")
    query.set_defaults(func=cmd_audit_query)

    export = audit_commands.add_parser(
        "export",
        help="the trail as JSON lines anyone can verify with the public key (or, --format jsonl, rows alone)",
        description="verifiable (default): every row after --after-seq up to the head now, each with its public"
        " hash chain link, the heads the guardian signed with its audit-signing key, and the public keys;"
        " `guardianctl audit verify --public-key KEYS EXPORT` checks it anywhere. The format is documented in the"
        " README (An export anyone can verify). jsonl: the rows alone, filtered, for reading. Rows hold no memory"
        " content, token or key.",
    )
    export.add_argument(
        "--format",
        choices=("verifiable", "jsonl"),
        default="verifiable",
        help="verifiable: rows, links, signed heads and public keys; jsonl: the matching rows alone",
    )
    export.add_argument("--output", default="-", help="file to create (refuses to overwrite); '-': stdout")
    export.add_argument(
        "--after-seq", type=_seq, default=0, metavar="N", help="start after row N (verifiable only; default: row 1)"
    )
    filters(export)
    export.set_defaults(func=cmd_audit_export)

    verify = audit_commands.add_parser(
        "verify",
        help="walk the whole chain (exit 1 naming the first row that does not hold); or verify an export offline",
        description="Without an export: ask the running guardian to verify every row's mac and sequence, the"
        " signed heads, and that the chain still holds the heads published to the security log (the guardian's"
        " last published head is always checked). Pass the security log (a file, or `journalctl -u"
        " agent-guardian -o cat > FILE`) to detect truncation or rollback. With --public-key FILE EXPORT: verify an"
        " export from `audit export` offline (no socket, no guardian, no secret key): every row up to the last"
        " signed head must be exactly what the guardian signed; exit 1 naming the first line that does not hold"
        " (changed, missing, out of order, head signature invalid, unknown key); rows after the last signed head"
        " are reported as not covered.",
    )
    verify.add_argument(
        "--security-log", action="append", default=[], metavar="FILE", help="security log to take heads from"
    )
    verify.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="FILE",
        help="audit-signing public keys to trust (from `guardianctl keys public`); may be given more than once",
    )
    verify.add_argument("export", nargs="?", help="an export from `guardianctl audit export` (with --public-key)")
    verify.set_defaults(func=cmd_audit_verify)

    who_read = audit_commands.add_parser(
        "who-read", help="every read that returned a memory, or withheld it for its trust: who, when, how"
    )
    who_read.add_argument("id", help="the memory's id (mem_...)")
    who_read.add_argument("--limit", type=int, default=1000, help="at most this many reads (1-10000; 1000)")
    who_read.set_defaults(func=cmd_audit_who_read)
