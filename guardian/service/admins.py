"""The admin service's handlers for the people who administer the guardian, and for proposals.

Enrolling and removing admins, and the two-person rule's proposals: one person
proposes a request the rule covers (its exact bytes and signature are kept), a
different person looks at what it would do (:func:`show_proposal`) and approves
it. The approval itself runs in the pipeline (guardian/service/pipeline.py), as
the proposed request, so it passes every stage an ordinary request passes.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass

from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from guardian.access import admins, proposals
from guardian.access.admins import Admin
from guardian.access.proposals import Proposal, Signature
from guardian.access.signed_request import PublicKey
from guardian.service.call import Call, Rule
from guardian.state.core import GuardianCore
from guardian.store.database import Connection
from shared.errors import FailedPrecondition, GuardianError, InvalidArgument, PermissionDenied
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = [
    "add_admin",
    "admin_info",
    "cancel_proposal",
    "check_add_admin",
    "check_admin_name",
    "check_proposal",
    "check_proposal_id",
    "list_admins",
    "list_proposals",
    "proposal_info",
    "propose",
    "proposed_request",
    "remove_admin",
    "show_proposal",
    "who_am_i",
]

security_log = logging.getLogger("agent_guardian.security")


# -- admins --------------------------------------------------------------------------------------


def admin_info(admin: Admin) -> pb.AdminInfo:
    """An admin as the wire shows it."""
    return pb.AdminInfo(
        name=admin.name,
        role=admin.role,
        fingerprint=admin.fingerprint,
        public_key=admin.public_key.openssh,
        added_at_ms=admin.added_at_ms,
        added_by=admin.added_by,
    )


def check_add_admin(core: GuardianCore, call: Call, request: pb.AddAdminRequest) -> Admin:
    """The person to enrol: a valid name, an Ed25519 key and a role."""
    call.object_id = admins.check_name(request.name)
    return Admin(
        name=request.name,
        role=admins.check_role(request.role),
        public_key=PublicKey.parse(request.public_key),
        added_at_ms=call.now_ms,
        added_by=call.agent,
    )


def add_admin(core: GuardianCore, call: Call, admin: Admin, connection: Connection) -> pb.AdminInfo:
    """Enrol a person; from now on requests signed by their key are theirs."""
    admins.add(connection, admin)
    security_log.info(
        "admin enrolled",
        extra={"event": "admin_added", "admin": admin.name, "role": admin.role, "fingerprint": admin.fingerprint},
    )
    return admin_info(admin)


def check_admin_name(core: GuardianCore, call: Call, request: pb.RemoveAdminRequest) -> str:
    """The admin the request names."""
    call.object_id = admins.check_name(request.name)
    return request.name


def remove_admin(core: GuardianCore, call: Call, name: str, connection: Connection) -> pb.AdminInfo:
    """Remove a person; their key is refused from now on."""
    admin = admins.remove(connection, name)
    security_log.info(
        "admin removed", extra={"event": "admin_removed", "admin": admin.name, "fingerprint": admin.fingerprint}
    )
    return admin_info(admin)


def list_admins(core: GuardianCore, call: Call, request: pb.ListAdminsRequest, connection: Connection) -> Message:
    """Every enrolled person."""
    return pb.ListAdminsResponse(admins=[admin_info(admin) for admin in admins.listing(connection)])


def who_am_i(core: GuardianCore, call: Call, request: pb.WhoAmIRequest, connection: Connection) -> pb.AdminInfo:
    """The person whose key signed this request."""
    if call.signed_by is None:
        raise PermissionDenied("this request is not signed")
    return admin_info(call.signed_by.admin)


# -- proposals -----------------------------------------------------------------------------------


def _admin_rules() -> dict[str, Rule]:
    """The admin dispatch table (imported here: the table itself imports this module's handlers)."""
    from guardian.service.rules import ADMIN_RULES  # noqa: PLC0415

    return ADMIN_RULES


@dataclass(frozen=True)
class Proposed:
    """The request a proposal runs: its method, its rule and the message."""

    method: str
    rule: Rule
    request: Message
    #: The request's bytes, exactly as proposed.
    data: bytes


def proposed_request(method: str, request: bytes) -> Proposed:
    """The request a proposal runs; InvalidArgument when it is not one the two-person rule may cover."""
    rules = _admin_rules()
    rule = rules.get(method)
    if rule is None or not rule.two_person:
        covered = sorted(name for name, rule in rules.items() if rule.two_person)
        raise InvalidArgument(f"method: only these may be proposed: {', '.join(covered)}")
    input_type = pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name[method].input_type
    request_class: type[Message] = getattr(pb, input_type.name)
    try:
        message = request_class.FromString(request)
    except DecodeError:
        raise InvalidArgument(f"request: not a {input_type.name} message") from None
    return Proposed(method, rule, message, request)


def check_proposal(core: GuardianCore, call: Call, request: pb.ProposeRequest) -> Proposed:
    """What is proposed: a covered method, its request well formed and checked now, by someone who may make it.

    The request is checked as it would be when run (a policy must compile, a named agent
    must exist...), so a proposal that could never run is refused at once.
    """
    proposed = proposed_request(request.method, request.request)
    rule = proposed.rule
    signer = call.signed_by
    if signer is None or rule.role is None or not admins.role_allows(signer.admin.role, rule.role):
        raise PermissionDenied(f"proposing {rule.admin_operation} needs the {rule.role} role")
    checked_call = Call(method=request.method, policy=call.policy, now_ms=call.now_ms, agent=call.agent)
    rule.check(core, checked_call, proposed.request)
    call.object_id = f"{rule.audit_operation} {checked_call.object_id}".strip()
    return proposed


def propose(core: GuardianCore, call: Call, proposed: Proposed, connection: Connection) -> pb.Proposal:
    """Record the proposal: the request exactly as sent, and the proposer's signature over it."""
    if call.signed_by is None:
        raise PermissionDenied("this request is not signed")
    proposal = proposals.create(
        connection,
        method=proposed.method,
        operation=proposed.rule.audit_operation,
        request=proposed.data,
        proposed_by=call.agent,
        signature=call.signed_by.signature,
        now_ms=call.now_ms,
        expires_at_ms=call.now_ms + call.policy.two_person.proposals_expire_ms,
    )
    call.object_id = f"{proposal.id} {call.object_id}"
    security_log.info(
        "proposal made",
        extra={"event": "proposal", "id": proposal.id, "operation": proposal.operation, "by": call.agent},
    )
    return proposal_info(core, proposal, call.now_ms, connection)


def check_proposal_id(
    core: GuardianCore, call: Call, request: pb.ShowProposalRequest | pb.CancelProposalRequest | pb.ApproveRequest
) -> str:
    """The proposal the request names."""
    call.object_id = proposals.check_id(request.id)
    return request.id


def show_proposal(core: GuardianCore, call: Call, proposal_id: str, connection: Connection) -> pb.Proposal:
    """A proposal, with what approving it would do now."""
    return proposal_info(core, proposals.find(connection, proposal_id), call.now_ms, connection, describe=True)


def list_proposals(
    core: GuardianCore, call: Call, request: pb.ListProposalsRequest, connection: Connection
) -> pb.ListProposalsResponse:
    """The open proposals (or all), newest first."""
    found = proposals.listing(connection, call.now_ms, open_only=not request.all)
    return pb.ListProposalsResponse(proposals=[proposal_info(core, p, call.now_ms, connection) for p in found])


def cancel_proposal(core: GuardianCore, call: Call, proposal_id: str, connection: Connection) -> pb.Proposal:
    """Withdraw an open proposal: its proposer, or anyone whose role could approve it."""
    proposal = proposals.find(connection, proposal_id)
    signer = call.signed_by
    if signer is None:
        raise PermissionDenied("this request is not signed")
    needed = _admin_rules()[proposal.method].role or "security"
    if call.agent != proposal.proposed_by and not admins.role_allows(signer.admin.role, needed):
        raise PermissionDenied(f"cancelling a proposal of {proposal.operation} needs the {needed} role")
    if proposal.state_at(call.now_ms) != "open":
        raise FailedPrecondition(f"the proposal {proposal.id} is {proposal.state_at(call.now_ms)}, not open")
    proposals.decide(
        connection, proposal, "cancelled", decided_by=call.agent, signature=signer.signature, now_ms=call.now_ms
    )
    return proposal_info(core, proposals.find(connection, proposal_id), call.now_ms, connection)


def proposal_info(
    core: GuardianCore, proposal: Proposal, now_ms: int, connection: Connection, describe: bool = False
) -> pb.Proposal:
    """A proposal as the wire shows it (with what it would do, when describe)."""
    decision = proposal.decision_signature
    return pb.Proposal(
        id=proposal.id,
        method=proposal.method,
        operation=proposal.operation,
        proposed_by=proposal.proposed_by,
        proposer_fingerprint=proposal.proposal_signature.fingerprint,
        proposed_at_ms=proposal.proposed_at_ms,
        expires_at_ms=proposal.expires_at_ms,
        state=proposal.state_at(now_ms),
        decided_by=proposal.decided_by,
        decider_fingerprint=decision.fingerprint if decision else "",
        decided_at_ms=proposal.decided_at_ms,
        description=_description(core, proposal, connection) if describe else "",
        proposal_signature=_signed(proposal.proposal_signature),
        decision_signature=_signed(decision) if decision else None,
    )


def _signed(signature: Signature) -> pb.SignedRequest:
    return pb.SignedRequest(**vars(signature))


def _description(core: GuardianCore, proposal: Proposal, connection: Connection) -> str:
    """What approving the proposal would do, worked out against the guardian's state now."""
    proposed = proposed_request(proposal.method, proposal.request)
    rule, inner = proposed.rule, proposed.request
    lines = [f"{proposal.operation}, proposed by {proposal.proposed_by} ({proposal.proposal_signature.fingerprint})"]
    try:
        if isinstance(inner, pb.PolicyText | pb.RollbackPolicyRequest):
            probe = Call(method=proposal.method, policy=core.policy, now_ms=0, agent="")
            policy = rule.check(core, probe, inner)
            running = core.policy
            lines.append(f"puts policy {policy.version} in force in place of {running.version}")
            dropped = sorted(running.two_person.operations - policy.two_person.operations)
            if dropped:
                lines.append(f"and takes these off the two-person rule: {', '.join(dropped)}")
            diff = difflib.unified_diff(
                running.text.splitlines(keepends=True),
                policy.text.splitlines(keepends=True),
                fromfile=f"running {running.version[:12]}",
                tofile=f"proposed {policy.version[:12]}",
            )
            lines.append("".join(diff).rstrip() or "(the same text as the policy in force)")
        elif isinstance(inner, pb.QuarantineRequest):
            memory = core.memories.get_held(connection, inner.id)
            lines.append(
                f"releases memory {memory.id} (namespace {memory.namespace}, written by {memory.author},"
                f" held for {', '.join(memory.filter_hits) or 'review'}) back to the agents that may read it"
            )
        else:
            lines.append(text_format.MessageToString(inner, as_one_line=True) or "(no arguments)")
    except GuardianError as error:
        lines.append(f"it cannot run as things are now: {error.message}")
    return "\n".join(lines)
