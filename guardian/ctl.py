"""``guardianctl``: the security team's and operators' command line.

``init`` works on a state directory directly; every other command talks to
a running guardian over its admin socket, whose file mode and group decide
who may use it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from guardian.config import load_config
from guardian.statedir import init_state_dir
from shared.errors import ConfigError
from shared.rpc.guardian.v1 import admin_pb2, admin_pb2_grpc

__all__ = ["main"]

DEFAULT_ADMIN_SOCKET = "/run/agent-guardian/admin.sock"
_TIMEOUT_S = 15.0


def _admin_socket(args: argparse.Namespace) -> str:
    if args.socket:
        return str(Path(args.socket).resolve())
    if args.config:
        return str(load_config(Path(args.config)).admin_socket.path)
    return os.environ.get("AGENT_GUARDIAN_ADMIN_SOCKET", DEFAULT_ADMIN_SOCKET)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
    channel = grpc.insecure_channel(f"unix:{_admin_socket(args)}")
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_init(args: argparse.Namespace) -> int:
    """guardianctl init --state-dir DIR."""
    report = init_state_dir(Path(args.state_dir))
    for path in report.created:
        print(f"created  {path}")
    for path in report.kept:
        print(f"kept     {path}")
    print(f"\nStart the guardian with: agent-guardian --config {report.config}")
    return 0


def cmd_agents_add(args: argparse.Namespace) -> int:
    """guardianctl agents add NAME."""
    channel, stub = _stub(args)
    with channel:
        response = stub.AddAgent(admin_pb2.AddAgentRequest(name=args.name), timeout=_TIMEOUT_S)
    if args.json:
        print(json.dumps({"name": response.name, "token": response.token}))
    else:
        print(f"agent {response.name!r} added. Its token (shown only this once; store it now):")
        print(response.token)
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    """guardianctl agents list."""
    channel, stub = _stub(args)
    with channel:
        response = stub.ListAgents(admin_pb2.ListAgentsRequest(), timeout=_TIMEOUT_S)
    rows = [
        {
            "name": agent.name,
            "created": _when(agent.created_at_ms),
            "revoked": _when(agent.revoked_at_ms),
            "sessions": agent.open_sessions,
            "memories": agent.memories,
        }
        for agent in response.agents
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':<24} {'CREATED':<21} {'REVOKED':<21} {'SESSIONS':>8} {'MEMORIES':>9}")
    for row in rows:
        print(f"{row['name']:<24} {row['created']:<21} {row['revoked']:<21} {row['sessions']:>8} {row['memories']:>9}")
    return 0


def cmd_agents_revoke(args: argparse.Namespace) -> int:
    """guardianctl agents revoke NAME."""
    channel, stub = _stub(args)
    with channel:
        response = stub.RevokeAgent(admin_pb2.RevokeAgentRequest(name=args.name), timeout=_TIMEOUT_S)
    print(f"agent {args.name!r} revoked; {response.sessions_ended} open session(s) ended")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardianctl",
        description="Administer an agent-guardian: create its state dir, manage agents.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        help=f"admin socket path (default: $AGENT_GUARDIAN_ADMIN_SOCKET or {DEFAULT_ADMIN_SOCKET})",
    )
    where.add_argument("--config", help="take the admin socket path from this guardian config.yaml")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create a working state dir (safe to run twice)")
    init.add_argument("--state-dir", required=True, help="directory to create or complete")
    init.set_defaults(func=cmd_init)

    agents = commands.add_parser("agents", help="add, list or revoke agents")
    agent_commands = agents.add_subparsers(dest="agents_command", required=True, metavar="ACTION")
    add = agent_commands.add_parser("add", help="register an agent and print its token once")
    add.add_argument("name", help="1-64 letters, digits, '.', '_' or '-'")
    add.set_defaults(func=cmd_agents_add)
    listing = agent_commands.add_parser("list", help="list agents with their sessions and memory counts")
    listing.set_defaults(func=cmd_agents_list)
    revoke = agent_commands.add_parser("revoke", help="refuse an agent's token and end its sessions")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_agents_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``guardianctl``."""
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except ConfigError as error:
        print(f"guardianctl: {error.message}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        return _report_rpc_error(error)


def _report_rpc_error(error: Any) -> int:
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        print(
            "guardianctl: cannot reach the guardian's admin socket (is it running, and may this user connect?)",
            file=sys.stderr,
        )
        return 3
    print(f"guardianctl: {code.name.lower()}: {error.details()}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
