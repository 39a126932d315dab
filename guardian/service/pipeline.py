"""The request pipeline and the dispatch table that is the guardian's security policy.

Every request passes the same stages, in this order (DESIGN.md), and every
outcome (allowed or denied) writes exactly one audit row:

1. session   resolve the session (idle and absolute timeouts) or the token; locked out?
2. shape     field types, sizes, counts; unknown fields refused (the handler)
3. policy    is this operation granted to the agent's profile, now (allowed hours)?
4. rate      token buckets per session and per agent; a breach starts a cooldown
5. content   the policy's filters on the scan form: reject, redact, quarantine, flag;
             what is stored is what was sent (but for redactions), within every limit
6. data      the handler's work, scoped to the agent's namespaces and read window
7. integrity every row read is verified (memories.py); a mismatch is DATA_LOSS
8. audit     the allow row shares the work's transaction, reads included: every
             request is a job of the writer's group commit (a read there finds
             the page cache warm, where a separate reader's cache is reset by
             every commit); a deny row is written on its own; if any cannot be
             written the request fails
9. anomaly   sliding windows over what happened; may lock the session or agent

A method missing from :data:`AGENT_RULES` or :data:`ADMIN_RULES` is never served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, TypeVar, cast

from google.protobuf.message import Message

from guardian.checks.anomaly import AnomalyKind
from guardian.checks.sessions import Session
from guardian.policy.compile import Policy, Profile
from guardian.service import shape
from guardian.service.shape import check_known_fields
from guardian.state.core import GuardianCore, now_ms, session_ref
from guardian.store import audit, idempotency
from guardian.store.database import Connection
from guardian.store.memories import QUARANTINED, Draft, Scope
from shared.errors import (
    ContentRefused,
    GuardianError,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from shared.formats import AGENT_NAME_RE, OPERATOR_METADATA_KEY

__all__ = [
    "ADMIN_CALLER",
    "ADMIN_RULES",
    "AGENT_RULES",
    "Call",
    "Handler",
    "Malformed",
    "Pipeline",
    "Rule",
    "admin_caller",
]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

ResponseT = TypeVar("ResponseT", bound=Message)
RateKind = Literal["read", "write", "open"]


@dataclass(frozen=True)
class Rule:
    """What one RPC needs before its handler runs."""

    #: The name the audit trail records.
    audit_operation: str
    #: The policy operation a profile must grant; None for session management and admin calls.
    policy_operation: str | None
    #: Whether the request must name a live session.
    needs_session: bool
    #: Which rate-limit buckets it draws from; None: not rate limited (admin calls).
    rate: RateKind | None = None
    #: Whether the session stage authenticates an agent token instead (OpenSession).
    authenticates: bool = False
    #: Whether the handler's work runs outside any transaction and takes what it needs itself,
    #: step by step (backups, key rotation, re-signing): it must never hold the writer for
    #: long. Each step that changes the database writes its own audit row with it; the
    #: request's row follows when the work is done.
    runs_alone: bool = False
    #: Whether the request adds data: refused (retryably) while the disk is nearly full.
    grows_data: bool = False
    #: Whether the request may carry an idempotency key (guardian/store/idempotency.py).
    keyed: bool = False


#: The agent service's dispatch table: one row per RPC, nothing else is served.
AGENT_RULES: Final[dict[str, Rule]] = {
    "OpenSession": Rule("session.open", None, needs_session=False, rate="open", authenticates=True),
    "CloseSession": Rule("session.close", None, needs_session=True),
    "Store": Rule("memory.store", "store", needs_session=True, rate="write", grows_data=True, keyed=True),
    "StoreBatch": Rule("memory.store_batch", "store", needs_session=True, rate="write", grows_data=True, keyed=True),
    "Get": Rule("memory.get", "get", needs_session=True, rate="read"),
    "Search": Rule("memory.search", "search", needs_session=True, rate="read"),
    "List": Rule("memory.list", "list", needs_session=True, rate="read"),
    "Update": Rule("memory.update", "update", needs_session=True, rate="write", grows_data=True, keyed=True),
    "Delete": Rule("memory.delete", "delete", needs_session=True, rate="write", keyed=True),
}

#: The admin service's dispatch table. Served only on the admin socket, whose
#: file mode and group are its access control; no admin RPC takes a session.
ADMIN_RULES: Final[dict[str, Rule]] = {
    "AddAgent": Rule("admin.agent.add", None, needs_session=False),
    "ListAgents": Rule("admin.agent.list", None, needs_session=False),
    "RevokeAgent": Rule("admin.agent.revoke", None, needs_session=False),
    "UnlockAgent": Rule("admin.agent.unlock", None, needs_session=False),
    "ShowPolicy": Rule("admin.policy.show", None, needs_session=False),
    # Alone: its readiness probe takes the writer for a moment itself.
    "Status": Rule("admin.status", None, needs_session=False, runs_alone=True),
    "ValidatePolicy": Rule("admin.policy.validate", None, needs_session=False),
    "DiffPolicy": Rule("admin.policy.diff", None, needs_session=False),
    "ApplyPolicy": Rule("admin.policy.apply", None, needs_session=False),
    "PolicyHistory": Rule("admin.policy.history", None, needs_session=False),
    "RollbackPolicy": Rule("admin.policy.rollback", None, needs_session=False),
    "ListQuarantine": Rule("admin.quarantine.list", None, needs_session=False),
    "ShowQuarantined": Rule("admin.quarantine.show", None, needs_session=False),
    "ReleaseQuarantined": Rule("admin.quarantine.release", None, needs_session=False),
    "PurgeQuarantined": Rule("admin.quarantine.purge", None, needs_session=False),
    "QueryAudit": Rule("admin.audit.query", None, needs_session=False),
    "VerifyAudit": Rule("admin.audit.verify", None, needs_session=False),
    "RotateAgentToken": Rule("admin.agent.rotate_token", None, needs_session=False),
    "ListSessions": Rule("admin.session.list", None, needs_session=False),
    "RevokeSession": Rule("admin.session.revoke", None, needs_session=False),
    "ListKeys": Rule("admin.keys.list", None, needs_session=False),
    "RotateKey": Rule("admin.keys.rotate", None, needs_session=False, runs_alone=True),
    "ResignMemories": Rule("admin.keys.resign", None, needs_session=False, runs_alone=True),
    "RetireKey": Rule("admin.keys.retire", None, needs_session=False, runs_alone=True),
    "CreateBackup": Rule("admin.backup.create", None, needs_session=False, runs_alone=True),
    "ListBackups": Rule("admin.backup.list", None, needs_session=False, runs_alone=True),
    "ReadBackup": Rule("admin.backup.read", None, needs_session=False, runs_alone=True),
    "VerifyBackup": Rule("admin.backup.verify", None, needs_session=False, runs_alone=True),
}

#: Every method path either socket serves, as gRPC names it.
_KNOWN_METHODS: Final = frozenset(
    [f"/guardian.v1.AgentService/{name}" for name in AGENT_RULES]
    + [f"/guardian.v1.AdminService/{name}" for name in ADMIN_RULES]
)

#: What the audit trail names as the caller of an admin RPC (not a valid agent name).
ADMIN_CALLER: Final = "@admin-socket"


def admin_caller(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The audit trail's name for an admin caller: the socket, plus the login name guardianctl claims.

    grpcio does not expose the peer's UID on a Unix socket, so the name is what the
    client says; the socket's group membership is what is proven (see the README).
    """
    for key, value in metadata:
        if key == OPERATOR_METADATA_KEY and isinstance(value, str) and AGENT_NAME_RE.fullmatch(value):
            return f"{ADMIN_CALLER}:{value}"
    return ADMIN_CALLER


#: Why a request is Malformed, when it is not its bytes.
MALFORMED_BYTES: Final = "the request is malformed (e.g. text that is not valid UTF-8)"


@dataclass(frozen=True)
class Malformed:
    """Stands for a request that did not arrive as one message of its type (refused as INVALID_ARGUMENT)."""

    data: bytes = field(repr=False)
    #: What was wrong, safe to show the caller.
    reason: str = MALFORMED_BYTES


@dataclass
class Call:
    """One request as it moves through the pipeline."""

    method: str
    rule: Rule
    policy: Policy
    now_ms: int
    session: Session | None = None
    profile: Profile | None = None
    scope: Scope | None = None
    #: Filled by handlers for the audit row: the object acted on and the agent, when known.
    object_id: str = ""
    agent: str = ""
    #: The shape stage's drafts, which the content stage filters in place.
    drafts: list[Draft] = field(default_factory=list)
    #: For an update: which draft fields it changes (only those are filtered and written).
    changed: frozenset[str] | None = None
    #: Rate-limit tokens this request costs (a batch costs one per memory).
    cost: int = 1
    #: Filter hits as "action:rule", for the audit row.
    filter_hits: list[str] = field(default_factory=list)
    #: Anomaly events this request counts toward (besides burst, denials and unknown ids).
    anomalies: list[AnomalyKind] = field(default_factory=list)
    #: Run after the transaction commits (e.g. swapping in a policy that was recorded).
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    #: The audit row's keyed digest of the request bytes.
    args_digest: str = ""
    #: The request's idempotency key ("" for none), and its digest without the session id.
    idempotency_key: str = ""
    request_digest: str = ""
    #: Set when the request is a retry answered from its idempotency record.
    replayed: bool = False

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
        self,
        method: str,
        request: Message | Malformed,
        metadata: Sequence[tuple[str, str | bytes]],
        handler: Handler[Any],
        response_class: type[Message] | None = None,
    ) -> Any:
        """Serve one request; every path writes one audit row. Returns the response.

        Raises the GuardianError the caller must get (guardian/service/status.py makes it a gRPC
        status), after its audit row is written; an InternalError or Unavailable instead
        when that row could not be written. metadata: the call's invocation metadata.
        response_class: the method's response message, which an idempotent retry's
        recorded answer is read back as.
        """
        started = time.perf_counter()
        rule = self._rules[method]
        caller = admin_caller(metadata) if self._caller == ADMIN_CALLER else self._caller
        call = Call(method=method, rule=rule, policy=self._core.policy, now_ms=now_ms(), agent=caller)
        try:
            if isinstance(request, Malformed):
                call.args_digest = self._core.audit.args_digest(request.data)
                raise InvalidArgument(request.reason)
            call.args_digest = self._core.audit.args_digest(request.SerializeToString(deterministic=True))
            check_known_fields(request)
            self._session_stage(call, request)
            if rule.keyed:
                call.idempotency_key = idempotency.check_key(request.idempotency_key)  # type: ignore[attr-defined]
                call.request_digest = idempotency.request_digest(request)
            work = handler(call, request)  # the shape stage
            self._policy_stage(call)
            self._rate_stage(call)
            self._content_stage(call)
            database = self._core.database
            if rule.grows_data:
                database.check_room()
            if rule.runs_alone:
                # No connection: the work takes the writer or a reader itself, step by step (Rule.runs_alone).
                response = work(cast(Connection, None))
                self._append_audit(call, "allow", self._allow_reason(call))
            else:

                def work_and_audit(connection: Connection) -> Any:
                    result = self._replay(call, connection, response_class)
                    if result is None:
                        result = work(connection)
                        if call.idempotency_key:
                            first = idempotency.Prior(
                                rule.audit_operation,
                                call.request_digest,
                                call.object_id,
                                result.SerializeToString(deterministic=True),
                            )
                            idempotency.record(connection, call.agent, call.idempotency_key, first, call.now_ms)
                    self._audit(connection, call, "allow", self._allow_reason(call))
                    return result

                response = database.submit(work_and_audit)
            for hook in call.after_commit:
                hook()
        except GuardianError as error:
            self._anomaly_stage(call, error)
            raise self._deny(call, error, started) from None
        except Exception:
            log.exception("unexpected error serving %s", method)
            raise self._deny(call, InternalError(), started) from None
        else:
            self._anomaly_stage(call, None)
            self._observe(call, "allow", started)
            return response

    # -- the stages, in order ------------------------------------------------------------------

    def _session_stage(self, call: Call, request: Any) -> None:
        if call.rule.authenticates:
            token = request.agent_token
            if not token:
                raise Unauthenticated("no agent token: pass the token `guardianctl agents add` printed")
            with self._core.database.read() as reader:
                agent = self._core.agents.authenticate(reader, token, call.now_ms)
            if agent is None:
                raise Unauthenticated("the agent token was not accepted (wrong or revoked)")
            call.agent = agent
            self._core.anomalies.check_locked(agent=agent, session_key=None, now_ms=call.now_ms)
        elif call.rule.needs_session:
            call.session = self._core.sessions.resolve(getattr(request, "session_id", ""), call.now_ms)
            call.agent = call.session.agent
            self._core.anomalies.check_locked(agent=call.agent, session_key=call.session.id, now_ms=call.now_ms)
        else:
            return
        profile = call.profile = call.policy.profile_for(call.agent)
        window = profile.read_window_ms
        call.scope = Scope(
            agent=call.agent,
            namespaces=profile.readable_namespaces(call.agent),
            writable=frozenset({call.agent}) | profile.write_namespaces,
            not_before_ms=max(0, call.now_ms - window) if window else 0,
        )

    def _policy_stage(self, call: Call) -> None:
        operation = call.rule.policy_operation
        if operation is not None and operation not in call.required_profile.operations:
            raise PermissionDenied(f"the policy does not allow this agent to {operation} memories")
        hours = call.profile.allowed_hours if call.profile else None
        if hours is not None and not hours.allows(call.now_ms):
            call.anomalies.append("outside_hours")
            raise PermissionDenied("the policy does not allow this agent to make requests at this time of day")

    def _rate_stage(self, call: Call) -> None:
        if call.rule.rate is None or not call.agent:
            return
        rates = call.required_profile.rates
        session_key = call.session.id if call.session else None
        self._core.rates.check(
            agent=call.agent, session_key=session_key, kind=call.rule.rate, spec=rates, cost=call.cost
        )
        if call.rule.rate == "open":
            limit = call.policy.sessions.max_per_agent
            if self._core.sessions.count(call.agent, call.now_ms) >= limit:
                raise RateLimited(
                    f"this agent already has {limit} open sessions, the policy's limit; close one or let one expire",
                    retry_after_ms=self._core.sessions.next_expiry_ms(call.agent, call.now_ms),
                )

    def _content_stage(self, call: Call) -> None:
        filters = call.policy.filters
        for index, draft in enumerate(call.drafts):
            try:
                outcome = filters.scan(draft, call.changed)
            except ContentRefused as refused:
                call.anomalies.append("filter_hits")
                self._core.metrics.filter_hits.labels(refused.rule, "reject").inc()
                raise
            for hit in outcome.hits:
                self._core.metrics.filter_hits.labels(hit.rule, hit.action).inc()
            rules = tuple(hit.rule for hit in outcome.hits)
            call.filter_hits += [f"{hit.action}:{hit.rule}" for hit in outcome.hits]
            filtered = call.drafts[index] = replace(
                outcome.draft,
                status=QUARANTINED if outcome.quarantine else draft.status,
                filter_hits=tuple(dict.fromkeys(draft.filter_hits + rules)),
                redacted_by=outcome.redacted_by,
            )
            self._check_stored_sizes(call, filtered)
        if call.filter_hits:
            call.anomalies.append("filter_hits")

    @staticmethod
    def _check_stored_sizes(call: Call, draft: Draft) -> None:
        """Every limit holds for what is stored: a redaction marker can be longer than what it replaces."""
        limits = call.required_profile.limits
        changed = call.changed
        if changed is None or "content" in changed:
            shape.content(draft.content, limits, "content (as stored, once redacted)")
        if changed is None or "tags" in changed:
            shape.tags(draft.tags, limits, "tags (as stored, once redacted)")
        if changed is None or "metadata" in changed:
            shape.metadata_json(draft.metadata_json, limits, "metadata (as stored, once redacted)")

    def _anomaly_stage(self, call: Call, error: GuardianError | None) -> None:
        """Count what happened toward the policy's detectors; never changes the outcome."""
        if not call.agent or call.agent.startswith("@"):
            return
        kinds: list[AnomalyKind] = ["burst", *dict.fromkeys(call.anomalies)]
        # A fault of the guardian's own (storage unavailable) is not the agent's denial.
        if error is not None and not isinstance(error, (Unauthenticated, Unavailable, InternalError)):
            kinds.append("denials")
        if isinstance(error, NotFound):
            kinds.append("unknown_ids")
        session_key = call.session.id if call.session else None
        try:
            for kind in kinds:
                event = self._core.anomalies.record(
                    kind,
                    agent=call.agent,
                    session_key=session_key,
                    session_ref=session_ref(session_key or ""),
                    now_ms=call.now_ms,
                    spec=call.policy.anomaly,
                )
                if event is not None:
                    self._core.metrics.anomalies.labels(event.kind, event.response).inc()
                    with self._core.database.write() as connection:
                        reason = f"{event.kind}: {event.count} in {event.window_ms} ms"
                        self._audit(connection, call, "alert", reason, operation=f"anomaly.{event.response}")
        except Exception:
            log.exception("the anomaly stage failed for %s", call.method)

    # -- outcomes ---------------------------------------------------------------------------------

    def refuse_unknown(self, method: str, request: bytes) -> None:
        """Record a call to a method this socket does not serve (the caller gets UNIMPLEMENTED)."""
        rule = Rule("rpc.unknown", None, needs_session=False)
        call = Call(method=method, rule=rule, policy=self._core.policy, now_ms=now_ms(), agent=self._caller)
        # A path the caller made up is its own text: record only one the guardian knows, else a digest.
        known = method in _KNOWN_METHODS
        call.object_id = method if known else "unknown path " + self._core.audit.args_digest(method.encode())
        call.args_digest = self._core.audit.args_digest(request)
        self._core.metrics.requests.labels(rule.audit_operation, "deny").inc()
        self._core.metrics.denials.labels("unimplemented").inc()
        with self._core.database.write() as connection:
            self._audit(connection, call, "deny", "unimplemented: no such method on this socket")
        security_log.warning(
            "call to a method this socket does not serve",
            extra={"event": "unknown_method", "method": call.object_id},
        )

    def _replay(self, call: Call, connection: Connection, response_class: type[Message] | None) -> Message | None:
        """The recorded answer if call retries an earlier request with its idempotency key, else None.

        A replay passes today's checks before its answer is returned: every memory in it
        must still be one the caller could get now (its namespaces, read window, not
        quarantined), else the answer would show what a fresh request may no longer see.
        """
        if not call.idempotency_key:
            return None
        prior = idempotency.find(connection, call.agent, call.idempotency_key)
        if prior is None:
            return None
        if prior.operation != call.rule.audit_operation or prior.request_digest != call.request_digest:
            raise InvalidArgument(
                "idempotency_key: already used for a different request; make a new key for each new write"
            )
        if response_class is None:
            raise InternalError()
        call.replayed = True
        call.object_id = prior.object_id
        answer = response_class.FromString(prior.response)
        for memory_id in _memory_ids(answer):
            try:
                self._core.memories.get(connection, call.required_scope, memory_id)
            except NotFound:
                raise NotFound(
                    "this retry repeats a write that was done, but its memory is no longer visible to this agent"
                    " (out of its read window or namespaces, or held for review); nothing was written again"
                ) from None
        return answer

    @staticmethod
    def _allow_reason(call: Call) -> str:
        if call.replayed:
            return "ok: a retry with the same idempotency key; the first answer is returned, nothing written"
        if not call.filter_hits:
            return "ok"
        quarantined = any(draft.status == QUARANTINED for draft in call.drafts)
        return ("ok, quarantined; filters: " if quarantined else "ok; filters: ") + ",".join(
            dict.fromkeys(call.filter_hits)
        )

    def _deny(self, call: Call, error: GuardianError, started: float) -> GuardianError:
        """Audit a refusal; the error the caller gets (another one if the audit row could not be written)."""
        decision: audit.Decision = "error" if isinstance(error, (InternalError, Unavailable)) else "deny"
        reason = f"{error.kind}: {error.message}"
        metrics = self._core.metrics
        metrics.denials.labels(error.kind).inc()
        if isinstance(error, RateLimited):
            metrics.rate_limited.labels(call.rule.rate or "none").inc()
        try:
            self._append_audit(call, decision, reason)
        except Unavailable as fault:  # the storage failed (disk full, read-only): retryable, never internal
            log.error("could not write the audit row of a denied %s: %s", call.method, fault.message)
            self._observe(call, "error", started)
            return fault
        except Exception:
            log.exception("could not write the audit row of a denied %s", call.method)
            self._observe(call, "error", started)
            return InternalError()
        self._observe(call, decision, started)
        security_log.info(
            "request denied",
            extra={
                "event": "denied",
                "operation": call.rule.audit_operation,
                "agent": call.agent,
                "reason": error.kind,
            },
        )
        return error

    def _append_audit(self, call: Call, decision: audit.Decision, reason: str) -> None:
        """Append the call's audit row on its own (group-committed with concurrent requests)."""
        self._core.database.submit(lambda connection: self._audit(connection, call, decision, reason))

    def _observe(self, call: Call, decision: audit.Decision, started: float) -> None:
        """Count the outcome; an admin action also goes to the security log."""
        operation = call.rule.audit_operation
        self._core.metrics.requests.labels(operation, decision).inc()
        self._core.metrics.latency.labels(operation).observe(time.perf_counter() - started)
        if self._caller == ADMIN_CALLER:
            security_log.info(
                "admin action",
                extra={
                    "event": "admin_action",
                    "operation": operation,
                    "caller": call.agent,
                    "object_id": call.object_id[:200],
                    "decision": decision,
                },
            )

    def _audit(
        self, connection: Connection, call: Call, decision: audit.Decision, reason: str, operation: str = ""
    ) -> None:
        """Write call's audit row inside connection's transaction (operation: the rule's, unless given)."""
        self._core.audit.record(
            connection,
            ts_ms=call.now_ms,
            agent=call.agent,
            session=session_ref(call.session.id) if call.session else "",
            operation=operation or call.rule.audit_operation,
            object_id=call.object_id,
            decision=decision,
            reason=reason,
            policy_version=call.policy.version,
            args_digest=call.args_digest,
        )


def _memory_ids(answer: Message) -> list[str]:
    """The ids of the memories a write's answer shows (its ``memory`` or ``memories`` field)."""
    fields = answer.DESCRIPTOR.fields_by_name
    if "memory" in fields and answer.HasField("memory"):
        return [answer.memory.id]  # type: ignore[attr-defined]
    if "memories" in fields:
        return [memory.id for memory in answer.memories]  # type: ignore[attr-defined]
    return []
