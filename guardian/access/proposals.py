"""The two-person rule: an operation one person proposes and a different person approves.

The policy's ``administration.two_person`` names the operations it covers (from
:data:`TWO_PERSON_OPERATIONS`). Such a request, sent alone, is refused; sent as a
proposal, it is kept here exactly as signed (the proposer's request bytes and
signature), until a second person approves it, it expires, or it is cancelled.
The approval runs the request as proposed, and its audit row names both people.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Final, Literal

from guardian.store.database import Connection
from shared.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "TWO_PERSON_OPERATIONS",
    "Proposal",
    "ProposalState",
    "Signature",
    "TwoPersonRule",
    "check_id",
    "create",
    "decide",
    "find",
    "listing",
]

#: The operations the two-person rule may cover (their audit names without "admin.").
TWO_PERSON_OPERATIONS: Final = frozenset(
    {
        "policy.apply",
        "policy.rollback",
        "keys.rotate",
        "keys.retire",
        "agent.add",
        "agent.revoke",
        "quarantine.release",
        "incident.close",
        "admins.add",
        "admins.remove",
    }
)
#: The longest a proposal may stay open.
MAX_PROPOSAL_TTL_MS: Final = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class TwoPersonRule:
    """The policy's ``administration`` section: which operations need a second person, and for how long a
    proposal waits for one."""

    operations: frozenset[str] = frozenset()
    proposals_expire_ms: int = 24 * 3600 * 1000

    def covers(self, operation: str) -> bool:
        """Whether operation (an audit name without "admin.") needs a second person."""
        return operation in self.operations


ProposalState = Literal["open", "approved", "expired", "cancelled"]
_ID_PREFIX: Final = "prop_"
_COLUMNS: Final = (
    "id, method, operation, request, proposed_by, proposal_auth, proposed_at_ms, expires_at_ms, state,"
    " decided_by, decision_auth, decided_at_ms"
)


@dataclass(frozen=True)
class Signature:
    """One person's signature of one request: enough to verify it again later (guardian/access/signed_request.py)."""

    fingerprint: str
    timestamp_ms: int
    nonce: str
    #: The SSHSIG blob, base64.
    sshsig: str
    #: The signed request's bytes, base64 (the proposal's own bytes are in Proposal.request).
    request: str = ""
    #: The method path it was sent to (part of the signed message).
    method: str = ""

    def to_json(self) -> str:
        return json.dumps(vars(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Signature | None:
        return cls(**json.loads(text)) if text else None


@dataclass(frozen=True)
class Proposal:
    """One proposed operation and what became of it."""

    id: str
    #: The AdminService method and the audit operation it runs.
    method: str
    operation: str
    #: The request as the proposer signed it (a ProposeRequest's bytes).
    request: bytes
    proposed_by: str
    proposal_signature: Signature
    proposed_at_ms: int
    expires_at_ms: int
    state: ProposalState
    decided_by: str = ""
    decision_signature: Signature | None = None
    decided_at_ms: int = 0

    def state_at(self, now_ms: int) -> ProposalState:
        """The state as of now_ms: an open proposal past its time has expired."""
        return "expired" if self.state == "open" and now_ms >= self.expires_at_ms else self.state


def check_id(value: str) -> str:
    """value as a proposal id; InvalidArgument otherwise."""
    if not value.startswith(_ID_PREFIX) or len(value) != len(_ID_PREFIX) + 16 or not value[5:].isalnum():
        raise InvalidArgument("id: a proposal id is 'prop_' and 16 letters or digits (see guardianctl proposals list)")
    return value


def _proposal(row: Any) -> Proposal:
    (id_, method, operation, request, by, auth, at_ms, expires, state, decided_by, decision, decided_at) = row
    signature = Signature.from_json(auth)
    assert signature is not None
    return Proposal(
        id_,
        method,
        operation,
        bytes(request),
        by,
        signature,
        at_ms,
        expires,
        state,
        decided_by,
        Signature.from_json(decision),
        decided_at,
    )


def create(
    connection: Connection,
    *,
    method: str,
    operation: str,
    request: bytes,
    proposed_by: str,
    signature: Signature,
    now_ms: int,
    expires_at_ms: int,
) -> Proposal:
    """Record a new open proposal; it."""
    proposal = Proposal(
        _ID_PREFIX + secrets.token_hex(8),
        method,
        operation,
        request,
        proposed_by,
        signature,
        now_ms,
        expires_at_ms,
        "open",
    )
    connection.execute(
        "INSERT INTO proposals (id, method, operation, request, proposed_by, proposal_auth, proposed_at_ms,"
        " expires_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            proposal.id,
            method,
            operation,
            request,
            proposed_by,
            signature.to_json(),
            now_ms,
            expires_at_ms,
        ),
    )
    return proposal


def find(connection: Connection, proposal_id: str) -> Proposal:
    """The proposal with that id; NotFound otherwise."""
    row = connection.execute(
        f"SELECT {_COLUMNS} FROM proposals WHERE id = ?",  # noqa: S608 (constant)
        (proposal_id,),
    ).fetchone()
    if row is None:
        raise NotFound("no proposal has that id (see guardianctl proposals list)")
    return _proposal(row)


def listing(connection: Connection, now_ms: int, open_only: bool) -> list[Proposal]:
    """Proposals, newest first: the open ones, or all."""
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM proposals ORDER BY proposed_at_ms DESC, id LIMIT 1000"  # noqa: S608 (constant)
    ).fetchall()
    found = [_proposal(row) for row in rows]
    return [proposal for proposal in found if not open_only or proposal.state_at(now_ms) == "open"]


def decide(
    connection: Connection,
    proposal: Proposal,
    state: ProposalState,
    *,
    decided_by: str,
    signature: Signature | None,
    now_ms: int,
) -> None:
    """Close an open proposal (approved, expired or cancelled); FailedPrecondition if it is no longer open."""
    cursor = connection.execute(
        "UPDATE proposals SET state = ?, decided_by = ?, decision_auth = ?, decided_at_ms = ?"
        " WHERE id = ? AND state = 'open'",
        (state, decided_by, signature.to_json() if signature else "", now_ms, proposal.id),
    )
    if cursor.rowcount != 1:
        raise FailedPrecondition(f"the proposal {proposal.id} is no longer open")
