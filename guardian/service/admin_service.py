"""The admin service's handlers: the only implementation of guardian.v1.AdminService.

Served only on the admin socket. Every call is audited like an agent's,
with the caller recorded as the admin socket.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from guardian.policy import history as policy_history
from guardian.policy.compile import Policy, compile_policy
from guardian.policy.in_force import PolicyInForce
from guardian.service.admin_backups import BackupHandlers
from guardian.service.admin_keys import KeyHandlers
from guardian.service.pipeline import Call
from guardian.service.shape import agent_name, memory_id
from guardian.state.core import GuardianCore, session_ref
from guardian.store import audit
from guardian.store.database import Connection
from guardian.store.memories import StoredMemory
from shared.errors import ConfigError, InvalidArgument, NotFound
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = ["AdminHandlers"]

security_log = logging.getLogger("agent_guardian.security")

_MAX_AUDIT_WAIT_MS = 10_000
_AUDIT_POLL_S = 0.1
_MAX_TOKEN_GRACE_MS = 7 * 24 * 3600 * 1000
_MAC_RE = re.compile(r"[0-9a-f]{64}")

Work = Callable[[Connection], Any]


class AdminHandlers(KeyHandlers, BackupHandlers):
    """One method per AdminService RPC, named as the RPC (keys and backups in their own modules)."""

    def __init__(self, core: GuardianCore) -> None:
        self._core = core

    def AddAgent(self, call: Call, request: pb.AddAgentRequest) -> Work:
        call.object_id = request.name

        def work(connection: Connection) -> pb.AddAgentResponse:
            token = self._core.agents.add(connection, request.name, call.now_ms)
            return pb.AddAgentResponse(name=request.name, token=token)

        return work

    def ListAgents(self, call: Call, request: pb.ListAgentsRequest) -> Work:
        def work(connection: Connection) -> pb.ListAgentsResponse:
            locked = {name for scope, name, _ in self._core.anomalies.locks(call.now_ms) if scope == "agent"}
            return pb.ListAgentsResponse(
                agents=[
                    pb.AgentInfo(
                        name=agent.name,
                        created_at_ms=agent.created_at_ms,
                        revoked_at_ms=agent.revoked_at_ms or 0,
                        open_sessions=self._core.sessions.count(agent.name, call.now_ms),
                        memories=self._core.memories.count(connection, agent.name),
                        locked=agent.name in locked,
                    )
                    for agent in self._core.agents.list(connection)
                ]
            )

        return work

    def RevokeAgent(self, call: Call, request: pb.RevokeAgentRequest) -> Work:
        call.object_id = agent_name(request.name)

        def work(connection: Connection) -> pb.RevokeAgentResponse:
            self._core.agents.revoke(connection, request.name, call.now_ms)
            # Under the writer lock, so no OpenSession of this agent can slip in between.
            return pb.RevokeAgentResponse(sessions_ended=self._core.sessions.end_agent(request.name))

        return work

    def Status(self, call: Call, request: pb.StatusRequest) -> Work:
        def work(_: Connection) -> pb.StatusResponse:
            readiness = self._core.readiness()
            state = self._core.state_reading()
            return pb.StatusResponse(
                ready=readiness.ready,
                checks=dict(readiness.checks),
                warnings=dict(readiness.warnings),
                policy_version=state.policy_version,
                policy_file_refusal=self._core.policy_file_refusal or "",
                sessions_open=state.sessions_open,
                audit_chain_rows=state.audit_chain_rows,
                database_size_bytes=state.database_size_bytes,
            )

        return work

    def UnlockAgent(self, call: Call, request: pb.UnlockAgentRequest) -> Work:
        call.object_id = agent_name(request.name)

        def work(connection: Connection) -> pb.UnlockAgentResponse:
            self._core.agents.require(connection, request.name)
            self._core.rates.reset_agent(request.name)
            return pb.UnlockAgentResponse(was_locked=self._core.anomalies.unlock_agent(request.name))

        return work

    def RotateAgentToken(self, call: Call, request: pb.RotateAgentTokenRequest) -> Work:
        call.object_id = agent_name(request.name)
        if not 0 <= request.grace_ms <= _MAX_TOKEN_GRACE_MS:
            raise InvalidArgument(f"grace_ms: must be between 0 and {_MAX_TOKEN_GRACE_MS} (7 days)")

        def work(connection: Connection) -> pb.AddAgentResponse:
            token = self._core.agents.rotate_token(connection, request.name, call.now_ms, request.grace_ms)
            return pb.AddAgentResponse(name=request.name, token=token)

        return work

    # -- sessions ----------------------------------------------------------------------------

    def ListSessions(self, call: Call, request: pb.ListSessionsRequest) -> Work:
        if request.agent:
            agent_name(request.agent, "agent")

        def work(_: Connection) -> pb.ListSessionsResponse:
            return pb.ListSessionsResponse(
                sessions=[
                    pb.SessionInfo(
                        ref=session_ref(session.id),
                        agent=session.agent,
                        opened_at_ms=session.created_at_ms,
                        last_used_at_ms=session.last_used_ms,
                        expires_at_ms=min(session.expires_at_ms, session.last_used_ms + session.idle_timeout_ms),
                    )
                    for session in self._core.sessions.live(call.now_ms, request.agent)
                ]
            )

        return work

    def RevokeSession(self, call: Call, request: pb.RevokeSessionRequest) -> Work:
        call.object_id = request.ref

        def work(_: Connection) -> pb.RevokeSessionResponse:
            session = self._core.sessions.end_matching(request.ref, session_ref)
            if session is None:
                raise NotFound("no open session with that reference (see guardianctl sessions list)")
            self._core.rates.forget_session(session.id)
            self._core.anomalies.forget_session(session.id)
            return pb.RevokeSessionResponse(agent=session.agent)

        return work

    # -- policy ------------------------------------------------------------------------------

    def ShowPolicy(self, call: Call, request: pb.ShowPolicyRequest) -> Work:
        def work(connection: Connection) -> pb.PolicyInfo:
            policy = self._core.policy
            call.object_id = policy.version
            entry = policy_history.newest_of(connection, policy.version)
            return pb.PolicyInfo(
                version=policy.version,
                text=policy.text,
                applied_at_ms=entry.applied_at_ms if entry else 0,
                applied_by=entry.applied_by if entry else "",
                source=entry.source if entry else "",
            )

        return work

    def ValidatePolicy(self, call: Call, request: pb.PolicyText) -> Work:
        policy = _compile(request.text)
        call.object_id = policy.version

        def work(_: Connection) -> pb.ValidatePolicyResponse:
            return pb.ValidatePolicyResponse(version=policy.version, summary=_summary(policy))

        return work

    def DiffPolicy(self, call: Call, request: pb.PolicyText) -> Work:
        policy = _compile(request.text)
        call.object_id = policy.version

        def work(_: Connection) -> pb.DiffPolicyResponse:
            running = self._core.policy
            diff = "" if running.version == policy.version else _unified_diff(running, policy)
            return pb.DiffPolicyResponse(running_version=running.version, new_version=policy.version, diff=diff)

        return work

    def ApplyPolicy(self, call: Call, request: pb.PolicyText) -> Work:
        policy = _compile(request.text)
        return self._apply(call, policy, "apply")

    def PolicyHistory(self, call: Call, request: pb.PolicyHistoryRequest) -> Work:
        limit = min(request.limit or 50, 1000)

        def work(connection: Connection) -> pb.PolicyHistoryResponse:
            return pb.PolicyHistoryResponse(
                entries=[
                    pb.PolicyHistoryEntry(
                        seq=e.seq,
                        version=e.version,
                        applied_at_ms=e.applied_at_ms,
                        applied_by=e.applied_by,
                        source=e.source,
                    )
                    for e in policy_history.entries(connection, limit)
                ]
            )

        return work

    def RollbackPolicy(self, call: Call, request: pb.RollbackPolicyRequest) -> Work:
        with self._core.database.read() as reader:
            entry = policy_history.find(reader, request.version)
        return self._apply(call, _compile(entry.text), "rollback")

    def _apply(self, call: Call, policy: Policy, source: policy_history.Source) -> Work:
        call.object_id = policy.version

        def work(connection: Connection) -> pb.ApplyPolicyResponse:
            running = self._core.policy
            if running.version == policy.version:
                return pb.ApplyPolicyResponse(version=policy.version, previous_version=running.version, unchanged=True)
            PolicyInForce.record(connection, policy, at_ms=call.now_ms, by=call.agent, source=source)
            call.after_commit.append(lambda: self._core.swap_policy(policy, by=call.agent, source=source))
            return pb.ApplyPolicyResponse(version=policy.version, previous_version=running.version)

        return work

    def ListQuarantine(self, call: Call, request: pb.ListQuarantineRequest) -> Work:
        limit = min(request.limit or 100, 1000)
        after = memory_id(request.after_id) if request.after_id else ""

        def work(connection: Connection) -> pb.ListQuarantineResponse:
            held = self._core.memories.held(connection, limit, after)
            return pb.ListQuarantineResponse(memories=[_held_message(memory) for memory in held])

        return work

    def ShowQuarantined(self, call: Call, request: pb.QuarantineRequest) -> Work:
        held_id = call.object_id = memory_id(request.id)

        def work(connection: Connection) -> pb.ShowQuarantinedResponse:
            memory = self._core.memories.get_held(connection, held_id)
            return pb.ShowQuarantinedResponse(
                memory=_held_message(memory),
                content=memory.content,
                tags=list(memory.tags),
                metadata_json=memory.metadata_json,
            )

        return work

    def ReleaseQuarantined(self, call: Call, request: pb.QuarantineRequest) -> Work:
        held_id = call.object_id = memory_id(request.id)

        def work(connection: Connection) -> pb.QuarantineActionResponse:
            self._core.memories.release(connection, held_id, call.now_ms)
            return pb.QuarantineActionResponse(id=held_id)

        return work

    def PurgeQuarantined(self, call: Call, request: pb.QuarantineRequest) -> Work:
        held_id = call.object_id = memory_id(request.id)

        def work(connection: Connection) -> pb.QuarantineActionResponse:
            self._core.memories.purge_held(connection, held_id)
            return pb.QuarantineActionResponse(id=held_id)

        return work

    # -- audit -------------------------------------------------------------------------------

    def QueryAudit(self, call: Call, request: pb.AuditQuery) -> Work:
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
        if request.wait_ms > _MAX_AUDIT_WAIT_MS:
            raise InvalidArgument(f"wait_ms must be at most {_MAX_AUDIT_WAIT_MS}")
        # Read on this thread's reader before the audit row's transaction, so a long read
        # (or a wait for new rows) never holds the writer; the reader is let go between polls.
        database = self._core.database
        deadline = time.monotonic() + request.wait_ms / 1000
        with database.read() as reader:
            rows = audit.query(reader, query)
        while not rows and time.monotonic() < deadline:
            time.sleep(_AUDIT_POLL_S)
            with database.read() as reader:
                rows = audit.query(reader, query)
        with database.read() as reader:
            head = audit.read_head(reader)
        call.object_id = f"{len(rows)} rows"

        def work(_: Connection) -> pb.AuditRows:
            return pb.AuditRows(rows=[pb.AuditRow(**row.to_json()) for row in rows], head_seq=head.seq if head else 0)

        return work

    def VerifyAudit(self, call: Call, request: pb.VerifyAuditRequest) -> Work:
        for index, given in enumerate(request.published_heads):
            if not 1 <= given.seq <= audit.MAX_SEQ or _MAC_RE.fullmatch(given.mac) is None:
                raise InvalidArgument(
                    f"published_heads[{index}]: a head is a sequence number from 1 and a mac of 64 hex digits"
                )
        published = [audit.ChainHead(head.seq, head.mac) for head in request.published_heads]
        own = self._core.audit_head_file.read()
        if own is not None:
            published.append(own)
        with self._core.database.snapshot() as reader:
            report = self._core.audit.verify(reader, published)
        head = report.head
        if report.intact:
            call.object_id = f"intact: {report.rows_checked} rows"
        else:
            call.object_id = f"broken at row {report.first_bad_seq}"
            security_log.error(
                "the audit chain does not verify",
                extra={
                    "event": "audit_verify_failed",
                    "first_bad_seq": report.first_bad_seq,
                    "problem": report.problem,
                },
            )
        last = report.last_published

        def work(_: Connection) -> pb.VerifyAuditResponse:
            return pb.VerifyAuditResponse(
                intact=report.intact,
                rows_checked=report.rows_checked,
                head=pb.ChainHead(seq=head.seq, mac=head.mac) if head else None,
                first_bad_seq=report.first_bad_seq,
                problem=report.problem,
                last_published=pb.ChainHead(seq=last.seq, mac=last.mac) if last else None,
            )

        return work


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
    )
