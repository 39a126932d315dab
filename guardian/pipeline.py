"""The request pipeline and the dispatch table that is the guardian's security policy.

Every request passes the same stages, in this order, and every outcome
(allowed or denied) writes exactly one audit row:

1. session   resolve the session (idle and absolute timeouts)
2. shape     field types, sizes, counts; unknown fields refused
3. policy    is this operation granted to the agent's profile?
4. data      the handler, in one write transaction with its audit row
5. audit     the allow row shares the change's transaction; a deny row is
             written on its own; if either cannot be written the request fails

A method missing from :data:`AGENT_RULES` or :data:`ADMIN_RULES` is never served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from guardian import audit
from guardian.core import GuardianCore, now_ms, session_ref
from guardian.database import Connection
from guardian.policy import Policy, Profile
from guardian.sessions import Session
from guardian.shape import check_known_fields
from guardian.status import abort_with
from shared.errors import GuardianError, InternalError, InvalidArgument, PermissionDenied

__all__ = ["ADMIN_CALLER", "ADMIN_RULES", "AGENT_RULES", "Call", "Handler", "Malformed", "Pipeline", "Rule"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

ResponseT = TypeVar("ResponseT", bound=Message)


@dataclass(frozen=True)
class Rule:
    """What one RPC needs before its handler runs."""

    #: The name the audit trail records.
    audit_operation: str
    #: The policy operation a profile must grant; None for session management.
    policy_operation: str | None
    #: Whether the request must name a live session.
    needs_session: bool


#: The agent service's dispatch table: one row per RPC, nothing else is served.
AGENT_RULES: Final[dict[str, Rule]] = {
    "OpenSession": Rule("session.open", None, needs_session=False),
    "CloseSession": Rule("session.close", None, needs_session=True),
    "Store": Rule("memory.store", "store", needs_session=True),
    "StoreBatch": Rule("memory.store_batch", "store", needs_session=True),
    "Get": Rule("memory.get", "get", needs_session=True),
    "Search": Rule("memory.search", "search", needs_session=True),
    "List": Rule("memory.list", "list", needs_session=True),
    "Update": Rule("memory.update", "update", needs_session=True),
    "Delete": Rule("memory.delete", "delete", needs_session=True),
}

#: The admin service's dispatch table. Served only on the admin socket, whose
#: file mode and group are its access control; no admin RPC takes a session.
ADMIN_RULES: Final[dict[str, Rule]] = {
    "AddAgent": Rule("admin.agent.add", None, needs_session=False),
    "ListAgents": Rule("admin.agent.list", None, needs_session=False),
    "RevokeAgent": Rule("admin.agent.revoke", None, needs_session=False),
}

#: What the audit trail names as the caller of an admin RPC (not a valid agent name).
ADMIN_CALLER: Final = "@admin-socket"


class Malformed:
    """Stands for a request whose bytes did not parse as its message type."""


@dataclass
class Call:
    """One request as it moves through the pipeline."""

    method: str
    rule: Rule
    policy: Policy
    now_ms: int
    session: Session | None = None
    profile: Profile | None = None
    #: Filled by handlers for the audit row: the object acted on and the agent, when known.
    object_id: str = ""
    agent: str = ""

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


#: A handler validates its request's shape (raising InvalidArgument) and returns the work
#: to run inside the transaction.
Handler = Callable[[Call, Any], Callable[[Connection], ResponseT]]


class Pipeline:
    """Runs requests through the stages in order."""

    def __init__(self, core: GuardianCore, rules: dict[str, Rule], caller: str = "") -> None:
        self._core = core
        self._rules = rules
        self._caller = caller

    def run(
        self, method: str, request: Message | Malformed, context: grpc.ServicerContext, handler: Handler[Any]
    ) -> Any:
        """Serve one request; every path writes one audit row."""
        rule = self._rules[method]
        call = Call(method=method, rule=rule, policy=self._core.policy, now_ms=now_ms(), agent=self._caller)
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument("the request is malformed (e.g. text that is not valid UTF-8)")
            check_known_fields(request)
            if rule.needs_session:
                call.session = self._core.sessions.resolve(getattr(request, "session_id", ""), call.now_ms)
                call.agent = call.session.agent
                call.profile = call.policy.profile_for(call.agent)
            work = handler(call, request)
            if rule.policy_operation is not None and rule.policy_operation not in call.required_profile.operations:
                raise PermissionDenied(f"the policy does not allow this agent to {rule.policy_operation} memories")
            with self._core.database.write() as connection:
                response = work(connection)
                audit.append(connection, self._record(call, "allow", "ok"))
            return response
        except GuardianError as error:
            self._deny(call, error, context)
        except Exception:
            log.exception("unexpected error serving %s", method)
            self._deny(call, InternalError(), context)

    def refuse_unknown(self, method: str) -> None:
        """Record a call to a method this socket does not serve (the caller gets UNIMPLEMENTED)."""
        rule = Rule("rpc.unknown", None, needs_session=False)
        call = Call(method=method, rule=rule, policy=self._core.policy, now_ms=now_ms(), agent=self._caller)
        call.object_id = method[:200]
        with self._core.database.write() as connection:
            audit.append(connection, self._record(call, "deny", "unimplemented: no such method on this socket"))
        security_log.warning(
            "call to a method this socket does not serve",
            extra={"event": "unknown_method", "method": method[:200]},
        )

    def _deny(self, call: Call, error: GuardianError, context: grpc.ServicerContext) -> None:
        decision: audit.Decision = "error" if isinstance(error, InternalError) else "deny"
        reason = f"{error.kind}: {error.message}"
        try:
            with self._core.database.write() as connection:
                audit.append(connection, self._record(call, decision, reason))
        except Exception:
            log.exception("could not write the audit row of a denied %s", call.method)
            abort_with(context, InternalError())
        security_log.info(
            "request denied",
            extra={
                "event": "denied",
                "operation": call.rule.audit_operation,
                "agent": call.agent,
                "reason": error.kind,
            },
        )
        abort_with(context, error)

    def _record(self, call: Call, decision: audit.Decision, reason: str) -> audit.AuditRecord:
        return audit.AuditRecord(
            ts_ms=call.now_ms,
            agent=call.agent,
            session=session_ref(call.session.id) if call.session else "",
            operation=call.rule.audit_operation,
            object_id=call.object_id,
            decision=decision,
            reason=reason,
            policy_version=call.policy.version,
        )
