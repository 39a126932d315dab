"""The properties every fuzzed gRPC call is held to, and how a call is sent.

For each method of both services, :data:`ALLOWED` lists the status codes it
may legitimately answer bad input with; anything else fails the property
(INTERNAL and UNKNOWN above all; DEADLINE_EXCEEDED is a hang, UNAVAILABLE with
the process gone a crash). An OK answer must parse as the method's response
type with no unknown fields. No answer, OK or not, may contain a forbidden
string (a planted marker, a token, a key). On the agent socket every memory
returned must be in a namespace the fuzzing agent may read, never a planted
one, and (for reads) active; an Update or Delete of a planted memory must not
succeed.

A method a proto gains later is fuzzed automatically (the tests enumerate the
descriptors) but fails until it has its row in :data:`ALLOWED`: deciding which
refusals are legitimate is part of adding a method.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.formats import RETRY_AFTER_METADATA_KEY
from shared.rpc.guardian.v1 import admin_pb2, agent_pb2
from tests.fuzz import counting
from tests.fuzz.world import memories_in
from tests.support.harness import Guardian

__all__ = [
    "ADMIN_SERVICE",
    "AGENT_SERVICE",
    "ALLOWED",
    "Answer",
    "budget_s",
    "check_answer",
    "check_process",
    "fail",
    "methods",
    "send",
    "wait_responsive",
]

AGENT_SERVICE: Final = "guardian.v1.AgentService"
ADMIN_SERVICE: Final = "guardian.v1.AdminService"
_C = grpc.StatusCode

#: Every agent call names a session (or a token), may be malformed, and may be refused by the policy
#: (an operation the profile lacks, outside allowed hours, a locked session or agent).
_AGENT_BASE: Final = frozenset({_C.OK, _C.INVALID_ARGUMENT, _C.UNAUTHENTICATED, _C.PERMISSION_DENIED})
#: Admin calls take no session and no rate limit, and the fuzzer signs them as an admin with the
#: security role: only the request itself can be wrong.
_ADMIN_BASE: Final = frozenset({_C.OK, _C.INVALID_ARGUMENT})

#: The status codes each method may answer with, by service and method.
ALLOWED: Final[dict[str, dict[str, frozenset[grpc.StatusCode]]]] = {
    AGENT_SERVICE: {
        "OpenSession": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED},  # session-open rate, sessions per agent
        "CloseSession": _AGENT_BASE,  # not rate limited
        "Store": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED},
        "StoreBatch": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED},
        "Get": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED, _C.NOT_FOUND},
        "Search": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED},
        "List": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED},
        "Update": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED, _C.NOT_FOUND},
        "Delete": _AGENT_BASE | {_C.RESOURCE_EXHAUSTED, _C.NOT_FOUND},
    },
    ADMIN_SERVICE: {
        "AddAgent": _ADMIN_BASE | {_C.FAILED_PRECONDITION},  # the name is taken
        "ListAgents": _ADMIN_BASE,
        "RevokeAgent": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},  # already revoked
        "UnlockAgent": _ADMIN_BASE | {_C.NOT_FOUND},
        "ShowPolicy": _ADMIN_BASE,
        "Status": _ADMIN_BASE,
        "ValidatePolicy": _ADMIN_BASE,
        "DiffPolicy": _ADMIN_BASE,
        "ApplyPolicy": _ADMIN_BASE,
        "PolicyHistory": _ADMIN_BASE,
        "RollbackPolicy": _ADMIN_BASE | {_C.NOT_FOUND},
        "ListQuarantine": _ADMIN_BASE,
        "ShowQuarantined": _ADMIN_BASE | {_C.NOT_FOUND},
        "ReleaseQuarantined": _ADMIN_BASE | {_C.NOT_FOUND},
        "PurgeQuarantined": _ADMIN_BASE | {_C.NOT_FOUND},
        "QueryAudit": _ADMIN_BASE,
        "VerifyAudit": _ADMIN_BASE,
        "WhoRead": _ADMIN_BASE,
        "OpenIncident": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},  # nothing matches; too many
        "ListIncidents": _ADMIN_BASE,
        "ReportIncident": _ADMIN_BASE | {_C.NOT_FOUND},
        "CloseIncident": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},  # already closed
        "RescanMemories": _ADMIN_BASE,
        "Stats": _ADMIN_BASE,
        "RotateAgentToken": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},  # revoked
        "ListSessions": _ADMIN_BASE,
        "RevokeSession": _ADMIN_BASE | {_C.NOT_FOUND},
        "ListKeys": _ADMIN_BASE,
        "RotateKey": _ADMIN_BASE,
        "ResignMemories": _ADMIN_BASE,
        "RetireKey": _ADMIN_BASE | {_C.FAILED_PRECONDITION},  # a primary, base or audit key, or still in use
        "CreateBackup": _ADMIN_BASE | {_C.FAILED_PRECONDITION},  # another backup is being made
        "ListBackups": _ADMIN_BASE,
        "ReadBackup": _ADMIN_BASE | {_C.NOT_FOUND},
        "VerifyBackup": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},  # not under any key
        # -- admins and the two-person rule (issue 17.1-3) --
        "AddAdmin": _ADMIN_BASE | {_C.FAILED_PRECONDITION},  # the name or the key is enrolled
        "RemoveAdmin": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},  # the last security admin
        "ListAdmins": _ADMIN_BASE,
        "WhoAmI": _ADMIN_BASE,
        # The proposed request is checked as it would run: its own refusals.
        "Propose": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},
        "ListProposals": _ADMIN_BASE,
        "ShowProposal": _ADMIN_BASE | {_C.NOT_FOUND},
        "CancelProposal": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION},  # no longer open
        # One's own proposal; not open; then whatever the proposed request answers.
        "Approve": _ADMIN_BASE | {_C.NOT_FOUND, _C.FAILED_PRECONDITION, _C.PERMISSION_DENIED},
        # -- audit export (issue 17.4) --
        "ExportAudit": _ADMIN_BASE,  # bounds past the largest sequence number, a page over 1000, a bad link
        "AuditSigningKeys": _ADMIN_BASE,
    },
}

#: Agent methods that only read: what they return must be active (never quarantined) memories.
_READS: Final = frozenset({"Get", "Search", "List"})
#: Agent methods that act on the memory their request names.
_BY_ID: Final = frozenset({"Get", "Update", "Delete"})
#: A call answers within this long (plus the terms of :func:`budget_s`), or it hangs.
_BASE_BUDGET_S: Final = 2.0
_PER_MIB_S: Final = 16.0


def methods(module: ModuleType, service: str) -> list[MethodDescriptor]:
    """The methods of a service, from its generated module's descriptor."""
    return list(module.DESCRIPTOR.services_by_name[service].methods)


def every_method() -> list[MethodDescriptor]:
    """Every method of both services."""
    return methods(agent_pb2, "AgentService") + methods(admin_pb2, "AdminService")


def fail(prop: str, message: str) -> None:
    """Count a failing input of ``prop`` and fail the test with ``message``."""
    counting.failed(prop)
    raise AssertionError(f"{prop}: {message}")


@dataclass(frozen=True)
class Answer:
    """What one raw call came back with."""

    code: grpc.StatusCode
    details: str
    payload: bytes
    trailing: tuple[Any, ...]
    seconds: float
    #: The deadline the call was given.
    budget_s: float


def budget_s(method: MethodDescriptor, payload: bytes, audit_rows: int) -> float:
    """How long the call may take before it counts as a hang.

    Two seconds, plus 16 s per MiB of request (the YAML parser is slow on a large policy),
    plus what the request asks to wait (QueryAudit's wait_ms), plus time to walk a long audit chain.
    """
    budget = _BASE_BUDGET_S + _PER_MIB_S * len(payload) / 2**20
    if method.name == "QueryAudit":
        with contextlib.suppress(DecodeError):
            budget += min(admin_pb2.AuditQuery.FromString(payload).wait_ms, 10_000) / 1000
    if method.name == "VerifyAudit":
        budget += audit_rows / 5_000
    return budget


def send(channel: grpc.Channel, method: MethodDescriptor, payload: bytes, timeout_s: float) -> Answer:
    """Send payload as the request of method, unparsed both ways."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    started = time.monotonic()
    try:
        response, rpc = call.with_call(payload, timeout=timeout_s)
    except grpc.RpcError as error:
        trailing = tuple(error.trailing_metadata() or ())
        return Answer(error.code(), error.details() or "", b"", trailing, time.monotonic() - started, timeout_s)
    return Answer(_C.OK, "", response, tuple(rpc.trailing_metadata() or ()), time.monotonic() - started, timeout_s)


def check_process(prop: str, guardian: Guardian) -> None:
    """The guardian process is still running."""
    assert guardian.process is not None
    code = guardian.process.poll()
    if code is not None:
        counting.crashed(prop)
        fail(prop, f"the guardian exited with status {code} (a crash); see {guardian.log_path}")


def wait_responsive(guardian: Guardian, timeout_s: float = 120.0) -> None:
    """Wait until the guardian answers a health check again (after a call that overran its budget)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and guardian.process is not None and guardian.process.poll() is None:
        with grpc.insecure_channel(f"unix:{guardian.admin_socket}") as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                return
            except grpc.RpcError:
                time.sleep(0.5)


def _leaks(data: bytes, forbidden: Sequence[str]) -> list[str]:
    """The forbidden strings that occur in data."""
    return [text for text in forbidden if text.encode() in data]


def check_answer(
    prop: str,
    guardian: Guardian,
    method: MethodDescriptor,
    payload: bytes,
    answer: Answer,
    *,
    forbidden: Sequence[str],
    held: Sequence[str] = (),
    held_allowed: bool = False,
    namespaces: frozenset[str] | None = None,
    forbidden_ids: Sequence[str] = (),
) -> Message | None:
    """Hold one call to the properties; return the parsed response when it was OK.

    ``forbidden`` may appear nowhere; ``held`` (the content of quarantined memories) only in an
    OK answer when ``held_allowed`` (ShowQuarantined's); ``namespaces`` and ``forbidden_ids``
    apply the agent socket's data rules.
    """
    counting.outcome(prop, answer.code.name)
    check_process(prop, guardian)
    service, name = method.containing_service.full_name, method.name
    allowed = ALLOWED.get(service, {}).get(name)
    if allowed is None:
        fail(prop, f"{service}/{name} has no row in tests/fuzz/checks.py ALLOWED: decide its legitimate refusals")
        return None
    where = f"{name} answered {answer.code.name} ({answer.details!r}) after {answer.seconds:.2f} s"
    if answer.code == _C.DEADLINE_EXCEEDED:
        wait_responsive(guardian)  # so that the next input does not pay for this one
        fail(prop, f"{name} did not answer within its budget of {answer.budget_s:.1f} s (a hang)")
    if answer.code not in allowed:
        fail(prop, f"{where}; allowed: {sorted(code.name for code in allowed)}")
    leaked = _leaks(answer.details.encode(), [*forbidden, *held]) + _leaks(answer.payload, forbidden)
    if not (answer.code == _C.OK and held_allowed):
        leaked += _leaks(answer.payload, held)
    if leaked:
        fail(prop, f"{where}, and the answer holds forbidden data: {leaked}")
    if answer.code == _C.RESOURCE_EXHAUSTED and not any(key == RETRY_AFTER_METADATA_KEY for key, _ in answer.trailing):
        fail(prop, f"{where} without the {RETRY_AFTER_METADATA_KEY} trailing metadata")
    if answer.code != _C.OK:
        return None
    response_class = GetMessageClass(method.output_type)
    try:
        response = response_class.FromString(answer.payload)
    except DecodeError:
        fail(prop, f"{name}'s OK answer does not parse as {method.output_type.full_name}")
        return None
    if len(UnknownFieldSet(response)) > 0:
        fail(prop, f"{name}'s OK answer has fields {method.output_type.full_name} does not define")
    if namespaces is not None:
        _check_agent_data(prop, method, payload, response, namespaces, forbidden_ids)
    return response


def _check_agent_data(
    prop: str,
    method: MethodDescriptor,
    payload: bytes,
    response: Message,
    namespaces: frozenset[str],
    forbidden_ids: Sequence[str],
) -> None:
    """The agent socket's data rules for an OK answer."""
    name = method.name
    for memory in memories_in(response):
        if memory.namespace not in namespaces:
            fail(prop, f"{name} returned memory {memory.id} of namespace {memory.namespace!r}, not readable")
        if memory.id in forbidden_ids:
            fail(prop, f"{name} returned the planted memory {memory.id} (another agent's, or quarantined)")
        if name in _READS and memory.status != "active":
            fail(prop, f"{name} returned memory {memory.id} with status {memory.status!r}")
    if name in _BY_ID:
        request: Any = GetMessageClass(method.input_type).FromString(payload)
        if request.id in forbidden_ids:
            fail(prop, f"{name} of the planted memory {request.id} succeeded")
