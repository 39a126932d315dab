"""Methods the agent socket does not serve: the admin service, made-up paths, and what health tells.

The agent socket serves guardian.v1.AgentService only. Every other path is answered
UNIMPLEMENTED and audited as ``rpc.unknown``: an admin method by its name, a made-up
path only by a digest (it is the caller's text). The health service answers SERVING
for the agent service and nothing more: no other service, no metadata, no list.
"""

from __future__ import annotations

from typing import Final

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.rpc.guardian.v1 import admin_pb2
from tests.security.hostile import Attack, cases, marker, raw_call, refused
from tests.support.harness import Guardian

MARK: Final = marker()
ADMIN_SERVICE: Final = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]

#: A request with teeth for the admin methods that change something; the others get their empty message.
_ADMIN_PAYLOADS: Final[dict[str, bytes]] = {
    "AddAgent": admin_pb2.AddAgentRequest(name=f"intruder-{MARK}").SerializeToString(),
    "RevokeAgent": admin_pb2.RevokeAgentRequest(name="victim").SerializeToString(),
    "UnlockAgent": admin_pb2.UnlockAgentRequest(name="victim").SerializeToString(),
    "ApplyPolicy": admin_pb2.PolicyText(text=f"version: 1\n# {MARK}\nprofiles: {{}}\n").SerializeToString(),
    "ValidatePolicy": admin_pb2.PolicyText(text=f"# {MARK}").SerializeToString(),
    "QueryAudit": admin_pb2.AuditQuery(agent="victim").SerializeToString(),
    "RotateAgentToken": admin_pb2.RotateAgentTokenRequest(name="victim").SerializeToString(),
    "RotateKey": admin_pb2.RotateKeyRequest(ring="audit").SerializeToString(),
    "RetireKey": admin_pb2.RetireKeyRequest(ring="memory", key_id="k1").SerializeToString(),
    "ReadBackup": admin_pb2.ReadBackupRequest(name="memory-20260101T000000000Z-abcd.db").SerializeToString(),
}

ADMIN_METHODS: Final = (
    "AddAgent",
    "ListAgents",
    "RevokeAgent",
    "UnlockAgent",
    "ShowPolicy",
    "Status",
    "ValidatePolicy",
    "DiffPolicy",
    "ApplyPolicy",
    "PolicyHistory",
    "RollbackPolicy",
    "ListQuarantine",
    "ShowQuarantined",
    "ReleaseQuarantined",
    "PurgeQuarantined",
    "QueryAudit",
    "VerifyAudit",
    "WhoRead",
    "OpenIncident",
    "ListIncidents",
    "ReportIncident",
    "CloseIncident",
    "RescanMemories",
    "Stats",
    "RotateAgentToken",
    "ListSessions",
    "RevokeSession",
    "ListKeys",
    "RotateKey",
    "ResignMemories",
    "RetireKey",
    "CreateBackup",
    "ListBackups",
    "ReadBackup",
    "VerifyBackup",
    # -- admins and the two-person rule (issue 17.1-3) --
    "AddAdmin",
    "RemoveAdmin",
    "ListAdmins",
    "WhoAmI",
    "Propose",
    "ListProposals",
    "ShowProposal",
    "Approve",
    "CancelProposal",
    # -- audit export (issue 17.4) --
    "ExportAudit",
    "AuditSigningKeys",
)

ADMIN_ATTACKS: Final = tuple(
    Attack(f"admin-on-agent-socket.{name}", f"call AdminService/{name} on the agent socket") for name in ADMIN_METHODS
)

#: Made-up paths: (attack, path). Each is answered UNIMPLEMENTED and recorded only as a digest.
MADE_UP: Final = (
    (
        Attack("unserved.invented-agent-method", "an AgentService method the contract does not have"),
        "/guardian.v1.AgentService/DropAllMemories",
    ),
    (
        Attack("unserved.admin-name-under-agent-service", "an admin method name under the agent service"),
        "/guardian.v1.AgentService/AddAgent",
    ),
    (
        Attack("unserved.other-version", "the agent service of a version the guardian does not speak"),
        "/guardian.v2.AgentService/Store",
    ),
    (
        Attack("unserved.case-variant", "a path that differs from a served one only in case"),
        "/guardian.v1.agentservice/store",
    ),
    (
        Attack("unserved.dot-segments", "dot segments that would climb to the admin service if paths were resolved"),
        "/guardian.v1.AgentService/../AdminService/AddAgent",
    ),
    (
        Attack("unserved.reflection", "server reflection, to enumerate services and messages"),
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ),
    (
        Attack("unserved.channelz", "channelz, to read the server's sockets and peers"),
        "/grpc.channelz.v1.Channelz/GetServers",
    ),
    (
        Attack("unserved.secret-shaped-path", "a path carrying a secret, to get it copied into the audit trail"),
        f"/guardian.v1.AgentService/AKIA{MARK.upper()}XYZW",
    ),
    (
        Attack("unserved.long-path", "a 4 KiB path"),
        "/guardian.v1.AgentService/" + "A" * 4096,
    ),
)

HEALTH_ATTACKS: Final = (
    Attack(
        "health.admin-service-status",
        "ask the agent socket's health service about the admin service (Check and Watch)",
        audited_as="",
    ),
    Attack("health.unknown-service-echo", "a health check for a made-up service name carrying a marker", audited_as=""),
    Attack("health.list-services", "Health/List, which would enumerate every service name", audited_as=""),
    Attack("health.overall-carries-nothing-else", "the overall health reply: status only, no metadata", audited_as=""),
)

ATTACKS: Final = ADMIN_ATTACKS + tuple(attack for attack, _ in MADE_UP) + HEALTH_ATTACKS


def test_every_admin_method_is_covered() -> None:
    """The list above is the admin service's whole surface."""
    assert set(ADMIN_METHODS) == set(ADMIN_SERVICE.methods_by_name)


@pytest.mark.parametrize("attack", cases(ADMIN_ATTACKS))
def test_admin_methods_are_not_on_the_agent_socket(guardian: Guardian, attack: Attack) -> None:
    name = attack.id.rpartition(".")[2]
    path = f"/guardian.v1.AdminService/{name}"
    agents_before = guardian.admin("ListAgents", admin_pb2.ListAgentsRequest())
    version_before = guardian.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).version
    refusal = refused(
        guardian,
        lambda: raw_call(guardian, path, _ADMIN_PAYLOADS.get(name, b"")),
        grpc.StatusCode.UNIMPLEMENTED,
        "rpc.unknown",
        payloads=[MARK],
        agent="",
    )
    assert refusal.details == "no such method on this socket"
    assert refusal.row["object_id"] == path
    assert guardian.admin("ListAgents", admin_pb2.ListAgentsRequest()) == agents_before
    assert guardian.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).version == version_before


@pytest.mark.parametrize(("attack", "path"), [pytest.param(a, p, id=a.id) for a, p in MADE_UP])
def test_made_up_paths_are_refused_and_recorded_as_a_digest(guardian: Guardian, attack: Attack, path: str) -> None:
    method_name = path.rpartition("/")[2]
    refusal = refused(
        guardian,
        lambda: raw_call(guardian, path, f"payload {MARK}".encode()),
        grpc.StatusCode.UNIMPLEMENTED,
        "rpc.unknown",
        payloads=[MARK, method_name] if len(method_name) >= 8 else [MARK],
        agent="",
    )
    assert refusal.row["object_id"].startswith("unknown path "), refusal.row
    assert path not in repr(refusal.row)


def _health(guardian: Guardian) -> tuple[grpc.Channel, health_pb2_grpc.HealthStub]:
    """A health stub on the agent socket, on a channel outside the harness's records."""
    channel = grpc.insecure_channel(f"unix:{guardian.agent_socket}")
    return channel, health_pb2_grpc.HealthStub(channel)


@pytest.mark.parametrize("attack", cases(HEALTH_ATTACKS))
def test_health_tells_serving_and_nothing_else(guardian: Guardian, attack: Attack) -> None:
    # The health service is outside the request pipeline (nothing to audit); what matters is what it tells.
    channel, health = _health(guardian)
    with channel:
        if attack.id == "health.admin-service-status":
            request = health_pb2.HealthCheckRequest(service="guardian.v1.AdminService")
            try:
                answer = health_pb2.HealthCheckResponse.ServingStatus.Name(health.Check(request, timeout=10).status)
            except grpc.RpcError as error:
                answer = error.code().name
            assert answer == "NOT_FOUND", f"the agent socket's health service says the admin service is {answer}"
            watched = health.Watch(request, timeout=10)
            first = next(iter(watched))
            watched.cancel()
            assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        elif attack.id == "health.unknown-service-echo":
            with pytest.raises(grpc.RpcError) as caught:
                health.Check(health_pb2.HealthCheckRequest(service=f"guardian.v1.{MARK}"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert MARK not in (caught.value.details() or "")
        elif attack.id == "health.list-services":
            with pytest.raises(grpc.RpcError) as caught:
                health.List(health_pb2.HealthListRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "Service" not in (caught.value.details() or "")
        else:
            reply, call = health.Check.with_call(health_pb2.HealthCheckRequest(), timeout=10)
            assert [descriptor.name for descriptor, _ in reply.ListFields()] == ["status"]
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert not call.initial_metadata() and not call.trailing_metadata()
