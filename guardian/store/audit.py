"""The audit trail: one chained row for every request, allowed or denied.

Rows hold who, what, which object, the decision, the reason, the policy
version and a keyed digest of the request's bytes: never memory content,
tokens or keys. A row is appended inside the transaction of the change it
records, so no change exists without its row; if the row cannot be written
the request fails (fail closed). The table refuses UPDATE and DELETE
(triggers), and every row is chained to the one before it::

    mac(row) = HMAC-SHA256(audit_key[row.key_id], canonical(row) || prev_mac)

where ``prev_mac`` is the previous row's mac as 64 lowercase hex ASCII
characters (64 zeros before row 1), and ``mac`` is stored the same way.

The canonical form, version 1 (NEVER CHANGE IT: every row ever written is
verified against it; a new form needs a new version tag and a new column; it
lives in guardian/keys/audit_proof.py, which an offline verifier imports too)::

    canonical(row) = b"agent-guardian audit v1\\n"
                     || ns(seq) || ns(ts_ms) || ns(agent) || ns(session)
                     || ns(operation) || ns(object_id) || ns(decision)
                     || ns(reason) || ns(policy_version) || ns(args_digest)
                     || ns(key_id)
    ns(value)      = ascii(len(b)) || b":" || b || b","      (a netstring)
                     where b = UTF-8 of str(value), integers in decimal

Version 2 (column ``trace``, schema 9) is the same eleven fields and then ``ns(trace)``, after
the tag ``b"agent-guardian audit v2\n"``; it seals every row that has a trace id (the
request's W3C trace, shared/trace.py), and a row without one ('', every row from before) is
in version 1.

So a changed field, a deleted, inserted or reordered row, a truncated head
and a chain rebuilt without the audit key are each caught by :func:`verify`,
which names the first row that does not hold. A truncated *tail* leaves a
valid shorter chain; that is why the head (sequence and mac) is published
outside the database at an interval (the security log and a head file), and
:func:`verify` checks the chain still holds every published head.

Only the audit key's holder can check a mac. For everyone else the rows also
form a public hash chain (``link``, guardian/keys/audit_proof.py), and each time
the head is published the guardian signs it with its Ed25519 audit-signing key
(:meth:`AuditTrail.prepare_signed_head`): the link at that row, continued from the
previous signed head, stored in ``audit_signed_heads`` (append-only). A head is
signed only over rows whose macs verify. Once a signed head covers every row an
audit key sealed, that key may be retired: :func:`verify` then proves those rows
through the public chain and the signed head instead of their macs.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from guardian.files.durable import replace_atomically
from guardian.keys.audit_proof import GENESIS_LINK, ROW_FIELDS, SignedHead, canonical_row, head_message, next_link
from guardian.keys.ring import KeyRing
from guardian.keys.signing import SigningRing
from guardian.store.database import Connection
from shared.errors import DataLoss, InvalidArgument

__all__ = [
    "MAX_SEQ",
    "AuditQuery",
    "AuditRecord",
    "AuditRow",
    "AuditTrail",
    "ChainHead",
    "Decision",
    "HeadFile",
    "SigningKeyUse",
    "VerifyReport",
    "canonical",
    "export_page",
    "last_signed_head",
    "link_at",
    "publish_head",
    "query",
    "read_head",
    "sealed_since_last_signed_head",
    "signed_heads",
    "signing_key_use",
    "store_signed_head",
]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

Decision = Literal["allow", "deny", "error", "alert"]
DECISIONS: Final = frozenset({"allow", "deny", "error", "alert"})
_MAX_FIELD: Final = 200
_GENESIS_MAC: Final = "0" * 64
_ARGS_DIGEST_LABEL: Final = b"agent-guardian audit args digest v1"
_COLUMNS: Final = (
    "seq, ts_ms, agent, session, operation, object_id, decision, reason, policy_version, args_digest, key_id, mac,"
    " trace"
)
_VERIFY_BATCH: Final = 2000
#: The largest sequence number or time SQLite stores (a signed 64-bit integer).
MAX_SEQ: Final = 2**63 - 1


@dataclass(frozen=True)
class AuditRecord:
    """What one request did (the fields a caller supplies)."""

    ts_ms: int
    agent: str
    session: str
    operation: str
    object_id: str
    decision: Decision
    reason: str
    policy_version: str
    #: HMAC of the request's bytes under a key derived from the audit key; "" when there were none.
    args_digest: str = ""
    #: The request's W3C trace id (32 lowercase hex digits), "" for none.
    trace: str = ""


@dataclass(frozen=True)
class AuditRow:
    """One stored row: the record plus its place and seal in the chain."""

    seq: int
    ts_ms: int
    agent: str
    session: str
    operation: str
    object_id: str
    decision: str
    reason: str
    policy_version: str
    args_digest: str
    key_id: str
    mac: str
    #: The request's W3C trace id, "" for none (and for every row written before traces were).
    trace: str = ""

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready mapping (the export format)."""
        return dict(vars(self))


@dataclass(frozen=True)
class ChainHead:
    """The chain's last row: its sequence number and mac."""

    seq: int
    mac: str


def canonical(row: AuditRow) -> bytes:
    """The bytes a row's mac covers (before prev_mac): canonical form v1, or v2 for a row with a trace."""
    return canonical_row(_values(row)[: len(ROW_FIELDS)], row.trace)  # the columns before the mac, in order


@dataclass(frozen=True)
class AuditQuery:
    """Which rows to read: every filter is optional; rows come in sequence order."""

    agent: str = ""
    #: An exact operation, or a prefix ending in ``*`` (``memory.*``).
    operation: str = ""
    decision: str = ""
    since_ms: int = 0
    #: Exclusive upper bound on ts_ms; 0: none.
    until_ms: int = 0
    #: Only rows after this sequence number (a cursor).
    after_seq: int = 0
    limit: int = 100
    #: The newest matching rows (still returned oldest first).
    newest_first: bool = False
    #: Leave out the rows of audit reads themselves (so following the tail does not show itself).
    exclude_audit_reads: bool = False

    def __post_init__(self) -> None:
        if self.decision and self.decision not in DECISIONS:
            raise InvalidArgument(f"decision must be one of {', '.join(sorted(DECISIONS))}")
        if not 1 <= self.limit <= 1000:
            raise InvalidArgument("limit must be between 1 and 1000")
        if not all(0 <= value <= MAX_SEQ for value in (self.since_ms, self.until_ms, self.after_seq)):
            raise InvalidArgument(f"times and sequence numbers must be between 0 and {MAX_SEQ}")
        if "*" in self.operation.rstrip("*") or len(self.operation) > _MAX_FIELD:
            raise InvalidArgument("operation must be a name, or a prefix ending in '*' such as memory.*")

    def sql(self) -> tuple[str, list[Any]]:
        """The parameterised query."""
        where: list[str] = ["seq > ?"]
        params: list[Any] = [self.after_seq]
        if self.agent:
            where.append("agent = ?")
            params.append(self.agent)
        if self.operation.endswith("*"):
            prefix = self.operation.rstrip("*")
            where.append("substr(operation, 1, ?) = ?")
            params += [len(prefix), prefix]
        elif self.operation:
            where.append("operation = ?")
            params.append(self.operation)
        if self.decision:
            where.append("decision = ?")
            params.append(self.decision)
        if self.since_ms:
            where.append("ts_ms >= ?")
            params.append(self.since_ms)
        if self.until_ms:
            where.append("ts_ms < ?")
            params.append(self.until_ms)
        if self.exclude_audit_reads:
            where.append("operation NOT IN ('admin.audit.query', 'admin.audit.verify')")
        order = "DESC" if self.newest_first else "ASC"
        sql = f"SELECT {_COLUMNS} FROM audit WHERE {' AND '.join(where)} ORDER BY seq {order} LIMIT ?"  # noqa: S608 (fixed fragments only)
        return sql, [*params, self.limit]


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of walking the chain."""

    rows_checked: int
    head: ChainHead | None
    #: The first row that does not hold; 0 when the chain is intact.
    first_bad_seq: int = 0
    #: What is wrong, for a person; "" when intact.
    problem: str = ""
    #: The newest published head that was checked against the chain.
    last_published: ChainHead | None = None
    #: The last row a signed head that verified covers; 0: none.
    last_signed: int = 0

    @property
    def intact(self) -> bool:
        """Whether every row, every published head and every signed head held."""
        return not self.problem


class AuditTrail:
    """Appends, reads and verifies the chain with the audit key ring."""

    def __init__(
        self, ring: KeyRing, on_failure: Callable[[], None] | None = None, signing: SigningRing | None = None
    ) -> None:
        #: The audit key ring in use: rows are sealed with its primary and verified with any key.
        self.ring = ring
        #: The audit-signing keys: the primary signs heads, every version's public key verifies them.
        self.signing = signing or SigningRing()
        self._on_failure = on_failure
        #: Whether the most recent append failed (readiness reports it until one succeeds).
        self.last_append_failed = False

    def use_ring(self, ring: KeyRing, signing: SigningRing | None = None) -> None:
        """Seal new rows with ring's primary from now on (a key rotation); every key still verifies.

        signing, when given, replaces the audit-signing keys the same way.
        """
        self.ring = ring
        if signing is not None:
            self.signing = signing

    def args_digest(self, request_bytes: bytes) -> str:
        """A keyed digest of a request's bytes: proves which request was made without holding it."""
        key = hmac.new(self.ring.primary, _ARGS_DIGEST_LABEL, "sha256").digest()
        return hmac.new(key, request_bytes, "sha256").hexdigest()[:32]

    def record(
        self,
        connection: Connection,
        *,
        ts_ms: int,
        agent: str,
        operation: str,
        decision: Decision,
        reason: str,
        policy_version: str,
        session: str = "",
        object_id: str = "",
        args_digest: str = "",
        trace: str = "",
    ) -> ChainHead:
        """Write one audit row, chained to the current head, inside the caller's write transaction.

        The one writer of audit rows: requests allowed or denied, admin actions, maintenance, a
        restore. reason is what decided (no content, token or secret); object_id the ids acted on.
        """
        return self.append(
            connection,
            AuditRecord(
                ts_ms, agent, session, operation, object_id, decision, reason, policy_version, args_digest, trace
            ),
        )

    def append(self, connection: Connection, record: AuditRecord) -> ChainHead:
        """Append a record made earlier (rows from before the chain); :meth:`record` for a new row."""
        try:
            head = self._append(connection, record)
        except Exception:
            self.last_append_failed = True
            if self._on_failure is not None:
                self._on_failure()
            raise
        self.last_append_failed = False
        return head

    def _append(self, connection: Connection, record: AuditRecord) -> ChainHead:
        head = read_head(connection)
        seq = head.seq + 1 if head else 1
        prev_mac = head.mac if head else _GENESIS_MAC
        row = AuditRow(
            seq=seq,
            ts_ms=record.ts_ms,
            agent=record.agent[:_MAX_FIELD],
            session=record.session[:_MAX_FIELD],
            operation=record.operation[:_MAX_FIELD],
            object_id=record.object_id[: _MAX_FIELD * 10],
            decision=record.decision,
            reason=record.reason[:_MAX_FIELD],
            policy_version=record.policy_version[:_MAX_FIELD],
            args_digest=record.args_digest,
            key_id=self.ring.primary_id,
            mac="",
            trace=record.trace,
        )
        _, mac = self.ring.sign(canonical(row) + prev_mac.encode("ascii"))
        connection.execute(
            f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 (constant)
            (*_values(row)[: len(ROW_FIELDS)], mac, row.trace),
        )
        return ChainHead(seq, mac)

    def adopt_unchained_rows(self, connection: Connection) -> int:
        """Move rows written before the chain existed (schema 2) into it, oldest first; how many.

        Their args_digest is "" (never recorded). Runs once, in the caller's transaction,
        after which the old table is gone.
        """
        exists = connection.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_unchained'"
        ).fetchone()
        if not exists:
            return 0
        rows = connection.execute(
            "SELECT ts_ms, agent, session, operation, object_id, decision, reason, policy_version"
            " FROM audit_unchained ORDER BY seq"
        ).fetchall()
        for values in rows:
            self.append(connection, AuditRecord(*values))
        connection.execute("DROP TABLE audit_unchained")
        return len(rows)

    def verify(self, connection: Connection, published: Iterable[ChainHead] = ()) -> VerifyReport:
        """Walk the whole chain; the first row that does not hold, or a published or signed head it lost.

        A row sealed with an audit key the ring no longer holds (a retired one) is proven by the
        signed head that covers it: the public chain up to that head must give the signed link.
        """
        expected = {head.seq: head.mac for head in published}
        last_published = ChainHead(max(expected), expected[max(expected)]) if expected else None
        signed = {head.seq: head for head in signed_heads(connection)}
        last_signed_seq = max(signed, default=0)
        checked, proven = 0, 0
        prev = ChainHead(0, _GENESIS_MAC)
        link = GENESIS_LINK
        #: The first row since the last signed head whose mac could not be checked (its key is retired).
        unchecked_from = 0

        def broken(seq: int, problem: str) -> VerifyReport:
            return VerifyReport(checked, prev if prev.seq else None, seq, problem, last_published, proven)

        for row in _all_rows(connection):
            if row.seq != prev.seq + 1:
                return broken(
                    row.seq,
                    f"row {prev.seq + 1} is missing: row {row.seq} follows row {prev.seq}"
                    if row.seq > prev.seq + 1
                    else f"row {row.seq} is out of order: it follows row {prev.seq}",
                )
            if row.key_id in self.ring.keys:
                if not self.ring.verify(row.key_id, canonical(row) + prev.mac.encode("ascii"), row.mac):
                    return broken(
                        row.seq,
                        f"row {row.seq} does not match its mac: it was changed, or the chain was rebuilt"
                        " without the audit key",
                    )
            elif row.seq <= last_signed_seq:
                unchecked_from = unchecked_from or row.seq
            else:
                return broken(
                    row.seq,
                    f"row {row.seq} names an audit key id the guardian does not hold, and no signed head covers it",
                )
            published_mac = expected.get(row.seq)
            if published_mac is not None and not hmac.compare_digest(published_mac, row.mac):
                return broken(row.seq, f"row {row.seq} differs from the head published for it: the chain was rewritten")
            link = next_link(canonical(row), row.mac, link)
            signed_here = signed.get(row.seq)
            if signed_here is not None:
                problem, first_bad = self._check_signed_head(signed_here, link, unchecked_from)
                if problem:
                    return broken(first_bad, problem)
                unchecked_from, proven = 0, row.seq
            checked += 1
            prev = ChainHead(row.seq, row.mac)
        head = prev if prev.seq else None
        if last_published is not None and last_published.seq > prev.seq:
            return broken(
                prev.seq + 1,
                f"the chain ends at row {prev.seq} but row {last_published.seq} was published:"
                " rows were truncated or the database was rolled back",
            )
        if last_signed_seq > prev.seq:
            return broken(
                prev.seq + 1,
                f"the chain ends at row {prev.seq} but a head was signed for row {last_signed_seq}:"
                " rows were truncated or the database was rolled back",
            )
        return VerifyReport(checked, head, last_published=last_published, last_signed=proven)

    def _check_signed_head(self, head: SignedHead, link: str, unchecked_from: int) -> tuple[str, int]:
        """What is wrong with a signed head, given the chain's link at its row ("" if nothing), and where."""
        public = self.signing.public_keys().get(head.key_id)
        if public is None:
            return (
                f"the head signed for row {head.seq} names audit-signing key {head.key_id[:40]!r},"
                " which the guardian does not hold",
                head.seq,
            )
        if not hmac.compare_digest(head.link, link):
            if unchecked_from:
                return (
                    f"rows {unchecked_from}..{head.seq} (sealed with a retired audit key) do not match the head"
                    f" signed for row {head.seq}: one of them was changed",
                    unchecked_from,
                )
            return (
                f"the head signed for row {head.seq} does not match the chain: the head was changed, or rows"
                " were rewritten with the audit key",
                head.seq,
            )
        if not head.verifies_with(public):
            return (
                f"the head signed for row {head.seq} has a signature that does not verify: forged or changed",
                head.seq,
            )
        return "", 0

    def prepare_signed_head(
        self, connection: Connection, now_ms: int, max_rows: int | None = None
    ) -> tuple[SignedHead, ChainHead] | None:
        """A signed head over the committed chain, continuing the last signed one; None if nothing is new.

        Every row it newly covers is checked first (its place and its mac): a head vouches only
        for rows that verify, so a break raises DataLoss naming the row, and nothing is signed.
        Reads only (the caller stores the head with :func:`store_signed_head`, in a short write);
        with max_rows, None instead when more rows than that wait (a shutdown must not take long).
        Returns the head and the chain head (sequence and mac) it was signed at.
        """
        signing = self.signing
        last = last_signed_head(connection)
        head = read_head(connection)
        start = last.seq if last else 0
        if head is None or head.seq == start or (max_rows is not None and head.seq - start > max_rows):
            return None
        if head.seq < start:
            raise DataLoss(
                f"the chain ends at row {head.seq} but a head was signed for row {start}: rows were truncated"
                " or the database was rolled back (guardianctl audit verify)"
            )
        link = last.link if last else GENESIS_LINK
        prev = ChainHead(0, _GENESIS_MAC)
        if last is not None:
            found = connection.execute("SELECT mac FROM audit WHERE seq = ?", (start,)).fetchone()
            if found is None:
                raise DataLoss(f"row {start}, where the last head was signed, is missing (guardianctl audit verify)")
            prev = ChainHead(start, str(found[0]))
        for row in _all_rows(connection, after=start, through=head.seq):
            if row.seq != prev.seq + 1:
                raise DataLoss(f"row {prev.seq + 1} is missing; no head is signed over it (guardianctl audit verify)")
            if not self.ring.verify(row.key_id, canonical(row) + prev.mac.encode("ascii"), row.mac):
                raise DataLoss(
                    f"row {row.seq} does not match its mac (or names a key the guardian does not hold); no head is"
                    " signed over it (guardianctl audit verify)"
                )
            link = next_link(canonical(row), row.mac, link)
            prev = ChainHead(row.seq, row.mac)
        if prev.seq != head.seq:
            raise DataLoss(f"row {prev.seq + 1} is missing; no head is signed over it (guardianctl audit verify)")
        key_id = signing.primary_id
        _, signature = signing.sign(head_message(head.seq, now_ms, link, key_id))
        return SignedHead(head.seq, now_ms, link, key_id, signature), prev


def store_signed_head(connection: Connection, head: SignedHead) -> bool:
    """Append a signed head (in the caller's write transaction) unless one at or past its row exists; whether it did.

    A head's link depends only on the rows, so a head prepared from an older signed head is
    as valid as one prepared from the newest.
    """
    last = last_signed_head(connection)
    if last is not None and last.seq >= head.seq:
        return False
    connection.execute(
        "INSERT INTO audit_signed_heads (seq, ts_ms, link, key_id, signature) VALUES (?, ?, ?, ?, ?)",
        (head.seq, head.ts_ms, head.link, head.key_id, head.signature),
    )
    return True


def _has_signed_heads(connection: Connection) -> bool:
    """Whether the database has the signed heads table (a backup made before schema 8 has not)."""
    found = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_signed_heads'"
    ).fetchone()
    return found is not None


def _signed_head(values: Any) -> SignedHead:
    return SignedHead(int(values[0]), int(values[1]), str(values[2]), str(values[3]), str(values[4]))


def signed_heads(connection: Connection, after_seq: int = 0, through_seq: int = MAX_SEQ) -> list[SignedHead]:
    """The signed heads for rows after after_seq up to through_seq, in order."""
    if not _has_signed_heads(connection):
        return []
    rows = connection.execute(
        "SELECT seq, ts_ms, link, key_id, signature FROM audit_signed_heads WHERE seq > ? AND seq <= ? ORDER BY seq",
        (after_seq, through_seq),
    ).fetchall()
    return [_signed_head(values) for values in rows]


def last_signed_head(connection: Connection, through_seq: int = MAX_SEQ) -> SignedHead | None:
    """The newest signed head at or before through_seq, or None."""
    if not _has_signed_heads(connection):
        return None
    found = connection.execute(
        "SELECT seq, ts_ms, link, key_id, signature FROM audit_signed_heads WHERE seq <= ? ORDER BY seq DESC LIMIT 1",
        (through_seq,),
    ).fetchone()
    return _signed_head(found) if found else None


def link_at(connection: Connection, seq: int) -> str:
    """The public chain's link after row seq, continued from the nearest signed head before it."""
    start = last_signed_head(connection, seq)
    link = start.link if start else GENESIS_LINK
    for row in _all_rows(connection, after=start.seq if start else 0, through=seq):
        link = next_link(canonical(row), row.mac, link)
    return link


def export_page(
    connection: Connection, after_seq: int, through_seq: int, limit: int, start_link: str
) -> tuple[list[tuple[AuditRow, str]], list[SignedHead]]:
    """Up to limit rows after after_seq (to through_seq), each with its link from start_link; and their signed heads."""
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM audit WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",  # noqa: S608 (constant)
        (after_seq, through_seq, limit),
    ).fetchall()
    page: list[tuple[AuditRow, str]] = []
    link = start_link
    for values in rows:
        row = _row(values)
        link = next_link(canonical(row), row.mac, link)
        page.append((row, link))
    heads = signed_heads(connection, after_seq, page[-1][0].seq) if page else []
    return page, heads


@dataclass(frozen=True)
class SigningKeyUse:
    """What one audit-signing key signed: how many heads, for which rows, when."""

    heads: int
    first_seq: int
    last_seq: int
    first_ts_ms: int
    last_ts_ms: int


def signing_key_use(connection: Connection) -> dict[str, SigningKeyUse]:
    """Per audit-signing key id, the heads it signed."""
    rows = connection.execute(
        "SELECT key_id, count(*), min(seq), max(seq), min(ts_ms), max(ts_ms) FROM audit_signed_heads GROUP BY key_id"
    ).fetchall()
    return {str(key_id): SigningKeyUse(*(int(value) for value in rest)) for key_id, *rest in rows}


def sealed_since_last_signed_head(connection: Connection, key_id: str) -> tuple[int, int]:
    """(rows sealed with audit key key_id that no signed head covers, the last row a signed head covers)."""
    last = last_signed_head(connection)
    covered = last.seq if last else 0
    found = connection.execute("SELECT count(*) FROM audit WHERE seq > ? AND key_id = ?", (covered, key_id)).fetchone()
    return int(found[0]), covered


def read_head(connection: Connection) -> ChainHead | None:
    """The chain's last row, or None when the trail is empty."""
    row = connection.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return ChainHead(int(row[0]), str(row[1])) if row else None


def query(connection: Connection, audit_query: AuditQuery) -> list[AuditRow]:
    """The rows matching audit_query, oldest first."""
    sql, params = audit_query.sql()
    rows = [_row(values) for values in connection.execute(sql, params).fetchall()]
    return sorted(rows, key=lambda row: row.seq) if audit_query.newest_first else rows


def _all_rows(connection: Connection, after: int = 0, through: int = MAX_SEQ) -> Iterator[AuditRow]:
    while True:
        batch = connection.execute(
            f"SELECT {_COLUMNS} FROM audit WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",  # noqa: S608 (constant)
            (after, through, _VERIFY_BATCH),
        ).fetchall()
        if not batch:
            return
        for values in batch:
            yield _row(values)
        after = int(batch[-1][0])


def _row(values: Any) -> AuditRow:
    return AuditRow(
        seq=int(values[0]),
        ts_ms=int(values[1]),
        agent=str(values[2]),
        session=str(values[3]),
        operation=str(values[4]),
        object_id=str(values[5]),
        decision=str(values[6]),
        reason=str(values[7]),
        policy_version=str(values[8]),
        args_digest=str(values[9]),
        key_id=str(values[10]),
        mac=str(values[11]),
        trace=str(values[12]),
    )


def _values(row: AuditRow) -> tuple[Any, ...]:
    # Column order, which is also the canonical form's field order: never reorder.
    return (
        row.seq,
        row.ts_ms,
        row.agent,
        row.session,
        row.operation,
        row.object_id,
        row.decision,
        row.reason,
        row.policy_version,
        row.args_digest,
        row.key_id,
        row.mac,
        row.trace,
    )


class HeadFile:
    """The last published chain head, kept outside the database (``audit-head.json`` in the state dir).

    Written atomically (temporary file, fsync, rename), so it always holds a
    whole head. Together with the security log's ``audit_chain_head`` lines it
    lets :func:`AuditTrail.verify` notice a chain that lost published rows.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> ChainHead | None:
        """The last head written, or None (no file yet, or unreadable: logged)."""
        try:
            data = json.loads(self.path.read_text())
            return ChainHead(int(data["seq"]), str(data["mac"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            security_log.error(
                "the published audit head file cannot be read", extra={"event": "audit_head_file_unreadable"}
            )
            return None

    def write(self, head: ChainHead) -> None:
        """Replace the file with head."""
        replace_atomically(self.path, json.dumps({"seq": head.seq, "mac": head.mac}))


def publish_head(connection: Connection, head_file: HeadFile | None, reason: str) -> ChainHead | None:
    """Write the committed head to the security log and, unless None, the head file (interval and shutdown).

    The log line also names the last signed head (its row, link and key id), so the public
    chain's progress is on record outside the database too.
    """
    head = read_head(connection)
    if head is None:
        return None
    signed = last_signed_head(connection)
    security_log.info(
        "audit chain head",
        extra={
            "event": "audit_chain_head",
            "seq": head.seq,
            "mac": head.mac,
            "published_because": reason,
            "signed_seq": signed.seq if signed else 0,
            "link": signed.link if signed else "",
            "signing_key_id": signed.key_id if signed else "",
        },
    )
    if head_file is not None:
        head_file.write(head)
    return head
