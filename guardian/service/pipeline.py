"""The request pipeline and the dispatch table that is the guardian's security policy.

Every request passes the same stages, in this order (DESIGN.md), and every
outcome (allowed or denied) writes exactly one audit row:

1. session   resolve the session (idle and absolute timeouts) or the token; locked out?
             on the admin socket: the request's signature by an enrolled admin's key
             (guardian/access/identity.py); an approval takes up the proposal it approves
2. shape     field types, sizes, counts; unknown fields refused (the rule's check)
3. policy    is this operation granted to the agent's profile, now (allowed hours)?
             to the admin's role? does it need a second person (the two-person rule)?
4. rate      token buckets per session and per agent; a breach starts a cooldown
5. content   the policy's filters on the scan form: reject, redact, quarantine, flag;
             what is stored is what was sent (but for redactions), within every limit;
             the stored content's vector (recall by meaning), outside the writer's lock
6. data      the rule's handler, scoped to the agent's namespaces and read window
7. integrity every row read is verified (memories.py); a mismatch is DATA_LOSS
8. audit     the allow row shares the work's transaction, reads included: every
             request is a job of the writer's group commit (a read there finds
             the page cache warm, where a separate reader's cache is reset by
             every commit); a deny row is written on its own; if any cannot be
             written the request fails
9. anomaly   sliding windows over what happened; may lock the session or agent

The dispatch tables (guardian/service/rules.py) name each RPC's check and handler;
a method missing there is never served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from google.protobuf.message import Message
from opentelemetry import trace as otel_trace

from guardian.access import admins, identity, oauth, proposals
from guardian.access.oauth import OAuthGrant
from guardian.access.proposals import Proposal
from guardian.checks import review
from guardian.checks.anomaly import AnomalyKind
from guardian.policy.compile import Policy
from guardian.service import shape
from guardian.service.admins import proposed_request
from guardian.service.call import Call, Malformed, Rule, Writes
from guardian.service.rules import KNOWN_METHODS
from guardian.service.shape import check_known_fields
from guardian.state import limits
from guardian.state.core import GuardianCore, now_ms, session_ref
from guardian.store import audit, idempotency, provenance
from guardian.store.database import Connection
from guardian.store.memories import ACTIVE, QUARANTINED, Draft, Scope, draft_field
from guardian.store.scan_form import ScanForm
from shared import otlp
from shared.errors import (
    ContentRefused,
    FailedPrecondition,
    GuardianError,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from shared.formats import looks_like_jwt
from shared.rpc.guardian.v1 import admin_pb2
from shared.trace import METADATA_KEY as TRACE_METADATA_KEY
from shared.trace import TraceContext, continue_or_start

__all__ = ["ADMIN_CALLER", "Pipeline"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

#: What the audit trail names as the caller of an admin RPC until its signature is checked
#: (not a valid agent name); then the admin's own name (guardian/access/admins.py Admin.audit_name).
ADMIN_CALLER: Final = "@admin-socket"
#: The method a second person approves a proposal with (guardian/access/proposals.py).
_APPROVE: Final = "Approve"


@dataclass(frozen=True)
class _Keyed:
    """A write's idempotency key, and its request's digest (without the session id)."""

    key: str
    request_digest: str


def _keyed(request: Any) -> _Keyed | None:
    """The idempotency key a keyed write carries, checked; None for none."""
    key = idempotency.check_key(request.idempotency_key)
    return _Keyed(key, idempotency.request_digest(request)) if key else None


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
        response_class: type[Message],
        data: bytes = b"",
    ) -> Message:
        """Serve one request; every path writes one audit row. Returns the response.

        Raises the GuardianError the caller must get (guardian/service/status.py makes it a gRPC
        status), after its audit row is written; an InternalError or Unavailable instead
        when that row could not be written. metadata: the call's invocation metadata.
        response_class: the method's response message, which an idempotent retry's
        recorded answer is read back as. data: the request's bytes as they arrived (an
        admin request's signature is over them).
        """
        started = time.perf_counter()
        rule = self._rules[method]
        call = self._new_call(method, metadata)
        #: Anomaly events this request counts toward (besides burst, denials and unknown ids).
        noted: list[AnomalyKind] = []
        try:
            if self._caller == ADMIN_CALLER:
                self._signer_stage(call, method, data, metadata)  # 1, on the admin socket
            if isinstance(request, Malformed):
                call.args_digest = self._core.audit.args_digest(request.data)
                raise InvalidArgument(request.reason)
            call.args_digest = self._core.audit.args_digest(request.SerializeToString(deterministic=True))
            check_known_fields(request)
            if method == _APPROVE:  # from here on, the proposed request runs, approved by this signer
                rule, request = self._approved(call, request)
            call.clock.mark("receive")
            self._session_stage(call, rule, request)  # 1
            call.clock.mark("session")
            self._role_stage(call, rule)  # 3, for an admin: before the check reads anything
            keyed = _keyed(request) if rule.keyed else None
            checked = rule.check(self._core, call, request)  # 2
            call.clock.mark("shape")
            self._policy_stage(call, rule, noted)  # 3
            self._two_person_stage(call, rule, checked)
            self._rate_stage(call, rule, checked.cost if isinstance(checked, Writes) else 1)  # 4
            call.clock.mark("policy")
            checked, hits = self._content_stage(call, checked, noted)  # 5
            if rule.grows_data:
                self._core.database.check_room()
            if rule.handle_alone is not None:  # 6 to 8
                # No transaction: the work takes the writer or a reader itself, step by step.
                response = rule.handle_alone(self._core, call, checked)
                call.clock.mark("data")
                self._append_audit(call, rule, "allow", _allow_reason(checked, hits))
            else:
                response = self._core.database.submit(
                    lambda connection: self._data_stage(
                        call, rule, checked, connection, hits=hits, keyed=keyed, response_class=response_class
                    )
                )
            call.clock.restart()  # the transaction's work was measured where it ran (the data and audit stages)
            if rule.after_commit is not None:
                rule.after_commit(self._core, call, checked, response)
            if call.approval is not None:
                response = _approval_answer(call.approval, response)
        except GuardianError as error:
            self._anomaly_stage(call, error, noted)  # 9
            raise self._deny(call, rule, error, started) from None
        except Exception:
            log.exception("unexpected error serving %s", method)
            raise self._deny(call, rule, InternalError(), started) from None
        else:
            self._anomaly_stage(call, None, noted)
            self._observe(call, rule, "allow", started)
            return response

    def _new_call(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Call:
        """The Call of a request arriving now: in the caller's trace (a bad traceparent: a new one), its clock
        running."""
        call = Call(method=method, policy=self._core.policy, now_ms=now_ms(), agent=self._caller)
        call.clock = self._core.profile.clock()
        call.trace_parent = TraceContext.parse(dict(metadata).get(TRACE_METADATA_KEY))  # a bad value: none
        call.trace = call.trace_parent.trace_id if call.trace_parent else continue_or_start(None).trace_id
        return call

    # -- the stages, in order ------------------------------------------------------------------

    def _signer_stage(self, call: Call, method: str, data: bytes, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """An admin request: the enrolled person whose key signed these bytes, or Unauthenticated."""
        claimed = identity.claimed_key(metadata)
        call.session_label = claimed.signature.public_key.fingerprint
        path = f"/guardian.v1.AdminService/{method}"
        call.signed_by = identity.authenticate(self._core.database, claimed, path, data, call.now_ms)
        call.agent = call.signed_by.admin.audit_name

    def _approved(self, call: Call, request: Any) -> tuple[Rule, Message]:
        """An approval: the proposal's rule and request, which run from here on as if sent now.

        The proposal must be open and in time, proposed by another person who is still
        enrolled, and this signer's role must allow what it does. It is marked approved
        first, in its own transaction: a proposal runs at most once, and a run that then
        fails (its audit row says why) needs a new proposal.
        """
        signer = call.signed_by
        if signer is None:
            raise InternalError()
        proposal_id = call.object_id = proposals.check_id(request.id)
        with self._core.database.read() as reader:
            proposal = proposals.find(reader, proposal_id)
            proposer = admins.by_fingerprint(reader, proposal.proposal_signature.fingerprint)
        state = proposal.state_at(call.now_ms)
        if state != "open":
            raise FailedPrecondition(f"the proposal {proposal.id} is {state}: it can no longer be approved")
        proposer_key = proposal.proposal_signature.fingerprint
        if signer.admin.audit_name == proposal.proposed_by or signer.admin.fingerprint == proposer_key:
            raise PermissionDenied("you proposed this: a different person must approve it")
        if proposer is None or proposer.audit_name != proposal.proposed_by:
            raise FailedPrecondition(f"{proposal.proposed_by}, who proposed it, is no longer an admin; propose it anew")
        proposed = proposed_request(proposal.method, proposal.request)
        role = proposed.rule.role
        if role is None or not admins.role_allows(proposer.role, role):
            raise FailedPrecondition(f"{proposal.proposed_by} no longer has the {role} role: propose it again")
        if not admins.role_allows(signer.admin.role, role):
            raise PermissionDenied(f"approving {proposed.rule.admin_operation} needs the {role} role")
        self._core.database.submit(
            lambda connection: proposals.decide(
                connection, proposal, "approved", decided_by=call.agent, signature=signer.signature, now_ms=call.now_ms
            )
        )
        call.approval = proposal
        call.args_digest = self._core.audit.args_digest(proposal.request)
        return proposed.rule, proposed.request

    def _session_stage(self, call: Call, rule: Rule, request: Any) -> None:
        if rule.authenticates:
            token = request.agent_token
            if not token:
                raise Unauthenticated("no agent token: pass the token `guardianctl agents add` printed")
            if looks_like_jwt(token):  # an OAuth access token, which the guardian verifies itself
                call.oauth = self._verified_access_token(call, token)
                agent: str | None = call.oauth.agent
            else:
                with self._core.database.read() as reader:
                    agent = self._core.agents.authenticate(reader, token, call.now_ms)
            if agent is None:
                raise Unauthenticated("the agent token was not accepted (wrong or revoked)")
            call.agent = agent
            self._core.anomalies.check_locked(agent=agent, session_key=None, now_ms=call.now_ms)
        elif rule.needs_session:
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
            trust=call.policy.trust_view(call.agent),
            not_before_ms=max(0, call.now_ms - window) if window else 0,
            session=session_ref(call.session.id) if call.session else "",
        )

    def _verified_access_token(self, call: Call, token: str) -> OAuthGrant:
        """What an OAuth access token grants, checked here (the gateway only forwarded it)."""
        rules = call.policy.oauth
        if rules is None:
            raise Unauthenticated("this guardian accepts no OAuth access tokens (the policy has no oauth section)")
        grant = oauth.verify_access_token(token, rules, self._core.issuer_keys, call.now_ms)
        call.object_id = f"oauth {rules.claim}={grant.caller} scope={' '.join(grant.scopes)}"
        return grant

    def _policy_stage(self, call: Call, rule: Rule, noted: list[AnomalyKind]) -> None:
        operation = rule.policy_operation
        if operation is not None and operation not in call.required_profile.operations:
            raise PermissionDenied(f"the policy does not allow this agent to {operation} memories")
        granted = call.session.operations if call.session else None
        if operation is not None and granted is not None and operation not in granted:
            raise PermissionDenied(
                f"this session's access token does not allow {operation}: its scopes grant only"
                f" {', '.join(sorted(granted))}"
            )
        hours = call.profile.allowed_hours if call.profile else None
        if hours is not None and not hours.allows(call.now_ms):
            noted.append("outside_hours")
            raise PermissionDenied("the policy does not allow this agent to make requests at this time of day")

    def _role_stage(self, call: Call, rule: Rule) -> None:
        """An admin request: the signer's role must allow it (before its check reads anything)."""
        if rule.role is None:
            return
        signer = call.signed_by
        if signer is None or not admins.role_allows(signer.admin.role, rule.role):
            held = signer.admin.role if signer else "no"
            raise PermissionDenied(f"{rule.audit_operation} needs the {rule.role} role; this admin has the {held} role")

    def _two_person_stage(self, call: Call, rule: Rule, checked: Any) -> None:
        """An admin request the policy puts under the two-person rule must come as an approval.

        A policy that takes an operation off the two-person rule needs a second person too,
        whatever it covers itself: turning the rule off is subject to it.
        """
        if call.approval is not None or not rule.two_person:
            return
        covered = call.policy.two_person
        dropped = covered.operations - checked.two_person.operations if isinstance(checked, Policy) else frozenset()
        if covered.covers(rule.admin_operation) or dropped:
            why = (
                f"it takes {', '.join(sorted(dropped))} off the two-person rule"
                if dropped and not covered.covers(rule.admin_operation)
                else f"the policy puts {rule.admin_operation} under the two-person rule"
            )
            raise PermissionDenied(
                f"a second person must approve this ({why}): send it with --propose, and another admin runs"
                " guardianctl approve ID"
            )

    def _rate_stage(self, call: Call, rule: Rule, cost: int) -> None:
        if rule.rate is None or not call.agent:
            return
        rates = call.required_profile.rates
        session_key = call.session.id if call.session else None
        self._core.rates.check(agent=call.agent, session_key=session_key, kind=rule.rate, spec=rates, cost=cost)
        # The sessions an agent holds are counted where a session is opened, under the writer's lock
        # (agent_service.open_session): counted here, concurrent opens would all see room.

    def _content_stage(self, call: Call, checked: Any, noted: list[AnomalyKind]) -> tuple[Any, list[str]]:
        """A write's drafts filtered, each within every limit as stored; the filter hits as "action:rule"."""
        if not isinstance(checked, Writes):
            return checked, []
        filters, hits, filtered = call.policy.filters, [], []
        for draft in checked.drafts:
            try:
                outcome = filters.scan(draft, checked.changed)
            except ContentRefused as refused:
                noted.append("filter_hits")
                self._core.metrics.filter_hits.labels(refused.rule, "reject").inc()
                raise
            for hit in outcome.hits:
                self._core.metrics.filter_hits.labels(hit.rule, hit.action).inc()
            hits += [f"{hit.action}:{hit.rule}" for hit in outcome.hits]
            stored = replace(
                outcome.draft,
                status=QUARANTINED if outcome.quarantine else draft.status,
                filter_hits=tuple(dict.fromkeys(draft.filter_hits + tuple(hit.rule for hit in outcome.hits))),
                redacted_by=outcome.redacted_by,
            )
            if outcome.draft is not draft:  # redacted (else it is exactly what the shape stage checked)
                _check_stored_sizes(call, checked.changed, stored)
            filtered.append(stored)
        if hits:
            noted.append("filter_hits")
        call.clock.mark("filters")
        drafts = self._reviewed(call, checked, tuple(filtered), hits)
        call.clock.mark("review")
        return replace(checked, drafts=drafts), hits

    def _reviewed(self, call: Call, checked: Writes, drafts: tuple[Draft, ...], hits: list[str]) -> tuple[Draft, ...]:
        """drafts, each held for review (quarantined) when its trust is one the policy reviews and a signal fires.

        The signals (guardian/checks/review.py): it reads as an instruction to future turns; it
        is close by meaning to a trusted memory the writer can read, and changes it. Its trust
        is found as the write will store it, on a reader, before the transaction; so is the
        vector scan. A signal that holds a write is in its filter hits and the audit reason. An
        update a signal catches is refused instead (PermissionDenied): holding it would hide the
        memory it changes from every agent until someone reviews it.
        """
        rules = call.policy.review
        if not rules.levels or not (rules.instructions or rules.similar_to_trusted):
            return drafts  # review is off: no trust to work out
        scope = call.required_scope
        reviewed: list[Draft] = []
        for index, filtered in enumerate(drafts):
            if filtered.status != ACTIVE:
                reviewed.append(filtered)
                continue
            try:
                with self._core.database.read() as reader:
                    level = self._core.memories.write_trust(
                        reader,
                        scope,
                        filtered,
                        prefix="" if checked.memory_id else draft_field(index, len(drafts)),
                        memory_id=checked.memory_id,
                        changed=checked.changed or frozenset(),
                    )
            except (NotFound, PermissionDenied):
                # The write cannot go through as asked (or is a retry the data stage answers from its
                # record): the data stage, which checks it all again in its transaction, says why.
                reviewed.append(filtered)
                continue
            # Compared by meaning with the trusted memories: embedded now (any other write, after it commits).
            compared = rules.reviews(level) and rules.similar_to_trusted
            draft = self._embedded(call, filtered, checked.changed) if compared else filtered
            signals = self._review_signals(call, checked.changed, draft) if rules.reviews(level) else ()
            if not signals:
                reviewed.append(draft)
                continue
            self._core.metrics.filter_hits.labels(signals[0], "quarantine").inc()
            if checked.memory_id:
                raise PermissionDenied(
                    f"this update is refused for review ({', '.join(signals)}): from a source of its trust it may"
                    " not change a memory that way; store a new memory instead (it will be held for review)"
                )
            hits += [f"quarantine:{signal}" for signal in signals]
            held = tuple(dict.fromkeys(draft.filter_hits + signals))
            reviewed.append(replace(draft, status=QUARANTINED, filter_hits=held))
        return tuple(reviewed)

    def _review_signals(self, call: Call, changed: frozenset[str] | None, draft: Draft) -> tuple[str, ...]:
        """The review signals draft sets off (changed: an update's fields; None for a new memory)."""
        rules = call.policy.review
        signals: list[str] = []
        written = [
            text
            for field, text in (
                ("content", draft.content),
                ("tags", "\n".join(draft.tags)),
                ("metadata", draft.metadata_json),
            )
            if changed is None or field in changed
        ]
        scanned = "\n".join(ScanForm.of(text).text for text in written)
        if rules.instructions and review.reads_as_instruction(scanned):
            signals.append(review.INSTRUCTION)
        if rules.similar_to_trusted and draft.vector is not None and self._changes_trusted(call, draft):
            signals.append(review.CHANGES_TRUSTED)
        return tuple(signals)

    def _changes_trusted(self, call: Call, draft: Draft) -> bool:
        """Whether draft is close by meaning to a trusted memory the writer can read, and changes it.

        Every memory at least review.similar_to_trusted close is looked at, not a fixed number: the
        nearest are asked for four times as many while all of them are that close (so near-copies
        stored first cannot push a trusted memory out of sight). More than _REVIEW_MAX_NEIGHBOURS
        that close is itself suspicious: the write is held.
        """
        if draft.vector is None:
            return False
        scope = call.required_scope
        vectors = self._core.memories.vectors
        if vectors is not None:  # a trusted memory stored a moment ago is compared too: its vector follows it
            vectors.wait_embedded(scope.namespaces)
        threshold = call.policy.review.similar_to_trusted
        seen: set[int] = set()
        depth = _REVIEW_NEIGHBOURS
        while True:
            found = self._core.memories.nearest(scope, draft.vector, depth // 2)
            close = [rowid for rowid, cosine in found if cosine >= threshold and rowid not in seen]
            seen.update(close)
            if close:
                with self._core.database.read() as reader:
                    neighbours = self._core.memories.by_rowids(reader, close)
                if any(
                    memory.status == ACTIVE
                    and scope.trust.level_now(memory.author, memory.source, memory.trust) == "trusted"
                    and review.changes(memory.content, draft.content)
                    for memory in neighbours
                ):
                    return True
            all_close = found and all(cosine >= threshold for _, cosine in found)
            if not all_close or len(found) < depth:
                return False
            if depth >= _REVIEW_MAX_NEIGHBOURS:
                return True
            depth *= 4

    def _embedded(self, call: Call, draft: Draft, changed: frozenset[str] | None) -> Draft:
        """draft with its content's vector, for a review that compares it with trusted memories.

        Made here, before the transaction, so the model's work never holds the writer. Any
        other write is embedded after it commits (guardian/store/vectors.py: the queue), off
        its path. The embedder not answering: stored without, embedded when it is back (and
        the review has no vector to compare).
        """
        vectors = self._core.memories.vectors
        if vectors is None or (changed is not None and "content" not in changed):
            return draft
        call.clock.mark("review")
        try:
            vector = vectors.embed(draft.content)
        except Unavailable:
            return draft
        finally:
            call.clock.mark("embed")
        return replace(draft, vector=vector)

    def _data_stage(
        self,
        call: Call,
        rule: Rule,
        checked: Any,
        connection: Connection,
        *,
        hits: list[str],
        keyed: _Keyed | None,
        response_class: type[Message],
    ) -> Message:
        """The handler's work and the allow row, in one transaction; a retry gets its first answer instead."""
        profiled = call.clock.enabled
        started_ns = time.thread_time_ns() if profiled else 0
        replayed = self._replay(call, rule, keyed, response_class, connection) if keyed is not None else None
        if replayed is not None:
            self._audit(connection, call, rule, "allow", _REPLAYED)
            return replayed
        if rule.handle is None:  # a rule names one handler (Rule.__post_init__)
            raise InternalError()
        response = rule.handle(self._core, call, checked, connection)
        handled_ns = time.thread_time_ns() if profiled else 0
        if keyed is not None:
            first = idempotency.Prior(
                rule.audit_operation,
                keyed.request_digest,
                call.object_id,
                response.SerializeToString(deterministic=True),
            )
            idempotency.record(connection, call.agent, keyed.key, first, call.now_ms)
        seq = self._audit(connection, call, rule, "allow", _allow_reason(checked, hits))
        provenance.record_reads(connection, seq, returned=call.recalled, labelled=call.labelled, withheld=call.withheld)
        if profiled:  # measured here: this may run on another request's thread (database.submit)
            call.clock.add("data", handled_ns - started_ns)
            call.clock.add("audit", time.thread_time_ns() - handled_ns)
        return response

    def _anomaly_stage(self, call: Call, error: GuardianError | None, noted: list[AnomalyKind]) -> None:
        """Count what happened toward the policy's detectors; never changes the outcome."""
        if not call.agent or call.agent.startswith("@"):
            return
        kinds: list[AnomalyKind] = ["burst", *dict.fromkeys(noted)]
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
                        self._audit(connection, call, f"anomaly.{event.response}", "alert", reason)
                        if event.locked_until_ms:  # kept now, with its row: a kill -9 does not lift it
                            limits.save_agent(self._core, connection, call.agent)
        except Exception:
            log.exception("the anomaly stage failed for %s", call.method)

    # -- outcomes ---------------------------------------------------------------------------------

    def refuse_unknown(self, method: str, request: bytes) -> None:
        """Record a call to a method this socket does not serve (the caller gets UNIMPLEMENTED)."""
        call = Call(method=method, policy=self._core.policy, now_ms=now_ms(), agent=self._caller)
        # A path the caller made up is its own text: record only one the guardian knows, else a digest.
        known = method in KNOWN_METHODS
        call.object_id = method if known else "unknown path " + self._core.audit.args_digest(method.encode())
        call.args_digest = self._core.audit.args_digest(request)
        self._core.metrics.requests.labels(_UNKNOWN_METHOD, "deny").inc()
        self._core.metrics.denials.labels("unimplemented").inc()
        with self._core.database.write() as connection:
            self._audit(connection, call, _UNKNOWN_METHOD, "deny", "unimplemented: no such method on this socket")
        security_log.warning(
            "call to a method this socket does not serve",
            extra={"event": "unknown_method", "method": call.object_id},
        )

    def _replay(
        self, call: Call, rule: Rule, keyed: _Keyed, response_class: type[Message], connection: Connection
    ) -> Message | None:
        """The recorded answer if call retries an earlier request with its idempotency key, else None.

        A replay passes today's checks before its answer is returned: every memory in it
        must still be one the caller could get now (its namespaces, read window, not
        quarantined), else the answer would show what a fresh request may no longer see.
        """
        prior = idempotency.find(connection, call.agent, keyed.key)
        if prior is None:
            return None
        if prior.operation != rule.audit_operation or prior.request_digest != keyed.request_digest:
            raise InvalidArgument(
                "idempotency_key: already used for a different request; make a new key for each new write"
            )
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

    def _deny(self, call: Call, rule: Rule, error: GuardianError, started: float) -> GuardianError:
        """Audit a refusal; the error the caller gets (another one if the audit row could not be written)."""
        decision: audit.Decision = "error" if isinstance(error, (InternalError, Unavailable)) else "deny"
        reason = f"{error.kind}: {error.message}"
        metrics = self._core.metrics
        metrics.denials.labels(error.kind).inc()
        if isinstance(error, RateLimited):
            metrics.rate_limited.labels(rule.rate or "none").inc()
        try:
            self._append_audit(call, rule, decision, reason)
        except Unavailable as fault:  # the storage failed (disk full, read-only): retryable, never internal
            log.error("could not write the audit row of a denied %s: %s", call.method, fault.message)
            self._observe(call, rule, "error", started)
            return fault
        except Exception:
            log.exception("could not write the audit row of a denied %s", call.method)
            self._observe(call, rule, "error", started)
            return InternalError()
        self._observe(call, rule, decision, started)
        security_log.info(
            "request denied",
            extra={
                "event": "denied",
                "operation": rule.audit_operation,
                "agent": call.agent,
                "reason": error.kind,
                **({"key": call.session_label} if call.session_label else {}),
            },
        )
        return error

    def _append_audit(self, call: Call, rule: Rule, decision: audit.Decision, reason: str) -> None:
        """Append the call's audit row on its own (group-committed with concurrent requests).

        A refused read records what it withheld (a failed transaction returned nothing).
        """

        def append(connection: Connection) -> None:
            seq = self._audit(connection, call, rule, decision, reason)
            returned = call.recalled if decision == "allow" else ()
            provenance.record_reads(connection, seq, returned=returned, labelled=call.labelled, withheld=call.withheld)

        self._core.database.submit(append)

    def _observe(self, call: Call, rule: Rule, decision: audit.Decision, started: float) -> None:
        """Count and log the outcome (with the trace id, as the audit row has it); an admin action also goes to the
        security log."""
        operation = rule.audit_operation
        elapsed_s = time.perf_counter() - started
        self._core.metrics.requests.labels(operation, decision).inc()
        self._core.metrics.latency.labels(operation).observe(elapsed_s)
        log.info(
            "request",
            extra={
                "event": "request",
                "operation": operation,
                "agent": call.agent,
                "decision": decision,
                "trace_id": call.trace,
                "ms": round(elapsed_s * 1000, 2),
            },
        )
        _span(call, operation, decision, elapsed_s)
        if self._caller == ADMIN_CALLER:
            security_log.info(
                "admin action",
                extra={
                    "event": "admin_action",
                    "operation": operation,
                    "caller": call.agent,
                    "key": call.session_label,
                    "approves": call.approval.id if call.approval else "",
                    "trace_id": call.trace,
                    "object_id": call.object_id[:200],
                    "decision": decision,
                },
            )
        call.clock.mark("observe")
        self._core.profile.record(operation, call.clock)

    def _audit(
        self, connection: Connection, call: Call, rule: Rule | str, decision: audit.Decision, reason: str
    ) -> int:
        """Write call's audit row inside connection's transaction, under the rule's operation (or the one given);
        its seq."""
        if call.approval is not None:
            approval = call.approval
            reason = (
                f"approves {approval.id} of {approval.proposed_by} ({approval.proposal_signature.fingerprint});"
                f" {reason}"
            )
        return self._core.audit.record(
            connection,
            ts_ms=call.now_ms,
            agent=call.agent,
            session=session_ref(call.session.id) if call.session else call.session_label,
            operation=rule if isinstance(rule, str) else rule.audit_operation,
            object_id=call.object_id,
            decision=decision,
            reason=reason,
            policy_version=call.policy.version,
            args_digest=call.args_digest,
            trace=call.trace,
        ).seq


#: How many of the memories nearest a reviewed write are looked at first, and at most.
_REVIEW_NEIGHBOURS: Final = 20
_REVIEW_MAX_NEIGHBOURS: Final = 1280
#: The audit operation of a call to a method the socket does not serve.
_UNKNOWN_METHOD: Final = "rpc.unknown"
#: The allow row's reason for a retry answered from its idempotency record.
_REPLAYED: Final = "ok: a retry with the same idempotency key; the first answer is returned, nothing written"


_tracer: Final = otel_trace.get_tracer("agent_guardian")


def _span(call: Call, operation: str, decision: audit.Decision, elapsed_s: float) -> None:
    """The request's OpenTelemetry span, in its trace, when spans are exported (shared/otlp.py); never content."""
    if not otlp.exporting():
        return
    parent = call.trace_parent or continue_or_start(None)
    remote = otel_trace.SpanContext(
        trace_id=int(call.trace, 16),
        span_id=int(parent.span_id, 16),
        is_remote=True,
        trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED if parent.sampled else 0),
    )
    end_ns = time.time_ns()
    span = _tracer.start_span(
        operation,
        context=otel_trace.set_span_in_context(otel_trace.NonRecordingSpan(remote)),
        kind=otel_trace.SpanKind.SERVER,
        start_time=end_ns - int(elapsed_s * 1e9),
        attributes={"guardian.operation": operation, "guardian.decision": decision, "guardian.agent": call.agent},
    )
    if decision != "allow":
        span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, decision))
    span.end(end_time=end_ns)


def _approval_answer(approval: Proposal, response: Message) -> admin_pb2.ApproveResponse:
    """What an approval answers: the proposal, now approved, and the answer of the request it ran."""
    return admin_pb2.ApproveResponse(
        proposal=admin_pb2.Proposal(id=approval.id, method=approval.method, state="approved"),
        response=response.SerializeToString(),
    )


def _allow_reason(checked: Any, hits: list[str]) -> str:
    """The allow row's reason: "ok", and the filters that matched (and whether what was written is held)."""
    if not hits:
        return "ok"
    quarantined = isinstance(checked, Writes) and any(draft.status == QUARANTINED for draft in checked.drafts)
    return ("ok, quarantined; filters: " if quarantined else "ok; filters: ") + ",".join(dict.fromkeys(hits))


def _check_stored_sizes(call: Call, changed: frozenset[str] | None, draft: Draft) -> None:
    """Every limit holds for what is stored: a redaction marker can be longer than what it replaces."""
    limits = call.required_profile.limits
    if changed is None or "content" in changed:
        shape.content(draft.content, limits, "content (as stored, once redacted)")
    if changed is None or "tags" in changed:
        shape.tags(draft.tags, limits, "tags (as stored, once redacted)")
    if changed is None or "metadata" in changed:
        shape.metadata_json(draft.metadata_json, limits, "metadata (as stored, once redacted)")


def _memory_ids(answer: Message) -> list[str]:
    """The ids of the memories a write's answer shows (its ``memory`` or ``memories`` field)."""
    fields = answer.DESCRIPTOR.fields_by_name
    if "memory" in fields and answer.HasField("memory"):
        return [answer.memory.id]  # type: ignore[attr-defined]
    if "memories" in fields:
        return [memory.id for memory in answer.memories]  # type: ignore[attr-defined]
    return []
