"""guardianctl's one way to the guardian: the admin socket, and one signed call of an AdminService method.

Every request is signed (guardian/access/signed_request.py) by the key
guardian/ctl/signing.py picks, over the exact bytes sent. With ``--propose``, a
request the two-person rule covers is sent as a proposal instead: the guardian
keeps it until a different admin approves it (``guardianctl approve ID``).
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from guardian.access.signed_request import Signer, signed_metadata
from guardian.ctl.signing import signer_for
from guardian.state.config import load_config
from shared.rpc.guardian.v1 import admin_pb2

__all__ = ["DEFAULT_ADMIN_SOCKET", "Proposed", "admin_socket", "call", "call_signed"]

DEFAULT_ADMIN_SOCKET = "/run/agent-guardian/admin.sock"
_TIMEOUT_S = 15.0
#: How often a call that may be stopped looks whether it should be.
_STOP_POLL_S = 0.05
_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


class Proposed(Exception):
    """A command sent with --propose: the guardian recorded a proposal instead of running it."""

    def __init__(self, proposal: admin_pb2.Proposal) -> None:
        super().__init__(proposal.id)
        self.proposal = proposal


def admin_socket(args: argparse.Namespace) -> str:
    """The admin socket: --socket, else the one --config names, else $AGENT_GUARDIAN_ADMIN_SOCKET, else the default."""
    if args.socket:
        return str(Path(args.socket).resolve())
    if args.config:
        return str(load_config(Path(args.config)).admin_socket.path)
    return os.environ.get("AGENT_GUARDIAN_ADMIN_SOCKET", DEFAULT_ADMIN_SOCKET)


def call_signed(
    socket: str,
    signer: Signer,
    method: str,
    request: Message,
    timeout_s: float = _TIMEOUT_S,
    *,
    stop: threading.Event | None = None,
) -> Any:
    """Call one AdminService method on socket, signed by signer over the exact bytes sent; its response.

    With stop: the call is cancelled as soon as stop is set (e.g. by a SIGINT handler), and None is returned.
    The wait for the answer then happens here, in Python, so a signal is handled at once and never lands
    inside gRPC's own code.
    """
    response_class = getattr(admin_pb2, _SERVICE.methods_by_name[method].output_type.name)
    path = f"/guardian.v1.AdminService/{method}"
    data = request.SerializeToString()
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        send = channel.unary_unary(path, request_serializer=None, response_deserializer=response_class.FromString)
        metadata = signed_metadata(signer, path, data)
        if stop is None:
            return send(data, timeout=timeout_s, metadata=metadata)
        answer = send.future(data, timeout=timeout_s, metadata=metadata)
        while not answer.done():
            if stop.wait(_STOP_POLL_S):
                answer.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
                return None
        return answer.result()


def call(args: argparse.Namespace, method: str, request: Message, *, stop: threading.Event | None = None) -> Any:
    """Call one AdminService method as this command's admin; with --propose, raise Proposed instead.

    stop: as for call_signed (None returned when it was set before the answer came).
    """
    signer = signer_for(args)
    if getattr(args, "propose", False):
        proposal = admin_pb2.ProposeRequest(method=method, request=request.SerializeToString())
        raise Proposed(call_signed(admin_socket(args), signer, "Propose", proposal))
    return call_signed(admin_socket(args), signer, method, request, stop=stop)
