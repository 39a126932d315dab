"""``guardianctl``: the security team's and operators' command line.

``init`` works on a state directory directly; every other command talks to
a running guardian over its admin socket, whose file mode and group decide
who may connect, and signs its request with the admin's ed25519 key
(guardian/ctl/signing.py), whose role decides what they may do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from guardian.access.signed_request import PublicKey
from guardian.ctl.admins import add_admin_commands, add_propose_flag, print_proposal
from guardian.ctl.audit import add_audit_commands, parse_duration_ms, parse_time
from guardian.ctl.backup import add_backup_commands
from guardian.ctl.connection import DEFAULT_ADMIN_SOCKET, Proposed, call
from guardian.ctl.incidents import add_incident_commands, add_memory_commands
from guardian.ctl.keys import add_key_commands, add_session_commands
from guardian.ctl.oauth import add_oauth_commands
from guardian.ctl.output import print_json, when
from guardian.ctl.signing import add_signing_options
from guardian.state.statedir import FirstAdmin, init_state_dir
from shared.error_table import ERROR_TABLE, error_row, received_row
from shared.errors import ConfigError, InvalidArgument, Unavailable
from shared.rpc.guardian.v1 import admin_pb2

__all__ = ["main"]


def _read_policy_file(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


def cmd_init(args: argparse.Namespace) -> int:
    """guardianctl init --state-dir DIR."""
    first_admin = None
    if args.admin_key:
        public_key = PublicKey.parse(Path(args.admin_key).read_text(encoding="utf-8"))
        first_admin = FirstAdmin(args.admin or "admin", public_key)
    elif args.admin:
        first_admin = FirstAdmin(args.admin)
    report = init_state_dir(Path(args.state_dir), first_admin)
    for path in report.created:
        print(f"created  {path}")
    for path in report.kept:
        print(f"kept     {path}")
    print(f"\nStart the guardian with: agent-guardian --config {report.config}")
    return 0


def cmd_agents_add(args: argparse.Namespace) -> int:
    """guardianctl agents add NAME."""
    response = call(args, "AddAgent", admin_pb2.AddAgentRequest(name=args.name))
    if args.json:
        print(json.dumps({"name": response.name, "token": response.token}))
    else:
        print(f"agent {response.name!r} added. Its token (shown only this once; store it now):")
        print(response.token)
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    """guardianctl agents list."""
    response = call(args, "ListAgents", admin_pb2.ListAgentsRequest())
    rows = [
        {
            "name": agent.name,
            "created": when(agent.created_at_ms),
            "revoked": when(agent.revoked_at_ms),
            "sessions": agent.open_sessions,
            "memories": agent.memories,
            "locked": agent.locked,
        }
        for agent in response.agents
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':<24} {'CREATED':<21} {'REVOKED':<21} {'SESSIONS':>8} {'MEMORIES':>9}  LOCKED")
    for row in rows:
        print(
            f"{row['name']:<24} {row['created']:<21} {row['revoked']:<21} {row['sessions']:>8} {row['memories']:>9}"
            f"  {'yes' if row['locked'] else 'no'}"
        )
    return 0


def cmd_agents_revoke(args: argparse.Namespace) -> int:
    """guardianctl agents revoke NAME."""
    response = call(args, "RevokeAgent", admin_pb2.RevokeAgentRequest(name=args.name))
    print(f"agent {args.name!r} revoked; {response.sessions_ended} open session(s) ended")
    return 0


def cmd_agents_rotate_token(args: argparse.Namespace) -> int:
    """guardianctl agents rotate-token NAME [--grace DURATION]."""
    request = admin_pb2.RotateAgentTokenRequest(name=args.name, grace_ms=args.grace)
    response = call(args, "RotateAgentToken", request)
    if args.json:
        print(json.dumps({"name": response.name, "token": response.token, "grace_ms": args.grace}))
        return 0
    old = f"keeps working for {args.grace // 1000} s" if args.grace else "stopped working"
    print(f"agent {response.name!r}: new token (shown only this once; store it now); the old one {old}:")
    print(response.token)
    return 0


def cmd_agents_unlock(args: argparse.Namespace) -> int:
    """guardianctl agents unlock NAME."""
    response = call(args, "UnlockAgent", admin_pb2.UnlockAgentRequest(name=args.name))
    state = "was locked; unlocked" if response.was_locked else "was not locked"
    print(f"agent {args.name!r} {state}; its rate-limit cooldowns are cleared")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """guardianctl stats [--since T] [--until T]: requests by agent, operation and decision; memories; keys."""
    stats = call(args, "Stats", admin_pb2.StatsRequest(since_ms=args.since or 0, until_ms=args.until or 0))
    if args.json:
        print_json(MessageToDict(stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
        return 0
    print(f"requests from {when(stats.since_ms)} to {when(stats.until_ms)}:")
    print(f"  {'AGENT':<28} {'OPERATION':<28} {'DECISION':<8} {'COUNT':>9}")
    for row in stats.requests:
        print(f"  {row.agent or '-':<28} {row.operation:<28} {row.decision:<8} {row.count:>9}")
    print(f"memories by namespace ({stats.quarantined} quarantined in all; {stats.open_incidents} open incidents):")
    for namespace in stats.namespaces:
        print(f"  {namespace.namespace:<28} active {namespace.active:>9}  quarantined {namespace.quarantined:>7}")
    print("primary keys:")
    for key in stats.primary_keys:
        age = f"{key.age_ms // 86_400_000} days" if key.age_ms else "age unknown"
        print(f"  {key.ring:<9} {key.key_id:<24} created {when(key.created_at_ms)}  ({age})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """guardianctl status: exit 0 when ready with nothing to fix, 1 when not ready or something needs fixing."""
    status = call(args, "Status", admin_pb2.StatusRequest())
    if args.json:
        print_json(
            {
                "ready": status.ready,
                "checks": dict(status.checks),
                "warnings": dict(status.warnings),
                "policy_version": status.policy_version,
                "policy_file_refusal": status.policy_file_refusal or None,
                "sessions_open": status.sessions_open,
                "audit_chain_rows": status.audit_chain_rows,
                "database_size_bytes": status.database_size_bytes,
                "recall": {
                    "index_ready": status.recall_index_ready,
                    "vectors_indexed": status.vectors_indexed,
                    "memories_to_embed": status.memories_to_embed,
                    "embedding_model": status.embedding_model,
                    "index_training": status.recall_index_training,
                },
            }
        )
    else:
        print(f"ready: {'yes' if status.ready else 'NO'}")
        for name, finding in sorted(status.checks.items()):
            print(f"  {name}: {finding}")
        print(f"policy in force: {status.policy_version}")
        if status.policy_file_refusal:
            print(
                f"WARNING: the policy file is refused ({status.policy_file_refusal}); the guardian runs the last"
                " policy in force. Fix the file, then `systemctl reload agent-guardian` (or send SIGHUP)."
            )
        for name, warning in sorted(status.warnings.items()):
            if name != "policy_file":
                print(f"WARNING: {name}: {warning}")
        print(f"sessions open: {status.sessions_open}")
        print(f"audit chain rows: {status.audit_chain_rows}")
        print(f"database size: {status.database_size_bytes} bytes")
        index = "ready" if status.recall_index_ready else "loading (searches rank by words alone until it is)"
        print(
            f"recall by meaning: vector index {index}, {status.vectors_indexed} vectors; model {status.embedding_model}"
        )
        if status.memories_to_embed:
            print(f"  {status.memories_to_embed} memories still to embed (in the background)")
        if status.recall_index_training:
            print("  a large namespace's index is being reorganised (in the background)")
    return 0 if status.ready and not status.warnings else 1


def cmd_policy_show(args: argparse.Namespace) -> int:
    """guardianctl policy show."""
    info = call(args, "ShowPolicy", admin_pb2.ShowPolicyRequest())
    if args.json:
        print_json(
            {
                "version": info.version,
                "applied_at": when(info.applied_at_ms),
                "applied_by": info.applied_by,
                "source": info.source,
                "text": info.text,
            }
        )
        return 0
    print(f"# version {info.version}, in force since {when(info.applied_at_ms)} ({info.source}, {info.applied_by})")
    print(info.text, end="" if info.text.endswith("\n") else "\n")
    return 0


def cmd_policy_validate(args: argparse.Namespace) -> int:
    """guardianctl policy validate FILE."""
    response = call(args, "ValidatePolicy", admin_pb2.PolicyText(text=_read_policy_file(args.file)))
    if args.json:
        print_json({"valid": True, "version": response.version, "summary": list(response.summary)})
        return 0
    print(f"{args.file}: valid, version {response.version}")
    for line in response.summary:
        print(f"  {line}")
    return 0


def cmd_policy_diff(args: argparse.Namespace) -> int:
    """guardianctl policy diff FILE: exit 0 when identical, 1 when it differs (like diff)."""
    response = call(args, "DiffPolicy", admin_pb2.PolicyText(text=_read_policy_file(args.file)))
    if args.json:
        print_json({"running": response.running_version, "new": response.new_version, "diff": response.diff})
    elif response.running_version == response.new_version:
        print(f"no change: {args.file} is the policy in force ({response.running_version[:12]})")
    else:
        print(response.diff or "(the same rules; only formatting differs)", end="")
    return 0 if response.running_version == response.new_version else 1


def _print_applied(args: argparse.Namespace, response: Any) -> int:
    if args.json:
        print_json(
            {"version": response.version, "previous": response.previous_version, "unchanged": response.unchanged}
        )
    elif response.unchanged:
        print(f"unchanged: version {response.version[:12]} is already in force")
    else:
        print(f"policy {response.version} in force (was {response.previous_version[:12]})")
    return 0


def cmd_policy_apply(args: argparse.Namespace) -> int:
    """guardianctl policy apply FILE."""
    response = call(args, "ApplyPolicy", admin_pb2.PolicyText(text=_read_policy_file(args.file)))
    return _print_applied(args, response)


def cmd_policy_rollback(args: argparse.Namespace) -> int:
    """guardianctl policy rollback VERSION."""
    response = call(args, "RollbackPolicy", admin_pb2.RollbackPolicyRequest(version=args.version))
    return _print_applied(args, response)


def cmd_policy_history(args: argparse.Namespace) -> int:
    """guardianctl policy history."""
    response = call(args, "PolicyHistory", admin_pb2.PolicyHistoryRequest(limit=args.limit))
    rows = [
        {"seq": e.seq, "version": e.version, "at": when(e.applied_at_ms), "by": e.applied_by, "source": e.source}
        for e in response.entries
    ]
    if args.json:
        print_json(rows)
        return 0
    print(f"{'SEQ':>5}  {'VERSION':<14} {'APPLIED AT':<21} {'SOURCE':<9} BY")
    for row in rows:
        print(f"{row['seq']:>5}  {row['version'][:12]:<14} {row['at']:<21} {row['source']:<9} {row['by']}")
    return 0


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    """guardianctl quarantine list."""
    response = call(args, "ListQuarantine", admin_pb2.ListQuarantineRequest(limit=args.limit, after_id=args.after))
    rows = [_held_row(memory) for memory in response.memories]
    if args.json:
        print_json(rows)
        return 0
    print(f"{'ID':<37} {'NAMESPACE':<20} {'AUTHOR':<20} {'CREATED':<21} {'BYTES':>7}  RULES")
    for row in rows:
        print(
            f"{row['id']:<37} {row['namespace']:<20} {row['author']:<20} {row['created']:<21} {row['bytes']:>7}"
            f"  {','.join(row['rules'])}"
        )
    return 0


def _held_row(memory: Any) -> dict[str, Any]:
    return {
        "id": memory.id,
        "namespace": memory.namespace,
        "author": memory.author,
        "created": when(memory.created_at_ms),
        "bytes": memory.content_bytes,
        "rules": list(memory.rules),
        "source": memory.source,
        "session": memory.session,
        "derived_from": list(memory.derived_from),
        "trust": memory.trust or "-",
    }


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    """guardianctl quarantine show ID."""
    response = call(args, "ShowQuarantined", admin_pb2.QuarantineRequest(id=args.id))
    row = _held_row(response.memory) | {
        "tags": list(response.tags),
        "metadata": json.loads(response.metadata_json or "{}"),
        "content": response.content,
    }
    if args.json:
        print_json(row)
        return 0
    for key in ("id", "namespace", "author", "created", "bytes", "rules", "source", "session", "trust", "tags"):
        print(f"{key + ':':<13}{row[key]}")
    print(f"{'derived from:':<13}{', '.join(row['derived_from']) or '-'}")
    print(f"{'metadata:':<13}{row['metadata']}")
    print("content:")
    print(response.content)
    return 0


def cmd_quarantine_release(args: argparse.Namespace) -> int:
    """guardianctl quarantine release ID."""
    response = call(args, "ReleaseQuarantined", admin_pb2.QuarantineRequest(id=args.id))
    print(f"released {response.id}: agents of its namespace can see it again")
    return 0


def cmd_quarantine_purge(args: argparse.Namespace) -> int:
    """guardianctl quarantine purge ID."""
    response = call(args, "PurgeQuarantined", admin_pb2.QuarantineRequest(id=args.id))
    print(f"purged {response.id}: deleted for good")
    return 0


def _add_agent_commands(commands: Any) -> None:
    agents = commands.add_parser("agents", help="add, list, revoke or unlock agents; rotate their tokens")
    agent_commands = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    add = agent_commands.add_parser("add", help="register an agent and print its token once")
    add.add_argument("name", help="1-64 letters, digits, '.', '_' or '-'")
    add_propose_flag(add)
    add.set_defaults(func=cmd_agents_add)
    listing = agent_commands.add_parser("list", help="list agents with their sessions and memory counts")
    listing.set_defaults(func=cmd_agents_list)
    revoke = agent_commands.add_parser("revoke", help="refuse an agent's token and end its sessions")
    revoke.add_argument("name")
    add_propose_flag(revoke)
    revoke.set_defaults(func=cmd_agents_revoke)
    rotate = agent_commands.add_parser(
        "rotate-token",
        help="issue a new token for an agent and print it once",
        description="The new token works at once; open sessions stay open. The old token stops working now,"
        " or after --grace (e.g. 10m, 1h; at most 7d), while the agent's gateway is given the new one.",
    )
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=parse_duration_ms, default=0, help="how long the old token still works")
    rotate.set_defaults(func=cmd_agents_rotate_token)
    unlock = agent_commands.add_parser("unlock", help="lift an anomaly lock and rate-limit cooldowns from an agent")
    unlock.add_argument("name")
    unlock.set_defaults(func=cmd_agents_unlock)


def _add_init_command(commands: Any) -> None:
    init = commands.add_parser(
        "init",
        help="create a working state dir (safe to run twice)",
        description="Creates the config, policy, keys and database. The first admin (role security) is enrolled"
        " when the guardian first starts: --admin NAME --admin-key FILE.pub names them; without --admin-key, init"
        " makes a key for the user running it in the state dir (admin.key), for local use.",
    )
    init.add_argument("--state-dir", required=True, help="directory to create or complete")
    init.add_argument("--admin", default="", help="the first admin's name (default: your login name)")
    init.add_argument("--admin-key", default="", help="the first admin's ed25519 public key (a .pub file)")
    init.set_defaults(func=cmd_init)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardianctl",
        description="Administer an agent-guardian: its state dir, agents, sessions, policy, quarantine, audit"
        " trail, keys and backups. Every command but init, `backup verify PATH` and `backup restore` talks to the"
        " running guardian over its admin socket.",
        epilog=_exit_status_help(),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        help=f"admin socket path (default: $AGENT_GUARDIAN_ADMIN_SOCKET or {DEFAULT_ADMIN_SOCKET})",
    )
    where.add_argument(
        "--config",
        help="take the admin socket path from this guardian config.yaml (and, for the offline backup"
        " commands, the state dir and keys)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_signing_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_init_command(commands)

    status = commands.add_parser(
        "status",
        help="is the guardian ready, and is there anything to fix (e.g. a refused policy file)",
        description="Prints each readiness check, warnings (such as a policy file the guardian refused, while it"
        " runs the last policy in force), the policy version and the state at a glance. Exit status 0: ready and"
        " nothing to fix; 1: not ready or a warning.",
    )
    status.set_defaults(func=cmd_status)
    stats = commands.add_parser(
        "stats", help="requests by agent, operation and decision (default: last 24 h); memories; key ages"
    )
    stats.add_argument("--since", type=parse_time, help="from this time: ISO 8601 or an age (2h, 7d)")
    stats.add_argument("--until", type=parse_time, help="before this time")
    stats.set_defaults(func=cmd_stats)

    _add_agent_commands(commands)

    policy = commands.add_parser("policy", help="show, check, change or roll back the policy")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    policy_commands.add_parser("show", help="print the policy in force, with its version").set_defaults(
        func=cmd_policy_show
    )
    for name, func, text in (
        ("validate", cmd_policy_validate, "check a policy file without applying it"),
        ("diff", cmd_policy_diff, "show what applying a policy file would change (exit 1 if it differs)"),
        ("apply", cmd_policy_apply, "validate a policy file and put it in force atomically"),
    ):
        sub = policy_commands.add_parser(name, help=text)
        sub.add_argument("file", help="policy YAML file ('-' for standard input)")
        if name == "apply":
            add_propose_flag(sub)
        sub.set_defaults(func=func)
    history = policy_commands.add_parser("history", help="every policy put in force, newest first")
    history.add_argument("--limit", type=int, default=50)
    history.set_defaults(func=cmd_policy_history)
    rollback = policy_commands.add_parser("rollback", help="put an earlier version from the history back in force")
    rollback.add_argument("version", help="a version from `policy history` (at least its first 8 hex digits)")
    add_propose_flag(rollback)
    rollback.set_defaults(func=cmd_policy_rollback)

    quarantine = commands.add_parser("quarantine", help="memories a content filter holds back from agents")
    quarantine_commands = quarantine.add_subparsers(dest="quarantine_command", required=True, metavar="ACTION")
    held = quarantine_commands.add_parser("list", help="list held memories, oldest first")
    held.add_argument("--limit", type=int, default=100)
    held.add_argument("--after", default="", help="continue after this id")
    held.set_defaults(func=cmd_quarantine_list)
    for name, func, text in (
        ("show", cmd_quarantine_show, "print one held memory, content included"),
        ("release", cmd_quarantine_release, "make a held memory visible to agents"),
        ("purge", cmd_quarantine_purge, "delete a held memory for good"),
    ):
        sub = quarantine_commands.add_parser(name, help=text)
        sub.add_argument("id", help="a memory id from `quarantine list`")
        if name == "release":
            add_propose_flag(sub)
        sub.set_defaults(func=func)
    add_audit_commands(commands)
    add_incident_commands(commands)
    add_memory_commands(commands)
    add_session_commands(commands)
    add_key_commands(commands)
    add_backup_commands(commands)
    add_admin_commands(commands)
    add_oauth_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``guardianctl``."""
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except Proposed as proposed:
        print_proposal(args, proposed.proposal)
        if not args.json:
            print(f"\nNot done yet: a different admin approves it with: guardianctl approve {proposed.proposal.id}")
        return 0
    except InvalidArgument as error:  # a bad value given on the command line (e.g. a malformed public key)
        print(f"guardianctl: {error.message}", file=sys.stderr)
        return error_row(error).exit_code
    except ConfigError as error:  # its message names the file and what is wrong with it
        print(f"guardianctl: {error.message}", file=sys.stderr)
        return error_row(error).exit_code
    except grpc.RpcError as error:
        return _report_rpc_error(error)
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


_UNREACHABLE = "cannot reach the guardian's admin socket (is it running, and may this user connect?)"


def _report_rpc_error(error: Any) -> int:
    """Print ``guardianctl: <what kind of error>: <details>`` and return its exit code, both from the error table."""
    row = received_row(error.code().name)
    text = _UNREACHABLE if row.error is Unavailable else (error.details() or "").strip() or row.default_message
    print(f"guardianctl: {row.cli_prefix}" + ("" if text == row.cli_prefix else f": {text}"), file=sys.stderr)
    return row.exit_code


def _exit_status_help() -> str:
    """The exit statuses, for --help: each with what guardianctl prints before the message."""
    meanings: dict[int, list[str]] = {0: ["done"]}
    for row in ERROR_TABLE:
        meanings.setdefault(row.exit_code, []).append(row.cli_prefix)
    meanings[error_row(ConfigError).exit_code].append("a bad command line")
    return "exit status: " + "; ".join(f"{code} {', '.join(meanings[code])}" for code in sorted(meanings)) + "."


if __name__ == "__main__":
    sys.exit(main())
