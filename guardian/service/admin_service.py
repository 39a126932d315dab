"""The admin service's handlers for agents, sessions, policy, quarantine and audit.

Served only on the admin socket; every call is audited like an agent's, with the
caller recorded as the admin socket. Keys and backups have their handlers in
admin_keys.py and admin_backups.py; the dispatch table (guardian/service/rules.py)
names each RPC's check and handler.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from dataclasses import dataclass

from guardian.policy import history as policy_history
from guardian.policy.compile import Policy, compile_policy
from guardian.policy.in_force import PolicyInForce
from guardian.service.call import Call
from guardian.service.shape import agent_name, memory_id
from guardian.state import limits
from guardian.state.core import GuardianCore, session_ref
from guardian.store import audit
from guardian.store.database import Connection
from guardian.store.memories import StoredMemory
from shared.errors import ConfigError, InvalidArgument, NotFound
from shared.rpc.guardian.v1 import admin_pb2 as pb

security_log = logging.getLogger("agent_guardian.security")

_MAX_AUDIT_WAIT_MS = 10_000
_AUDIT_POLL_S = 0.1
_MAX_TOKEN_GRACE_MS = 7 * 24 * 3600 * 1000
_MAC_RE = re.compile(r"[0-9a-f]{64}")
_MAX_EXPORT_PAGE = 1000


# -- agents --------------------------------------------------------------------------------------


def check_new_agent(core: GuardianCore, call: Call, request: pb.AddAgentRequest) -> str:
    """The name of the agent to add (checked where it is added, which says why a name is refused)."""
    call.object_id = request.name
    return request.name


def check_agent_name(core: GuardianCore, call: Call, request: pb.RevokeAgentRequest | pb.UnlockAgentRequest) -> str:
    """The agent the request names."""
    name = call.object_id = agent_name(request.name)
    return name


def add_agent(core: GuardianCore, call: Call, name: str, connection: Connection) -> pb.AddAgentResponse:
    """Add an agent; its token, shown this once."""
    return pb.AddAgentResponse(name=name, token=core.agents.add(connection, name, call.now_ms))


def list_agents(
    core: GuardianCore, call: Call, request: pb.ListAgentsRequest, connection: Connection
) -> pb.ListAgentsResponse:
    """Every agent, with its sessions, memories and lock."""
    locked = {name for scope, name, _ in core.anomalies.locks(call.now_ms) if scope == "agent"}
    return pb.ListAgentsResponse(
        agents=[
            pb.AgentInfo(
                name=agent.name,
                created_at_ms=agent.created_at_ms,
                revoked_at_ms=agent.revoked_at_ms or 0,
                open_sessions=core.sessions.count(agent.name, call.now_ms),
                memories=core.memories.count(connection, agent.name),
                locked=agent.name in locked,
            )
            for agent in core.agents.list(connection)
        ]
    )


def revoke_agent(core: GuardianCore, call: Call, name: str, connection: Connection) -> pb.RevokeAgentResponse:
    """Revoke an agent's token and end its sessions."""
    core.agents.revoke(connection, name, call.now_ms)
    # Under the writer lock, so no OpenSession of this agent can slip in between.
    return pb.RevokeAgentResponse(sessions_ended=core.sessions.end_agent(name))


def unlock_agent(core: GuardianCore, call: Call, name: str, connection: Connection) -> pb.UnlockAgentResponse:
    """Lift an agent's anomaly lock and refill its rate budgets."""
    core.agents.require(connection, name)
    core.rates.reset_agent(name)
    was_locked = core.anomalies.unlock_agent(name)
    limits.save_agent(core, connection, name)  # kept now: a restart must not bring the lock back
    return pb.UnlockAgentResponse(was_locked=was_locked)


def check_rotate_token(
    core: GuardianCore, call: Call, request: pb.RotateAgentTokenRequest
) -> pb.RotateAgentTokenRequest:
    """The agent and a grace period of at most 7 days."""
    call.object_id = agent_name(request.name)
    if not 0 <= request.grace_ms <= _MAX_TOKEN_GRACE_MS:
        raise InvalidArgument(f"grace_ms: must be between 0 and {_MAX_TOKEN_GRACE_MS} (7 days)")
    return request


def rotate_agent_token(
    core: GuardianCore, call: Call, request: pb.RotateAgentTokenRequest, connection: Connection
) -> pb.AddAgentResponse:
    """A new token for the agent; the old one works for the grace period."""
    token = core.agents.rotate_token(connection, request.name, call.now_ms, request.grace_ms)
    return pb.AddAgentResponse(name=request.name, token=token)


def status(core: GuardianCore, call: Call, request: pb.StatusRequest) -> pb.StatusResponse:
    """Readiness, warnings and the figures an operator looks at first (alone: its probe takes the writer itself)."""
    readiness = core.readiness()
    state = core.state_reading()
    vectors = core.memories.vectors
    with core.database.read() as reader:
        progress = vectors.progress(reader) if vectors else None
    return pb.StatusResponse(
        ready=readiness.ready,
        checks=dict(readiness.checks),
        warnings=dict(readiness.warnings),
        policy_version=state.policy_version,
        policy_file_refusal=core.policy_file_refusal or "",
        sessions_open=state.sessions_open,
        audit_chain_rows=state.audit_chain_rows,
        database_size_bytes=state.database_size_bytes,
        recall_index_ready=vectors.index.ready if vectors else False,
        vectors_indexed=len(vectors.index) if vectors else 0,
        memories_to_embed=progress.active - progress.embedded if progress else 0,
        embedding_model=vectors.model.id if vectors else "",
        recall_index_training=vectors.index.training if vectors else False,
    )


# -- sessions ------------------------------------------------------------------------------------


def check_list_sessions(core: GuardianCore, call: Call, request: pb.ListSessionsRequest) -> str:
    """The agent whose sessions are listed ("" for all)."""
    return agent_name(request.agent, "agent") if request.agent else ""


def list_sessions(core: GuardianCore, call: Call, agent: str, connection: Connection) -> pb.ListSessionsResponse:
    """The live sessions (of one agent, or all), by reference: a session id is never shown."""
    return pb.ListSessionsResponse(
        sessions=[
            pb.SessionInfo(
                ref=session_ref(session.id),
                agent=session.agent,
                opened_at_ms=session.created_at_ms,
                last_used_at_ms=session.last_used_ms,
                expires_at_ms=min(session.expires_at_ms, session.last_used_ms + session.idle_timeout_ms),
            )
            for session in core.sessions.live(call.now_ms, agent)
        ]
    )


def revoke_session(
    core: GuardianCore, call: Call, request: pb.RevokeSessionRequest, connection: Connection
) -> pb.RevokeSessionResponse:
    """End the session with that reference."""
    call.object_id = request.ref
    session = core.sessions.end_matching(request.ref, session_ref, call.now_ms)
    if session is None:
        raise NotFound("no open session with that reference (see guardianctl sessions list)")
    core.rates.forget_session(session.id)
    core.anomalies.forget_session(session.id)
    return pb.RevokeSessionResponse(agent=session.agent)


# -- policy --------------------------------------------------------------------------------------


def show_policy(core: GuardianCore, call: Call, request: pb.ShowPolicyRequest, connection: Connection) -> pb.PolicyInfo:
    """The policy in force and who applied it."""
    policy = core.policy
    call.object_id = policy.version
    entry = policy_history.newest_of(connection, policy.version)
    return pb.PolicyInfo(
        version=policy.version,
        text=policy.text,
        applied_at_ms=entry.applied_at_ms if entry else 0,
        applied_by=entry.applied_by if entry else "",
        source=entry.source if entry else "",
    )


def check_policy_text(core: GuardianCore, call: Call, request: pb.PolicyText) -> Policy:
    """The policy sent, compiled; its errors are the caller's to fix (INVALID_ARGUMENT)."""
    policy = _compile(request.text)
    call.object_id = policy.version
    return policy


def validate_policy(
    core: GuardianCore, call: Call, policy: Policy, connection: Connection
) -> pb.ValidatePolicyResponse:
    """What the policy, which compiled, says."""
    return pb.ValidatePolicyResponse(version=policy.version, summary=_summary(policy))


def diff_policy(core: GuardianCore, call: Call, policy: Policy, connection: Connection) -> pb.DiffPolicyResponse:
    """The difference from the policy in force."""
    running = core.policy
    diff = "" if running.version == policy.version else _unified_diff(running, policy)
    return pb.DiffPolicyResponse(running_version=running.version, new_version=policy.version, diff=diff)


def apply_policy(core: GuardianCore, call: Call, policy: Policy, connection: Connection) -> pb.ApplyPolicyResponse:
    """Record the policy in the history; it is put in force once that committed (put_applied_in_force)."""
    return _record(call, policy, "apply", core.policy, connection)


def check_rollback(core: GuardianCore, call: Call, request: pb.RollbackPolicyRequest) -> Policy:
    """The earlier policy the request names, from the history, compiled as it is today."""
    call.object_id = request.version
    with core.database.read() as reader:
        entry = policy_history.find(reader, request.version)
    return check_policy_text(core, call, pb.PolicyText(text=entry.text))


def rollback_policy(core: GuardianCore, call: Call, policy: Policy, connection: Connection) -> pb.ApplyPolicyResponse:
    """Record an earlier policy in the history again; it is put in force once that committed."""
    return _record(call, policy, "rollback", core.policy, connection)


def put_applied_in_force(core: GuardianCore, call: Call, policy: Policy, response: pb.ApplyPolicyResponse) -> None:
    """After the history row committed: the applied policy is the one every request reads."""
    if not response.unchanged:
        core.swap_policy(policy, by=call.agent, source="apply")


def put_rolled_back_in_force(core: GuardianCore, call: Call, policy: Policy, response: pb.ApplyPolicyResponse) -> None:
    """After the history row committed: the earlier policy is the one every request reads again."""
    if not response.unchanged:
        core.swap_policy(policy, by=call.agent, source="rollback")


def _record(
    call: Call, policy: Policy, source: policy_history.Source, running: Policy, connection: Connection
) -> pb.ApplyPolicyResponse:
    if running.version == policy.version:
        return pb.ApplyPolicyResponse(version=policy.version, previous_version=running.version, unchanged=True)
    PolicyInForce.record(connection, policy, at_ms=call.now_ms, by=call.agent, source=source)
    return pb.ApplyPolicyResponse(version=policy.version, previous_version=running.version)


def policy_history_entries(
    core: GuardianCore, call: Call, request: pb.PolicyHistoryRequest, connection: Connection
) -> pb.PolicyHistoryResponse:
    """The policies applied, newest first (at most 1000)."""
    return pb.PolicyHistoryResponse(
        entries=[
            pb.PolicyHistoryEntry(
                seq=e.seq,
                version=e.version,
                applied_at_ms=e.applied_at_ms,
                applied_by=e.applied_by,
                source=e.source,
            )
            for e in policy_history.entries(connection, min(request.limit or 50, 1000))
        ]
    )


# -- quarantine ----------------------------------------------------------------------------------


def check_quarantine_page(core: GuardianCore, call: Call, request: pb.ListQuarantineRequest) -> tuple[int, str]:
    """The page size (at most 1000) and the id the page starts after."""
    return min(request.limit or 100, 1000), memory_id(request.after_id) if request.after_id else ""


def list_quarantine(
    core: GuardianCore, call: Call, page: tuple[int, str], connection: Connection
) -> pb.ListQuarantineResponse:
    """The memories held for review, a page at a time, without their content."""
    limit, after = page
    return pb.ListQuarantineResponse(memories=[_held_message(m) for m in core.memories.held(connection, limit, after)])


def check_held_id(core: GuardianCore, call: Call, request: pb.QuarantineRequest) -> str:
    """The id of the held memory the request names."""
    held_id = call.object_id = memory_id(request.id)
    return held_id


def show_quarantined(
    core: GuardianCore, call: Call, held_id: str, connection: Connection
) -> pb.ShowQuarantinedResponse:
    """One held memory, with its content, for the reviewer."""
    memory = core.memories.get_held(connection, held_id)
    return pb.ShowQuarantinedResponse(
        memory=_held_message(memory),
        content=memory.content,
        tags=list(memory.tags),
        metadata_json=memory.metadata_json,
    )


def release_quarantined(
    core: GuardianCore, call: Call, held_id: str, connection: Connection
) -> pb.QuarantineActionResponse:
    """Release a held memory: agents may read it from now on."""
    core.memories.release(connection, held_id, call.now_ms)
    return pb.QuarantineActionResponse(id=held_id)


def purge_quarantined(
    core: GuardianCore, call: Call, held_id: str, connection: Connection
) -> pb.QuarantineActionResponse:
    """Delete a held memory for good."""
    core.memories.purge_held(connection, held_id)
    return pb.QuarantineActionResponse(id=held_id)


# -- audit ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditWait:
    """An audit query, and how long to wait for a first row."""

    query: audit.AuditQuery
    wait_ms: int


def check_audit_query(core: GuardianCore, call: Call, request: pb.AuditQuery) -> AuditWait:
    """The filters of an audit query, and a wait of at most 10 s."""
    if request.wait_ms > _MAX_AUDIT_WAIT_MS:
        raise InvalidArgument(f"wait_ms must be at most {_MAX_AUDIT_WAIT_MS}")
    query = audit.AuditQuery(
        agent=request.agent,
        operation=request.operation,
        decision=request.decision,
        since_ms=request.since_ms,
        until_ms=request.until_ms,
        after_seq=request.after_seq,
        limit=request.limit or 100,
        newest_first=request.newest_first,
        exclude_audit_reads=request.exclude_audit_reads,
    )
    return AuditWait(query, request.wait_ms)


def query_audit(core: GuardianCore, call: Call, request: AuditWait) -> pb.AuditRows:
    """The audit rows that match, waiting up to wait_ms for one (alone: a long read never holds the writer).

    Reads on this thread's reader; the reader is let go between polls.
    """
    database = core.database
    deadline = time.monotonic() + request.wait_ms / 1000
    with database.read() as reader:
        rows = audit.query(reader, request.query)
    while not rows and time.monotonic() < deadline:
        time.sleep(_AUDIT_POLL_S)
        with database.read() as reader:
            rows = audit.query(reader, request.query)
    with database.read() as reader:
        head = audit.read_head(reader)
    call.object_id = f"{len(rows)} rows"
    return pb.AuditRows(rows=[pb.AuditRow(**row.to_json()) for row in rows], head_seq=head.seq if head else 0)


def check_published_heads(core: GuardianCore, call: Call, request: pb.VerifyAuditRequest) -> list[audit.ChainHead]:
    """The chain heads published earlier, each a sequence number and a mac."""
    for index, given in enumerate(request.published_heads):
        if not 1 <= given.seq <= audit.MAX_SEQ or _MAC_RE.fullmatch(given.mac) is None:
            raise InvalidArgument(
                f"published_heads[{index}]: a head is a sequence number from 1 and a mac of 64 hex digits"
            )
    return [audit.ChainHead(head.seq, head.mac) for head in request.published_heads]


def verify_audit(core: GuardianCore, call: Call, published: list[audit.ChainHead]) -> pb.VerifyAuditResponse:
    """Verify the whole chain on a snapshot, against the published heads and the head file (alone: long)."""
    own = core.audit_head_file.read()
    with core.database.snapshot() as reader:
        report = core.audit.verify(reader, [*published, *([own] if own is not None else [])])
    if report.intact:
        call.object_id = f"intact: {report.rows_checked} rows"
    else:
        call.object_id = f"broken at row {report.first_bad_seq}"
        security_log.error(
            "the audit chain does not verify",
            extra={"event": "audit_verify_failed", "first_bad_seq": report.first_bad_seq, "problem": report.problem},
        )
    head, last = report.head, report.last_published
    return pb.VerifyAuditResponse(
        intact=report.intact,
        rows_checked=report.rows_checked,
        head=pb.ChainHead(seq=head.seq, mac=head.mac) if head else None,
        first_bad_seq=report.first_bad_seq,
        problem=report.problem,
        last_published=pb.ChainHead(seq=last.seq, mac=last.mac) if last else None,
    )


@dataclass(frozen=True)
class ExportPage:
    """One page of an export: rows after after_seq up to until_seq (0: the head now), at most limit."""

    after_seq: int
    until_seq: int
    limit: int
    #: The link at after_seq as the previous page ended; "": work it out.
    after_link: str


def check_export_page(core: GuardianCore, call: Call, request: pb.ExportAuditRequest) -> ExportPage:
    """The page's bounds, a size of at most 1000 rows, and the link it continues from (64 hex digits or none)."""
    if request.after_seq > audit.MAX_SEQ or request.until_seq > audit.MAX_SEQ:
        raise InvalidArgument(f"after_seq and until_seq must be at most {audit.MAX_SEQ}")
    if request.limit > _MAX_EXPORT_PAGE:
        raise InvalidArgument(f"limit must be between 1 and {_MAX_EXPORT_PAGE} (0: {_MAX_EXPORT_PAGE})")
    if request.after_link and _MAC_RE.fullmatch(request.after_link) is None:
        raise InvalidArgument("after_link: the link at after_seq is 64 lowercase hex digits (or empty)")
    call.object_id = f"after row {request.after_seq}"
    return ExportPage(request.after_seq, request.until_seq, request.limit or _MAX_EXPORT_PAGE, request.after_link)


def export_audit(core: GuardianCore, call: Call, page: ExportPage) -> pb.ExportAuditPage:
    """Rows with their public chain links and the signed heads among them, on a snapshot (alone: may hash a span)."""
    with core.database.snapshot() as reader:
        head = audit.read_head(reader)
        until = page.until_seq or (head.seq if head else 0)
        start_link = page.after_link or audit.link_at(reader, page.after_seq)
        rows, heads = audit.export_page(reader, page.after_seq, until, page.limit, start_link)
    call.object_id = f"rows {rows[0][0].seq}..{rows[-1][0].seq}" if rows else f"no rows after {page.after_seq}"
    return pb.ExportAuditPage(
        rows=[pb.ExportedAuditRow(row=pb.AuditRow(**row.to_json()), link=link) for row, link in rows],
        signed_heads=[
            pb.SignedHead(seq=h.seq, ts_ms=h.ts_ms, link=h.link, key_id=h.key_id, signature=h.signature) for h in heads
        ],
        until_seq=until,
        start_link=start_link,
    )


def _compile(text: str) -> Policy:
    """A policy sent by guardianctl, compiled; its errors are the caller's to fix (INVALID_ARGUMENT)."""
    try:
        return compile_policy(text, "the policy")
    except ConfigError as error:
        raise InvalidArgument(error.message) from None


def _unified_diff(running: Policy, new: Policy) -> str:
    lines = difflib.unified_diff(
        running.text.splitlines(keepends=True),
        new.text.splitlines(keepends=True),
        fromfile=f"running {running.version[:12]}",
        tofile=f"new {new.version[:12]}",
    )
    return "".join(lines)


def _summary(policy: Policy) -> list[str]:
    lines = [
        f"profile {profile.name}: {', '.join(sorted(profile.operations)) or 'no operations'}"
        + (f"; read window {profile.read_window_ms // 1000}s" if profile.read_window_ms else "")
        + ("; allowed hours" if profile.allowed_hours else "")
        for profile in policy.profiles.values()
    ]
    lines.append(f"default profile: {policy.default_profile}; {len(policy.agent_profiles)} agents assigned")
    lines.append(f"filters: {len(policy.filters)} rules ({', '.join(policy.filters.names)})")
    lines.append(f"anomaly detectors: {', '.join(d.kind for d in policy.anomaly.detectors) or 'none'}")
    lines.append(f"alert webhook: {'configured' if policy.webhook_url else 'none'}")
    return lines


def _held_message(memory: StoredMemory) -> pb.QuarantinedMemory:
    return pb.QuarantinedMemory(
        id=memory.id,
        namespace=memory.namespace,
        author=memory.author,
        created_at_ms=memory.created_at_ms,
        content_bytes=len(memory.content.encode()),
        rules=list(memory.filter_hits),
        source=memory.declared_source,
        session=memory.session,
        derived_from=list(memory.derived_from),
        trust=memory.trust,
    )
