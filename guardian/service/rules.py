"""The dispatch tables: one row per RPC, naming what it needs and its handler; nothing else is served.

A row is read left to right as the pipeline runs it (guardian/service/pipeline.py):
the audit name, the policy operation a profile must grant, whether a session is
needed, the check (the shape stage), the handler (in the request's transaction, or
alone), and what must follow the commit. These tables are the guardian's security
policy for RPCs: a method missing here is never served.
"""

from __future__ import annotations

from typing import Final

from guardian.service import admin_backups as backups
from guardian.service import admin_keys as keys
from guardian.service import admin_service as admin
from guardian.service import admin_stats, admins, incidents
from guardian.service import agent_service as agent
from guardian.service.call import Rule

__all__ = ["ADMIN_RULES", "AGENT_RULES", "KNOWN_METHODS"]

#: The agent service's dispatch table.
AGENT_RULES: Final[dict[str, Rule]] = {
    "OpenSession": Rule(
        "session.open", None, needs_session=False, handle=agent.open_session, rate="open", authenticates=True
    ),
    "CloseSession": Rule("session.close", None, needs_session=True, handle=agent.close_session),
    "Store": Rule(
        "memory.store",
        "store",
        needs_session=True,
        check=agent.check_store,
        handle=agent.store,
        rate="write",
        grows_data=True,
        keyed=True,
    ),
    "StoreBatch": Rule(
        "memory.store_batch",
        "store",
        needs_session=True,
        check=agent.check_store_batch,
        handle=agent.store_batch,
        rate="write",
        grows_data=True,
        keyed=True,
    ),
    "Get": Rule("memory.get", "get", needs_session=True, check=agent.check_get, handle=agent.get, rate="read"),
    "Search": Rule(
        "memory.search", "search", needs_session=True, check=agent.check_search, handle=agent.search, rate="read"
    ),
    "List": Rule(
        "memory.list", "list", needs_session=True, check=agent.check_list, handle=agent.list_page, rate="read"
    ),
    "Update": Rule(
        "memory.update",
        "update",
        needs_session=True,
        check=agent.check_update,
        handle=agent.update,
        rate="write",
        grows_data=True,
        keyed=True,
    ),
    "Delete": Rule(
        "memory.delete",
        "delete",
        needs_session=True,
        check=agent.check_delete,
        handle=agent.delete,
        rate="write",
        keyed=True,
    ),
}


#: The admin service's dispatch table. Served only on the admin socket, whose file mode
#: and group are the first gate; every request is signed by an enrolled admin, and the
#: row's role is the least that may make it (guardian/access/). No admin RPC takes a
#: session or a rate budget.
ADMIN_RULES: Final[dict[str, Rule]] = {
    "AddAgent": Rule(
        "admin.agent.add", check=admin.check_new_agent, handle=admin.add_agent, role="security", two_person=True
    ),
    "ListAgents": Rule("admin.agent.list", handle=admin.list_agents, role="viewer"),
    "RevokeAgent": Rule(
        "admin.agent.revoke", check=admin.check_agent_name, handle=admin.revoke_agent, role="security", two_person=True
    ),
    "UnlockAgent": Rule("admin.agent.unlock", check=admin.check_agent_name, handle=admin.unlock_agent, role="security"),
    "RotateAgentToken": Rule(
        "admin.agent.rotate_token", check=admin.check_rotate_token, handle=admin.rotate_agent_token, role="security"
    ),
    # Alone: its readiness probe takes the writer for a moment itself.
    "Status": Rule("admin.status", handle_alone=admin.status, role="viewer"),
    "ListSessions": Rule(
        "admin.session.list", check=admin.check_list_sessions, handle=admin.list_sessions, role="viewer"
    ),
    "RevokeSession": Rule("admin.session.revoke", handle=admin.revoke_session, role="operator"),
    "ShowPolicy": Rule("admin.policy.show", handle=admin.show_policy, role="viewer"),
    "ValidatePolicy": Rule(
        "admin.policy.validate", check=admin.check_policy_text, handle=admin.validate_policy, role="viewer"
    ),
    "DiffPolicy": Rule("admin.policy.diff", check=admin.check_policy_text, handle=admin.diff_policy, role="viewer"),
    "ApplyPolicy": Rule(
        "admin.policy.apply",
        None,
        False,
        check=admin.check_policy_text,
        handle=admin.apply_policy,
        after_commit=admin.put_applied_in_force,
        role="security",
        two_person=True,
    ),
    "PolicyHistory": Rule("admin.policy.history", handle=admin.policy_history_entries, role="viewer"),
    "RollbackPolicy": Rule(
        "admin.policy.rollback",
        None,
        False,
        check=admin.check_rollback,
        handle=admin.rollback_policy,
        after_commit=admin.put_rolled_back_in_force,
        role="security",
        two_person=True,
    ),
    "ListQuarantine": Rule(
        "admin.quarantine.list", check=admin.check_quarantine_page, handle=admin.list_quarantine, role="security"
    ),
    "ShowQuarantined": Rule(
        "admin.quarantine.show", check=admin.check_held_id, handle=admin.show_quarantined, role="security"
    ),
    "ReleaseQuarantined": Rule(
        "admin.quarantine.release",
        check=admin.check_held_id,
        handle=admin.release_quarantined,
        role="security",
        two_person=True,
    ),
    "PurgeQuarantined": Rule(
        "admin.quarantine.purge", check=admin.check_held_id, handle=admin.purge_quarantined, role="security"
    ),
    # Alone: a long read (or a wait for new rows) never holds the writer.
    "QueryAudit": Rule(
        "admin.audit.query", check=admin.check_audit_query, handle_alone=admin.query_audit, role="viewer"
    ),
    "VerifyAudit": Rule(
        "admin.audit.verify", check=admin.check_published_heads, handle_alone=admin.verify_audit, role="viewer"
    ),
    "WhoRead": Rule("admin.audit.who_read", check=incidents.check_who_read, handle=incidents.who_read, role="viewer"),
    "OpenIncident": Rule(
        "admin.incident.open", check=incidents.check_open, handle=incidents.open_incident, role="security"
    ),
    "ListIncidents": Rule(
        "admin.incident.list", check=incidents.check_list, handle=incidents.list_incidents, role="security"
    ),
    "ReportIncident": Rule(
        "admin.incident.report", check=incidents.check_incident_id, handle=incidents.report_incident, role="security"
    ),
    "CloseIncident": Rule(
        "admin.incident.close",
        check=incidents.check_close,
        handle=incidents.close_incident,
        role="security",
        two_person=True,
    ),
    "RescanMemories": Rule(
        "admin.memories.rescan", check=incidents.check_rescan, handle=incidents.rescan_memories, role="security"
    ),
    "Stats": Rule("admin.stats", check=admin_stats.check_stats, handle=admin_stats.stats, role="viewer"),
    "ListKeys": Rule("admin.keys.list", handle=keys.list_keys, role="viewer"),
    "RotateKey": Rule(
        "admin.keys.rotate", check=keys.check_ring, handle_alone=keys.rotate_key, role="security", two_person=True
    ),
    "ResignMemories": Rule("admin.keys.resign", handle_alone=keys.resign_memories, role="security"),
    "RetireKey": Rule(
        "admin.keys.retire", check=keys.check_retire, handle_alone=keys.retire_key, role="security", two_person=True
    ),
    "CreateBackup": Rule("admin.backup.create", handle_alone=backups.create_backup, role="operator"),
    "ListBackups": Rule("admin.backup.list", handle_alone=backups.list_backups, role="operator"),
    "ReadBackup": Rule(
        "admin.backup.read", check=backups.check_backup_chunk, handle_alone=backups.read_backup, role="operator"
    ),
    "VerifyBackup": Rule(
        "admin.backup.verify", check=backups.check_backup_name, handle_alone=backups.verify_backup, role="operator"
    ),
    "AddAdmin": Rule(
        "admin.admins.add", check=admins.check_add_admin, handle=admins.add_admin, role="security", two_person=True
    ),
    "RemoveAdmin": Rule(
        "admin.admins.remove",
        check=admins.check_admin_name,
        handle=admins.remove_admin,
        role="security",
        two_person=True,
    ),
    "ListAdmins": Rule("admin.admins.list", handle=admins.list_admins, role="viewer"),
    "WhoAmI": Rule("admin.admins.whoami", handle=admins.who_am_i, role="viewer"),
    # A proposal: the proposer's role must allow what it proposes (its check says so).
    "Propose": Rule("admin.proposal.create", check=admins.check_proposal, handle=admins.propose, role="viewer"),
    "ListProposals": Rule("admin.proposal.list", handle=admins.list_proposals, role="viewer"),
    "ShowProposal": Rule(
        "admin.proposal.show", check=admins.check_proposal_id, handle=admins.show_proposal, role="viewer"
    ),
    # Never runs as itself: the pipeline runs the proposal it approves in its place, under that
    # request's own rule (and audit operation), once the proposal is checked (Pipeline._approved).
    "Approve": Rule("admin.proposal.approve", handle=admins.show_proposal, role="viewer"),
    "CancelProposal": Rule(
        "admin.proposal.cancel", check=admins.check_proposal_id, handle=admins.cancel_proposal, role="viewer"
    ),
    # -- audit export (issue 17.4) --
    # Alone: a page may hash the rows since the nearest signed head, on a snapshot of its own.
    "ExportAudit": Rule(
        "admin.audit.export", check=admin.check_export_page, handle_alone=admin.export_audit, role="viewer"
    ),
    "AuditSigningKeys": Rule("admin.keys.public", handle=keys.audit_signing_keys, role="viewer"),
}

#: Every method path either socket serves, as gRPC names it.
KNOWN_METHODS: Final = frozenset(
    [f"/guardian.v1.AgentService/{name}" for name in AGENT_RULES]
    + [f"/guardian.v1.AdminService/{name}" for name in ADMIN_RULES]
)
