"""The audit trail's public proof: the hash chain, signed heads, the export format and its verifier.

Pure functions of bytes and text, with no database and no secret, so that ``guardianctl
audit verify --public-key`` runs on any machine and a third party can write its own
verifier from this description (README, "An export anyone can verify", says the same).

Canonical row bytes, version 1 (NEVER CHANGE: every audit row's mac and link covers them)::

    canonical(row) = b"agent-guardian audit v1\\n"
                     || ns(seq) || ns(ts_ms) || ns(agent) || ns(session) || ns(operation)
                     || ns(object_id) || ns(decision) || ns(reason) || ns(policy_version)
                     || ns(args_digest) || ns(key_id)
    ns(value)      = ascii(len(b)) || b":" || b || b","     where b = UTF-8 of the value,
                                                             integers in decimal

Version 2 is version 1's fields with the request's W3C trace id after them; a row whose
``trace`` is empty (every row written before traces were recorded) is in version 1::

    canonical(row) = b"agent-guardian audit v2\n" || ns(seq) || ... || ns(key_id) || ns(trace)
                     when row.trace != "" (32 lowercase hex digits)

The public hash chain, which anyone can compute from exported rows (no key)::

    link(0)   = 64 ASCII "0"s
    link(row) = lowercase hex of SHA-256(b"agent-guardian audit link v1\\n"
                                         || canonical(row) || ns(row.mac) || link(previous row))

where a link is 64 lowercase hex ASCII characters. A signed head vouches for every row up
to ``seq``: the guardian signs, with Ed25519 (RFC 8032, pure Ed25519, no prehash), ::

    message(head) = b"agent-guardian audit signed head v1\\n"
                    || ns(seq) || ns(ts_ms) || ns(link) || ns(key_id)

and stores the signature as 128 lowercase hex digits. The export (``guardianctl audit
export``) is JSON lines, one object a line, each with a ``type``:

- line 1, ``export``: ``format`` (:data:`EXPORT_FORMAT`), ``after_seq`` (the export's rows
  start after it), ``until_seq`` (they end at it), ``start_link`` (link at ``after_seq``:
  unauthenticated itself, but every signed head after it covers it), ``exported_at_ms``;
- ``public_key``: ``key_id``, ``algorithm`` (``ed25519``), ``public_key`` (base64 of the raw
  32 bytes), ``created_at_ms``, ``primary``, ``heads``, ``first_seq``, ``last_seq``,
  ``first_ts_ms``, ``last_ts_ms`` (the rows and time its heads signed): for information
  only, a verifier trusts the public key file it is given, never these;
- ``row``: the twelve audit fields (``seq``, ``ts_ms`` integers; the others strings) and
  ``link``, the link after this row as the guardian computed it (lets a verifier name the
  first changed row; the signed heads are what proves);
- ``signed_head``: ``seq``, ``ts_ms``, ``link``, ``key_id``, ``signature``.

Rows come in sequence order, each once, from ``after_seq + 1`` to ``until_seq``; the
exporter writes each signed head after the row it covers, but a verifier takes heads from
anywhere in the file. What a verification proves: every row up to the last signed head is
exactly the guardian's (nothing changed, removed, added or reordered). Rows after it are
not covered yet. A tail cut off together with its heads leaves a shorter valid export:
compare the last head with one published elsewhere (the security log's
``audit_chain_head`` lines carry ``signed_seq`` and ``link``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from guardian.keys.signing import ALGORITHM, public_key_text, verify_signature
from shared.errors import InvalidArgument

__all__ = [
    "EXPORT_FORMAT",
    "GENESIS_LINK",
    "ROW_FIELDS",
    "ExportProblem",
    "ExportReport",
    "SignedHead",
    "canonical_row",
    "canonical_v1",
    "head_message",
    "next_link",
    "verify_export",
]

_CANONICAL_TAG: Final = b"agent-guardian audit v1\n"
_CANONICAL_V2_TAG: Final = b"agent-guardian audit v2\n"
_LINK_TAG: Final = b"agent-guardian audit link v1\n"
_HEAD_TAG: Final = b"agent-guardian audit signed head v1\n"
#: The export's format, named in its first line.
EXPORT_FORMAT: Final = "agent-guardian audit export v1"
GENESIS_LINK: Final = "0" * 64
#: The fields canonical(row) covers, in order; a row also has its ``mac``.
ROW_FIELDS: Final = (
    "seq",
    "ts_ms",
    "agent",
    "session",
    "operation",
    "object_id",
    "decision",
    "reason",
    "policy_version",
    "args_digest",
    "key_id",
)
_INT_FIELDS: Final = frozenset({"seq", "ts_ms"})
_LINK_RE: Final = re.compile(r"[0-9a-f]{64}")
_TRACE_RE: Final = re.compile(r"[0-9a-f]{32}")
_MAX_INT: Final = 2**63 - 1
_MAX_LINE: Final = 1 << 20

ProblemKind = Literal["malformed", "changed", "missing", "out_of_order", "bad_signature", "unknown_key", "not_signed"]


def _ns(value: int | str) -> bytes:
    data = str(value).encode("utf-8")
    return b"%d:%s," % (len(data), data)


def canonical_row(values: Sequence[int | str], trace: str) -> bytes:
    """canonical(row): version 1 for a row with no trace, else version 2 (the module docstring)."""
    if not trace:
        return canonical_v1(values)
    if len(values) != len(ROW_FIELDS):
        raise ValueError(f"a canonical row has {len(ROW_FIELDS)} fields and its trace")
    return _CANONICAL_V2_TAG + b"".join(_ns(value) for value in values) + _ns(trace)


def canonical_v1(values: Sequence[int | str]) -> bytes:
    """canonical(row) of the module docstring, from the values of :data:`ROW_FIELDS` in order. Never change."""
    if len(values) != len(ROW_FIELDS):
        raise ValueError(f"a canonical row has {len(ROW_FIELDS)} fields")
    return _CANONICAL_TAG + b"".join(_ns(value) for value in values)


def next_link(canonical: bytes, mac: str, previous: str) -> str:
    """link(row) of the module docstring: the public chain after a row, from the link before it."""
    return hashlib.sha256(_LINK_TAG + canonical + _ns(mac) + previous.encode("ascii")).hexdigest()


def head_message(seq: int, ts_ms: int, link: str, key_id: str) -> bytes:
    """The bytes a signed head's signature covers."""
    return _HEAD_TAG + _ns(seq) + _ns(ts_ms) + _ns(link) + _ns(key_id)


@dataclass(frozen=True)
class SignedHead:
    """A chain head signed with the audit-signing key: it vouches for every row up to seq."""

    seq: int
    ts_ms: int
    #: link(row seq), 64 lowercase hex digits.
    link: str
    key_id: str
    #: Ed25519 over :attr:`message`, 128 lowercase hex digits.
    signature: str

    @property
    def message(self) -> bytes:
        """What the signature covers."""
        return head_message(self.seq, self.ts_ms, self.link, self.key_id)

    def verifies_with(self, public: Ed25519PublicKey) -> bool:
        """Whether the signature is public's over :attr:`message`."""
        return verify_signature(public, self.signature, self.message)

    def to_record(self) -> dict[str, Any]:
        """The export's ``signed_head`` record."""
        return {"type": "signed_head", **{name: getattr(self, name) for name in _HEAD_FIELDS}}


_HEAD_FIELDS: Final = ("seq", "ts_ms", "link", "key_id", "signature")


# -- verifying an export ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportProblem:
    """The first thing in an export that does not hold."""

    kind: ProblemKind
    #: The line (from 1) it is on; 0 when it is about the file as a whole.
    line: int
    #: The row it is about; 0 when none.
    seq: int
    message: str


@dataclass(frozen=True)
class ExportReport:
    """What verifying an export found."""

    rows: int
    first_seq: int
    last_seq: int
    #: The last row a verified signed head covers (0: none).
    signed_through: int
    heads_checked: int
    #: The key ids of the heads that verified.
    keys_used: tuple[str, ...]
    problem: ExportProblem | None
    warnings: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        """Whether every row up to the last signed head is proven the guardian's."""
        return self.problem is None

    @property
    def not_covered(self) -> int:
        """Rows after the last signed head (nothing proves them yet)."""
        return self.last_seq - self.signed_through if self.verified and self.rows else 0


class _Malformed(InvalidArgument):
    """A line that is not a record of the format (caught here; reported as the problem of its line)."""


@dataclass
class _Header:
    after_seq: int
    until_seq: int
    start_link: str


@dataclass
class _Collected:
    header: _Header | None = None
    heads: dict[int, tuple[int, SignedHead]] = field(default_factory=dict)
    listed_keys: dict[str, str] = field(default_factory=dict)
    malformed: ExportProblem | None = None
    #: Rows that do not follow the row before them in the file (so a gap can be told from a move).
    displaced: set[int] = field(default_factory=set)


def verify_export(open_lines: Callable[[], Iterable[bytes]], trusted: Mapping[str, Ed25519PublicKey]) -> ExportReport:
    """Verify an export against trusted public keys (by key id); open_lines gives the file's lines, twice.

    The first pass checks every line's shape and collects the header and the signed heads;
    the second walks the rows in order, recomputing the public chain, and checks each signed
    head where its row is. The report names the first line that does not hold.
    """
    collected = _collect(open_lines())
    header = collected.header
    if header is None:
        empty = ExportProblem("malformed", 1, 0, "malformed: the file is empty, not an export")
        return ExportReport(0, 0, 0, 0, 0, (), collected.malformed or empty)
    stop_at = collected.malformed.line if collected.malformed else 0
    walk = _Walk(header, collected.heads, trusted, collected.displaced)
    problem = walk.rows(open_lines(), stop_at)
    if problem is None:
        problem = collected.malformed or walk.finish()
    warnings = tuple(
        f"the export lists key {key_id} with a public key other than the trusted one"
        for key_id, encoded in collected.listed_keys.items()
        if key_id in trusted and encoded != _encoded(trusted[key_id])
    )
    return ExportReport(
        rows=walk.count,
        first_seq=walk.first_seq,
        last_seq=walk.prev_seq if walk.count else 0,
        signed_through=walk.signed_through,
        heads_checked=walk.heads_checked,
        keys_used=tuple(sorted(walk.keys_used)),
        problem=problem,
        warnings=warnings,
    )


def _encoded(public: Ed25519PublicKey) -> str:
    return public_key_text(public.public_bytes_raw())


def _lines(raw_lines: Iterable[bytes]) -> Iterable[tuple[int, dict[str, Any] | _Malformed]]:
    for number, raw in enumerate(raw_lines, start=1):
        yield number, _parse(raw)


def _parse(raw: bytes) -> dict[str, Any] | _Malformed:
    if len(raw) > _MAX_LINE:
        return _Malformed(f"longer than {_MAX_LINE} bytes")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return _Malformed("not UTF-8 text")
    except ValueError:
        return _Malformed("not JSON")
    if not isinstance(value, dict):
        return _Malformed("not a JSON object")
    return value


def _collect(raw_lines: Iterable[bytes]) -> _Collected:
    found = _Collected()
    expect = 0
    for number, record in _lines(raw_lines):
        try:
            if isinstance(record, _Malformed):
                raise record
            kind = record.get("type")
            if number == 1:
                if kind != "export":
                    raise _Malformed('the first line must be the export header ({"type": "export", ...})')
                found.header = _header(record)
                expect = found.header.after_seq + 1
            elif kind == "export":
                raise _Malformed("a second export header")
            elif kind == "row":
                seq = int(_row_values(record)[0][0])
                if seq != expect:
                    found.displaced.add(seq)
                expect = seq + 1
            elif kind == "signed_head":
                head = _head(record)
                assert found.header is not None
                if head.seq <= found.header.after_seq:
                    raise _Malformed(f"a signed head for row {head.seq}, which is before the export's first row")
                if head.seq in found.heads:
                    raise _Malformed(f"a second signed head for row {head.seq}")
                found.heads[head.seq] = (number, head)
            elif kind == "public_key":
                key_id, encoded = _listed_key(record)
                found.listed_keys[key_id] = encoded
            else:
                raise _Malformed(f"unknown record type {str(kind)[:40]!r}")
        except _Malformed as bad:
            found.malformed = ExportProblem("malformed", number, 0, f"malformed: {bad.message}")
            return found
    return found


def _require(
    record: Mapping[str, Any], names: Iterable[str], ints: Iterable[str] = (), bools: Iterable[str] = ()
) -> None:
    expected = {"type", *names}
    if set(record) != expected:
        missing, extra = sorted(expected - set(record)), sorted(set(record) - expected)
        raise _Malformed(
            ("missing " + ", ".join(missing) if missing else "")
            + ("; " if missing and extra else "")
            + ("unexpected " + ", ".join(name[:40] for name in extra[:5]) if extra else "")
        )
    numbers, flags = set(ints), set(bools)
    for name in sorted(expected - {"type"}):
        value = record[name]
        if name in numbers:
            if type(value) is not int or not 0 <= value <= _MAX_INT:
                raise _Malformed(f"{name} must be a whole number from 0 to {_MAX_INT}")
        elif name in flags:
            if not isinstance(value, bool):
                raise _Malformed(f"{name} must be true or false")
        elif not isinstance(value, str):
            raise _Malformed(f"{name} must be a string")


def _link(value: str, name: str) -> str:
    if _LINK_RE.fullmatch(value) is None:
        raise _Malformed(f"{name} must be 64 lowercase hex digits")
    return value


def _header(record: Mapping[str, Any]) -> _Header:
    _require(record, ("format", "after_seq", "until_seq", "start_link", "exported_at_ms"), _HEADER_INTS)
    if record["format"] != EXPORT_FORMAT:
        raise _Malformed(f"format must be {EXPORT_FORMAT!r}")
    if record["until_seq"] < record["after_seq"]:
        raise _Malformed("until_seq must not be below after_seq")
    return _Header(record["after_seq"], record["until_seq"], _link(record["start_link"], "start_link"))


_HEADER_INTS: Final = ("after_seq", "until_seq", "exported_at_ms")
_KEY_FIELDS: Final = (
    "key_id",
    "algorithm",
    "public_key",
    "created_at_ms",
    "primary",
    "heads",
    "first_seq",
    "last_seq",
    "first_ts_ms",
    "last_ts_ms",
)


def _row_values(record: Mapping[str, Any]) -> tuple[list[int | str], str, str, str]:
    """(the canonical values, trace, mac, link) of a row record (a record without ``trace`` has none)."""
    # trace came with canonical form v2: an export from before has none (every row then is v1).
    _require(record, (*ROW_FIELDS, "mac", "link", *(("trace",) if "trace" in record else ())), _INT_FIELDS)
    if record["seq"] < 1:
        raise _Malformed("seq must be at least 1")
    trace = record.get("trace", "")
    if not isinstance(trace, str) or (trace and not _TRACE_RE.fullmatch(trace)):
        raise _Malformed("trace must be 32 lowercase hex digits or empty")
    return [record[name] for name in ROW_FIELDS], trace, record["mac"], _link(record["link"], "link")


def _head(record: Mapping[str, Any]) -> SignedHead:
    _require(record, _HEAD_FIELDS, ("seq", "ts_ms"))
    if record["seq"] < 1:
        raise _Malformed("seq must be at least 1")
    return SignedHead(
        record["seq"], record["ts_ms"], _link(record["link"], "link"), record["key_id"], record["signature"]
    )


def _listed_key(record: Mapping[str, Any]) -> tuple[str, str]:
    _require(
        record,
        _KEY_FIELDS,
        ("created_at_ms", "heads", "first_seq", "last_seq", "first_ts_ms", "last_ts_ms"),
        ("primary",),
    )
    if record["algorithm"] != ALGORITHM:
        raise _Malformed(f"algorithm must be {ALGORITHM!r}")
    return record["key_id"], record["public_key"]


class _Walk:
    """The second pass: rows in order, the chain recomputed, each signed head checked at its row."""

    def __init__(
        self,
        header: _Header,
        heads: dict[int, tuple[int, SignedHead]],
        trusted: Mapping[str, Ed25519PublicKey],
        displaced: set[int],
    ) -> None:
        self.header = header
        self.heads = heads
        self.trusted = trusted
        self.displaced = displaced
        self.prev_seq = header.after_seq
        self.link = header.start_link
        self.count = 0
        self.first_seq = 0
        self.signed_through = 0
        self.heads_checked = 0
        self.keys_used: set[str] = set()

    def rows(self, raw_lines: Iterable[bytes], stop_at: int) -> ExportProblem | None:
        for number, record in _lines(raw_lines):
            if stop_at and number >= stop_at:
                return None
            if isinstance(record, _Malformed) or record.get("type") != "row":
                continue
            try:
                problem = self._row(number, record)
            except _Malformed as bad:  # the file changed since the first pass read it
                return ExportProblem("malformed", number, 0, f"malformed: {bad.message}")
            if problem is not None:
                return problem
        return None

    def _row(self, number: int, record: dict[str, Any]) -> ExportProblem | None:
        values, trace, mac, claimed = _row_values(record)
        seq = int(values[0])
        expected = self.prev_seq + 1
        if seq > self.header.until_seq:
            return ExportProblem(
                "malformed", number, seq, f"malformed: row {seq} is past the header's until_seq {self.header.until_seq}"
            )
        if seq > expected and expected in self.displaced:
            return ExportProblem(
                "out_of_order",
                number,
                seq,
                f"out of order: row {seq} stands where row {expected} should (row {expected} comes later in the file)",
            )
        if seq > expected:
            span = f"rows {expected}..{seq - 1} are" if seq - 1 > expected else f"row {expected} is"
            return ExportProblem("missing", number, seq, f"missing: {span} not in the export (row {seq} follows)")
        if seq < expected:
            return ExportProblem(
                "out_of_order", number, seq, f"out of order: row {seq} comes after row {self.prev_seq}"
            )
        self.link = next_link(canonical_row(values, trace), mac, self.link)
        if claimed != self.link:
            return ExportProblem(
                "changed", number, seq, f"changed: row {seq}'s fields do not give the link the guardian recorded for it"
            )
        self.count += 1
        self.first_seq = self.first_seq or seq
        self.prev_seq = seq
        placed = self.heads.get(seq)
        return self._head(*placed) if placed else None

    def _head(self, number: int, head: SignedHead) -> ExportProblem | None:
        since = f"rows {self.signed_through + 1}..{head.seq}" if self.signed_through else f"rows up to {head.seq}"
        public = self.trusted.get(head.key_id)
        if public is None:
            return ExportProblem(
                "unknown_key",
                number,
                head.seq,
                f"unknown key: the head signed for row {head.seq} names key {head.key_id[:40]!r},"
                " which is not in the public key file",
            )
        if head.link != self.link:
            return ExportProblem(
                "changed",
                number,
                head.seq,
                f"changed: {since} do not match the head signed for row {head.seq}: a row (and the links"
                " after it) or the head was changed",
            )
        if not head.verifies_with(public):
            return ExportProblem(
                "bad_signature",
                number,
                head.seq,
                f"head signature invalid: the head for row {head.seq} is not signed by key {head.key_id}"
                " of the public key file (forged, changed, or the file is another guardian's)",
            )
        self.signed_through = head.seq
        self.heads_checked += 1
        self.keys_used.add(head.key_id)
        return None

    def finish(self) -> ExportProblem | None:
        beyond = sorted(seq for seq in self.heads if seq > self.prev_seq)
        if beyond:
            number, _ = self.heads[beyond[0]]
            return ExportProblem(
                "missing",
                number,
                beyond[0],
                f"missing: the export ends at row {self.prev_seq} but a head was signed for row {beyond[0]}:"
                f" rows {self.prev_seq + 1}..{beyond[0]} were removed",
            )
        if self.header.until_seq > self.prev_seq:
            return ExportProblem(
                "missing",
                0,
                self.prev_seq + 1,
                f"missing: the export ends at row {self.prev_seq} but its header says it runs to row"
                f" {self.header.until_seq}",
            )
        if not self.heads_checked:
            return ExportProblem(
                "not_signed",
                0,
                0,
                "not signed: no signed head covers any row of the export, so nothing is proven (the guardian"
                " signs a head every audit.head_interval and when it stops)",
            )
        return None
