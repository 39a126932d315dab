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
verified against it; a new form needs a new version tag and a new column)::

    canonical(row) = b"agent-guardian audit v1\\n"
                     || ns(seq) || ns(ts_ms) || ns(agent) || ns(session)
                     || ns(operation) || ns(object_id) || ns(decision)
                     || ns(reason) || ns(policy_version) || ns(args_digest)
                     || ns(key_id)
    ns(value)      = ascii(len(b)) || b":" || b || b","      (a netstring)
                     where b = UTF-8 of str(value), integers in decimal

So a changed field, a deleted, inserted or reordered row, a truncated head
and a chain rebuilt without the audit key are each caught by :func:`verify`,
which names the first row that does not hold. A truncated *tail* leaves a
valid shorter chain; that is why the head (sequence and mac) is published
outside the database at an interval (the security log and a head file), and
:func:`verify` checks the chain still holds every published head.
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
from guardian.keys.ring import KeyRing
from guardian.store.database import Connection
from shared.errors import InvalidArgument

__all__ = [
    "MAX_SEQ",
    "AuditQuery",
    "AuditRecord",
    "AuditRow",
    "AuditTrail",
    "ChainHead",
    "Decision",
    "HeadFile",
    "VerifyReport",
    "canonical",
    "publish_head",
    "query",
    "read_head",
]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

Decision = Literal["allow", "deny", "error", "alert"]
DECISIONS: Final = frozenset({"allow", "deny", "error", "alert"})
_MAX_FIELD: Final = 200
_CANONICAL_TAG: Final = b"agent-guardian audit v1\n"
_GENESIS_MAC: Final = "0" * 64
_ARGS_DIGEST_LABEL: Final = b"agent-guardian audit args digest v1"
_COLUMNS: Final = (
    "seq, ts_ms, agent, session, operation, object_id, decision, reason, policy_version, args_digest, key_id, mac"
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

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready mapping (the export format)."""
        return dict(vars(self))


@dataclass(frozen=True)
class ChainHead:
    """The chain's last row: its sequence number and mac."""

    seq: int
    mac: str


def canonical(row: AuditRow) -> bytes:
    """The bytes a row's mac covers (before prev_mac), canonical form v1. Never change this."""
    parts = [_CANONICAL_TAG]
    for value in _values(row)[:-1]:  # every column but the mac itself, in column order
        data = str(value).encode("utf-8")
        parts.append(b"%d:%s," % (len(data), data))
    return b"".join(parts)


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

    @property
    def intact(self) -> bool:
        """Whether every row and every published head held."""
        return not self.problem


class AuditTrail:
    """Appends, reads and verifies the chain with the audit key ring."""

    def __init__(self, ring: KeyRing, on_failure: Callable[[], None] | None = None) -> None:
        #: The audit key ring in use: rows are sealed with its primary and verified with any key.
        self.ring = ring
        self._on_failure = on_failure
        #: Whether the most recent append failed (readiness reports it until one succeeds).
        self.last_append_failed = False

    def use_ring(self, ring: KeyRing) -> None:
        """Seal new rows with ring's primary from now on (a key rotation); every key still verifies."""
        self.ring = ring

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
    ) -> ChainHead:
        """Write one audit row, chained to the current head, inside the caller's write transaction.

        The one writer of audit rows: requests allowed or denied, admin actions, maintenance, a
        restore. reason is what decided (no content, token or secret); object_id the ids acted on.
        """
        return self.append(
            connection,
            AuditRecord(ts_ms, agent, session, operation, object_id, decision, reason, policy_version, args_digest),
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
        )
        _, mac = self.ring.sign(canonical(row) + prev_mac.encode("ascii"))
        connection.execute(
            f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 (constant)
            (*_values(row)[:-1], mac),
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
        """Walk the whole chain; the first row that does not hold, or a published head it lost."""
        expected = {head.seq: head.mac for head in published}
        last_published = ChainHead(max(expected), expected[max(expected)]) if expected else None
        checked = 0
        prev = ChainHead(0, _GENESIS_MAC)
        for row in _all_rows(connection):
            if row.seq != prev.seq + 1:
                problem = (
                    f"row {prev.seq + 1} is missing: row {row.seq} follows row {prev.seq}"
                    if row.seq > prev.seq + 1
                    else f"row {row.seq} is out of order: it follows row {prev.seq}"
                )
                return VerifyReport(checked, prev if prev.seq else None, row.seq, problem, last_published)
            if row.key_id not in self.ring.keys:
                return VerifyReport(
                    checked, prev, row.seq, f"row {row.seq} names an unknown audit key id", last_published
                )
            if not self.ring.verify(row.key_id, canonical(row) + prev.mac.encode("ascii"), row.mac):
                return VerifyReport(
                    checked,
                    prev if prev.seq else None,
                    row.seq,
                    f"row {row.seq} does not match its mac: it was changed, or the chain was rebuilt"
                    " without the audit key",
                    last_published,
                )
            published_mac = expected.get(row.seq)
            if published_mac is not None and not hmac.compare_digest(published_mac, row.mac):
                return VerifyReport(
                    checked,
                    prev,
                    row.seq,
                    f"row {row.seq} differs from the head published for it: the chain was rewritten",
                    last_published,
                )
            checked += 1
            prev = ChainHead(row.seq, row.mac)
        head = prev if prev.seq else None
        if last_published is not None and last_published.seq > prev.seq:
            return VerifyReport(
                checked,
                head,
                prev.seq + 1,
                f"the chain ends at row {prev.seq} but row {last_published.seq} was published:"
                " rows were truncated or the database was rolled back",
                last_published,
            )
        return VerifyReport(checked, head, last_published=last_published)


def read_head(connection: Connection) -> ChainHead | None:
    """The chain's last row, or None when the trail is empty."""
    row = connection.execute("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return ChainHead(int(row[0]), str(row[1])) if row else None


def query(connection: Connection, audit_query: AuditQuery) -> list[AuditRow]:
    """The rows matching audit_query, oldest first."""
    sql, params = audit_query.sql()
    rows = [_row(values) for values in connection.execute(sql, params).fetchall()]
    return sorted(rows, key=lambda row: row.seq) if audit_query.newest_first else rows


def _all_rows(connection: Connection) -> Iterator[AuditRow]:
    after = 0
    while True:
        batch = connection.execute(
            f"SELECT {_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608 (constant)
            (after, _VERIFY_BATCH),
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
    """Write the committed head to the security log and, unless None, the head file (interval and shutdown)."""
    head = read_head(connection)
    if head is None:
        return None
    security_log.info(
        "audit chain head",
        extra={"event": "audit_chain_head", "seq": head.seq, "mac": head.mac, "published_because": reason},
    )
    if head_file is not None:
        head_file.write(head)
    return head
