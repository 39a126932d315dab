"""What the pipeline knows of one request (who, when, acting on what), and the shape of a dispatch row.

A :class:`Rule` is one row of the dispatch table (guardian/service/rules.py): what
an RPC needs before its handler runs, and the handler it names. A handler is a plain
function of the guardian, the :class:`Call`, the checked request and the transaction
it runs in; it returns the response. The work's data travels as the checked request
(the value the rule's ``check`` made of the wire message), never on the Call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from google.protobuf.message import Message

from guardian.access.admins import Role
from guardian.access.identity import SignedBy
from guardian.access.oauth import OAuthGrant
from guardian.access.proposals import Proposal
from guardian.checks.sessions import Session
from guardian.policy.compile import Policy, Profile
from guardian.state.core import GuardianCore
from guardian.state.profile import StageClock
from guardian.store.database import Connection
from guardian.store.memories import Draft, Scope
from shared.errors import InternalError
from shared.trace import TraceContext

__all__ = [
    "AfterCommit",
    "Call",
    "Check",
    "Handler",
    "HandlerAlone",
    "Malformed",
    "RateKind",
    "Rule",
    "Writes",
    "as_sent",
]

RateKind = Literal["read", "write", "open"]

#: The shape stage of one RPC: the wire message checked (InvalidArgument naming the field
#: otherwise) and made into the value its handler takes. It may read, never write.
Check = Callable[[GuardianCore, "Call", Any], Any]
#: The work of one RPC inside the transaction that also holds its audit row.
Handler = Callable[[GuardianCore, "Call", Any, Connection], Message]
#: The work of one RPC that takes the writer or a reader itself, step by step (Rule.runs_alone).
HandlerAlone = Callable[[GuardianCore, "Call", Any], Message]
#: What follows once the transaction committed (putting a recorded policy in force).
AfterCommit = Callable[[GuardianCore, "Call", Any, Any], None]


def as_sent(core: GuardianCore, call: Call, request: Any) -> Any:
    """The check of an RPC whose handler takes the wire message as it is (its fields are checked there)."""
    return request


@dataclass(frozen=True)
class Rule:
    """What one RPC needs before its handler runs, and the handler."""

    #: The name the audit trail records.
    audit_operation: str
    #: The policy operation a profile must grant; None for session management and admin calls.
    policy_operation: str | None = None
    #: Whether the request must name a live session.
    needs_session: bool = False
    #: The work, inside the transaction that writes the request's audit row.
    handle: Handler | None = None
    #: Or: the work outside any transaction, taking what it needs itself, step by step
    #: (backups, key rotation, re-signing): it must never hold the writer for long. Each
    #: step that changes the database writes its own audit row with it; the request's row
    #: follows when the work is done.
    handle_alone: HandlerAlone | None = None
    #: The shape stage: the request checked into what the handler takes.
    check: Check = as_sent
    #: Run once the transaction has committed.
    after_commit: AfterCommit | None = None
    #: Which rate-limit buckets it draws from; None: not rate limited (admin calls).
    rate: RateKind | None = None
    #: Whether the session stage authenticates an agent token instead (OpenSession).
    authenticates: bool = False
    #: Whether the request adds data: refused (retryably) while the disk is nearly full.
    grows_data: bool = False
    #: Whether the request may carry an idempotency key (guardian/store/idempotency.py).
    keyed: bool = False
    #: The least admin role that may make the request (guardian/access/admins.py); None for agent RPCs.
    role: Role | None = None
    #: Whether the policy may put it under the two-person rule (guardian/access/proposals.py).
    two_person: bool = False

    def __post_init__(self) -> None:
        if (self.handle is None) == (self.handle_alone is None):
            raise ValueError(f"{self.audit_operation}: a rule names one handler, in a transaction or alone")

    @property
    def admin_operation(self) -> str:
        """The operation's name in the policy's administration section (its audit name without "admin.")."""
        return self.audit_operation.removeprefix("admin.")

    @property
    def runs_alone(self) -> bool:
        """Whether the work runs outside any transaction (see handle_alone)."""
        return self.handle_alone is not None


#: Why a request is Malformed, when it is not its bytes.
MALFORMED_BYTES: Final = "the request is malformed (e.g. text that is not valid UTF-8)"


@dataclass(frozen=True)
class Malformed:
    """Stands for a request that did not arrive as one message of its type (refused as INVALID_ARGUMENT)."""

    data: bytes = field(repr=False)
    #: What was wrong, safe to show the caller.
    reason: str = MALFORMED_BYTES


@dataclass(frozen=True)
class Writes:
    """A write request, checked: what the content stage filters and the handler stores."""

    drafts: tuple[Draft, ...]
    #: For an update: which draft fields it changes (only those are filtered and written); None: all.
    changed: frozenset[str] | None = None
    #: For an update: the memory it changes.
    memory_id: str = ""

    @property
    def cost(self) -> int:
        """Rate-limit tokens it costs: one per memory."""
        return len(self.drafts)


@dataclass
class Call:
    """Who makes one request and when; and, for its audit row, what it acts on."""

    method: str
    policy: Policy
    now_ms: int
    #: The agent (or the admin, as "@admin:NAME"); "" until the session stage knows it.
    agent: str = ""
    session: Session | None = None
    #: An admin request's signer, once its signature is checked.
    signed_by: SignedBy | None = None
    #: An admin request's key fingerprint, as claimed (then proven): the audit row's session column.
    session_label: str = ""
    #: For an approval: the proposal whose request runs, proposed by another person.
    approval: Proposal | None = None
    #: For an OpenSession with an OAuth access token: what the token grants (guardian/access/oauth.py).
    oauth: OAuthGrant | None = None
    #: The W3C trace id the request belongs to (shared/trace.py): the gateway's, or one started here.
    trace: str = ""
    #: The caller's span in that trace, when it sent a valid traceparent: the parent of this request's span.
    trace_parent: TraceContext | None = None
    profile: Profile | None = None
    scope: Scope | None = None
    #: The object acted on, for the audit row: named by the check or the handler when known.
    object_id: str = ""
    #: The audit row's keyed digest of the request bytes.
    args_digest: str = ""
    #: A read's memories: those it returned (and of them, those labelled), and those the caller's profile
    #: withheld at their trust level.
    recalled: tuple[str, ...] = ()
    labelled: tuple[str, ...] = ()
    withheld: tuple[str, ...] = ()
    #: Where this request's CPU goes, by stage, when profiling is on (guardian/state/profile.py).
    clock: StageClock = field(default_factory=lambda: StageClock(enabled=False))

    @property
    def required_session(self) -> Session:
        """The resolved session (the rule guarantees one before a handler runs)."""
        if self.session is None:
            raise InternalError()
        return self.session

    @property
    def required_profile(self) -> Profile:
        """The resolved profile."""
        if self.profile is None:
            raise InternalError()
        return self.profile

    @property
    def required_scope(self) -> Scope:
        """The namespaces and read window of the resolved agent."""
        if self.scope is None:
            raise InternalError()
        return self.scope
