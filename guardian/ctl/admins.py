"""guardianctl's commands for the people who administer the guardian and the two-person rule.

``admins add|remove|list``, ``whoami``, ``proposals list|show|cancel`` and
``approve ID``, which shows what the proposal would do and asks before it runs
it (``--yes`` to skip the question). ``--propose`` on a command the rule may
cover sends it as a proposal (guardian/ctl/connection.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict

from guardian.ctl.connection import call
from guardian.ctl.output import print_json, when
from shared.errors import ConfigError
from shared.rpc.guardian.v1 import admin_pb2 as pb

__all__ = ["add_admin_commands", "add_propose_flag", "print_proposal"]

_SERVICE = pb.DESCRIPTOR.services_by_name["AdminService"]


def add_propose_flag(parser: argparse.ArgumentParser) -> None:
    """Give a command the two-person rule may cover its --propose flag."""
    parser.add_argument(
        "--propose",
        action="store_true",
        help="do not run it: record it as a proposal, which a different admin approves (guardianctl approve ID)",
    )


def _public_key_text(value: str) -> str:
    """--public-key: the key itself ("ssh-ed25519 AAAA...") or a .pub file holding it."""
    if value.startswith("ssh-"):
        return value
    try:
        return Path(value).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(f"the public key file {value} cannot be read: {error.strerror}") from None


def print_proposal(args: argparse.Namespace, proposal: pb.Proposal) -> None:
    """A proposal as guardianctl shows it."""
    if args.json:
        print_json(MessageToDict(proposal, preserving_proto_field_name=True))
        return
    print(f"proposal {proposal.id}: {proposal.operation} ({proposal.state})")
    print(f"  proposed by {proposal.proposed_by} ({proposal.proposer_fingerprint}) at {when(proposal.proposed_at_ms)}")
    print(f"  expires     {when(proposal.expires_at_ms)}")
    if proposal.decided_by:
        decided = f"{proposal.decided_by} ({proposal.decider_fingerprint})"
        print(f"  {proposal.state} by {decided} at {when(proposal.decided_at_ms)}")
    if proposal.description:
        print("\nWhat approving it does:\n" + proposal.description)


def _print_admin(args: argparse.Namespace, admin: pb.AdminInfo) -> None:
    if args.json:
        print_json(MessageToDict(admin, preserving_proto_field_name=True))
    else:
        print(f"{admin.name}\t{admin.role}\t{admin.fingerprint}\tadded {when(admin.added_at_ms)} by {admin.added_by}")


def cmd_admins_add(args: argparse.Namespace) -> int:
    """guardianctl admins add NAME --public-key KEY --role ROLE."""
    request = pb.AddAdminRequest(name=args.name, public_key=_public_key_text(args.public_key), role=args.role)
    _print_admin(args, call(args, "AddAdmin", request))
    return 0


def cmd_admins_remove(args: argparse.Namespace) -> int:
    """guardianctl admins remove NAME."""
    _print_admin(args, call(args, "RemoveAdmin", pb.RemoveAdminRequest(name=args.name)))
    return 0


def cmd_admins_list(args: argparse.Namespace) -> int:
    """guardianctl admins list."""
    for admin in call(args, "ListAdmins", pb.ListAdminsRequest()).admins:
        _print_admin(args, admin)
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    """guardianctl whoami."""
    _print_admin(args, call(args, "WhoAmI", pb.WhoAmIRequest()))
    return 0


def cmd_proposals_list(args: argparse.Namespace) -> int:
    """guardianctl proposals list [--all]."""
    for proposal in call(args, "ListProposals", pb.ListProposalsRequest(all=args.all)).proposals:
        if args.json:
            print_json(MessageToDict(proposal, preserving_proto_field_name=True))
        else:
            print(
                f"{proposal.id}\t{proposal.state}\t{proposal.operation}\tby {proposal.proposed_by}"
                f"\texpires {when(proposal.expires_at_ms)}"
            )
    return 0


def cmd_proposals_show(args: argparse.Namespace) -> int:
    """guardianctl proposals show ID."""
    print_proposal(args, call(args, "ShowProposal", pb.ShowProposalRequest(id=args.id)))
    return 0


def cmd_proposals_cancel(args: argparse.Namespace) -> int:
    """guardianctl proposals cancel ID."""
    print_proposal(args, call(args, "CancelProposal", pb.CancelProposalRequest(id=args.id)))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    """guardianctl approve ID [--yes]: show what it does, ask, then run it signed by this admin."""
    proposal = call(args, "ShowProposal", pb.ShowProposalRequest(id=args.id))
    print_proposal(argparse.Namespace(**{**vars(args), "json": False}), proposal)
    if proposal.state != "open":
        print(f"guardianctl: the proposal is {proposal.state}; nothing to approve", file=sys.stderr)
        return 1
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("approve asks before it runs a proposal: pass --yes to approve without the question")
        if input("\nApprove and run it now? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not approved")
            return 1
    answer = call(args, "Approve", pb.ApproveRequest(id=args.id))
    response_class: Any = getattr(pb, _SERVICE.methods_by_name[proposal.method].output_type.name)
    result = MessageToDict(response_class.FromString(answer.response), preserving_proto_field_name=True)
    if args.json:
        print_json({"proposal": args.id, "method": proposal.method, "response": result})
    else:
        print(f"\napproved and done: {proposal.operation}")
        for key, value in result.items():
            print(f"  {key}: {value}")
    return 0


def add_admin_commands(commands: Any) -> None:
    """Register ``admins``, ``whoami``, ``proposals`` and ``approve``."""
    admins = commands.add_parser("admins", help="the people who may administer the guardian, their keys and roles")
    actions = admins.add_subparsers(dest="admins_command", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="enrol a person: a name, their ed25519 public key and a role",
        description="Roles: viewer (audit, status, stats), operator (also backups and sessions), security"
        " (everything: policy, agents, quarantine, keys, incidents, admins).",
    )
    add.add_argument("name", help="1-64 letters, digits, '.', '_' or '-'")
    add.add_argument(
        "--public-key", required=True, help="'ssh-ed25519 AAAA...' or a .pub file (e.g. ~/.ssh/id_ed25519.pub)"
    )
    add.add_argument("--role", required=True, choices=["viewer", "operator", "security"])
    add_propose_flag(add)
    add.set_defaults(func=cmd_admins_add)
    remove = actions.add_parser("remove", help="remove a person (never the last with the security role)")
    remove.add_argument("name")
    add_propose_flag(remove)
    remove.set_defaults(func=cmd_admins_remove)
    actions.add_parser("list", help="every enrolled person").set_defaults(func=cmd_admins_list)
    commands.add_parser("whoami", help="the admin this command signs as").set_defaults(func=cmd_whoami)

    proposals = commands.add_parser("proposals", help="requests waiting for a second person (the two-person rule)")
    proposal_actions = proposals.add_subparsers(dest="proposals_command", required=True, metavar="ACTION")
    listing = proposal_actions.add_parser("list", help="open proposals, newest first")
    listing.add_argument("--all", action="store_true", help="also approved, expired and cancelled ones")
    listing.set_defaults(func=cmd_proposals_list)
    show = proposal_actions.add_parser("show", help="one proposal, with what approving it would do now")
    show.add_argument("id")
    show.set_defaults(func=cmd_proposals_show)
    cancel = proposal_actions.add_parser("cancel", help="withdraw an open proposal")
    cancel.add_argument("id")
    cancel.set_defaults(func=cmd_proposals_cancel)
    approve = commands.add_parser(
        "approve", help="approve another admin's proposal: shows what it does, asks, then runs it"
    )
    approve.add_argument("id", help="a proposal id (prop_...) from `proposals list`")
    approve.add_argument("--yes", action="store_true", help="approve without asking")
    approve.set_defaults(func=cmd_approve)
