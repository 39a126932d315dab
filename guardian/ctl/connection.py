"""guardianctl's one way to the guardian: the admin socket, and one call of an AdminService method."""

from __future__ import annotations

import argparse
import os
import pwd
from pathlib import Path
from typing import Any

import grpc

from guardian.state.config import load_config
from shared.formats import OPERATOR_METADATA_KEY
from shared.rpc.guardian.v1 import admin_pb2_grpc

__all__ = ["DEFAULT_ADMIN_SOCKET", "admin_socket", "call"]

DEFAULT_ADMIN_SOCKET = "/run/agent-guardian/admin.sock"
_TIMEOUT_S = 15.0


def admin_socket(args: argparse.Namespace) -> str:
    """The admin socket: --socket, else the one --config names, else $AGENT_GUARDIAN_ADMIN_SOCKET, else the default."""
    if args.socket:
        return str(Path(args.socket).resolve())
    if args.config:
        return str(load_config(Path(args.config)).admin_socket.path)
    return os.environ.get("AGENT_GUARDIAN_ADMIN_SOCKET", DEFAULT_ADMIN_SOCKET)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, admin_pb2_grpc.AdminServiceStub]:
    channel = grpc.insecure_channel(f"unix:{admin_socket(args)}")
    return channel, admin_pb2_grpc.AdminServiceStub(channel)


def _operator() -> str:
    """The login name this command runs as, which the guardian records as claimed (not proven)."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid-{os.getuid()}"
    return os.environ.get("SUDO_USER", name) if os.getuid() == 0 else name


def call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """Call one AdminService method, naming the operator in the call's metadata."""
    channel, stub = _stub(args)
    with channel:
        return getattr(stub, method)(request, timeout=_TIMEOUT_S, metadata=((OPERATOR_METADATA_KEY, _operator()),))
