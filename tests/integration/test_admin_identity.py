"""Accountable administration on a real guardian: each person's signed requests, roles, the two-person rule.

Two people (alice, bob) hold their ed25519 keys in a real ssh-agent; a third (carol) has a
key nobody enrolled. Every admin action must be pinned on the right person, in the audit
trail (caller and key fingerprint) and in the security log; anything not signed by an
enrolled key, signed over other bytes, too far from the guardian's clock or replayed is
refused, audited, and changes nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from guardian.access.key_file import KeyFileSigner
from guardian.access.signed_request import SshSignature, request_message, signed_metadata
from guardian.state.core import now_ms
from shared.rpc.guardian.v1 import admin_pb2, admin_pb2_grpc
from tests.support.harness import Guardian, running_guardian
from tests.support.ssh_agent import SshAgent, make_key, running_ssh_agent

STATUS = "/guardian.v1.AdminService/Status"
ADD_AGENT = "/guardian.v1.AdminService/AddAgent"


@pytest.fixture(scope="module")
def agent() -> Iterator[SshAgent]:
    with running_ssh_agent() as started:
        yield started


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory, agent: SshAgent) -> dict[str, Any]:
    """alice and bob's keys (in the agent), carol's (in the agent, never enrolled), and a viewer's and an operator's."""
    directory = tmp_path_factory.mktemp("keys")
    keys = {name: make_key(directory / name, f"{name}@example") for name in ("alice", "bob", "carol", "vic", "otto")}
    for name in ("alice", "bob", "carol"):
        agent.add(directory / name)
    return {"dir": directory, "keys": keys}


@pytest.fixture(scope="module")
def team(people: dict[str, Any]) -> Iterator[Guardian]:
    """A guardian whose first admin (init's key) enrolled alice and bob (security), vic (viewer), otto (operator)."""
    with running_guardian(administration={"two_person": ["policy.apply"], "proposals_expire": "1h"}) as guardian:
        keys = people["keys"]
        for name, role in (("alice", "security"), ("bob", "security"), ("vic", "viewer"), ("otto", "operator")):
            result = guardian.ctl("admins", "add", name, "--public-key", keys[name].openssh, "--role", role)
            assert result.returncode == 0, result.stderr
        yield guardian


def as_person(guardian: Guardian, agent: SshAgent, person: Any, *args: str, stdin: str | None = None) -> Any:
    """guardianctl as one person, signing through the ssh-agent with their key."""
    env = {**agent.env, "AGENT_GUARDIAN_ADMIN_KEY": ""}
    return guardian.ctl("--ssh-agent", "--identity", person.fingerprint, *args, stdin=stdin, env=env)


def rows_by(guardian: Guardian, operation: str) -> list[dict[str, Any]]:
    return [row for row in guardian.audit_rows() if row["operation"] == operation]


def raw_call(guardian: Guardian, path: str, data: bytes, metadata: Any) -> grpc.RpcError | bytes:
    """Send data to path with exactly this metadata (as a hostile or careless client would)."""
    with grpc.insecure_channel(f"unix:{guardian.admin_socket}") as channel:
        send = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        try:
            answer: bytes = send(data, timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error
        return answer


def test_each_person_is_named_in_the_audit_and_the_security_log(
    team: Guardian, agent: SshAgent, people: dict[str, Any]
) -> None:
    alice, bob = people["keys"]["alice"], people["keys"]["bob"]
    assert json.loads(as_person(team, agent, alice, "--json", "whoami").stdout)["name"] == "alice"
    assert as_person(team, agent, alice, "agents", "add", "alices-agent").returncode == 0
    assert as_person(team, agent, bob, "agents", "add", "bobs-agent").returncode == 0
    added = {row["object_id"]: row for row in rows_by(team, "admin.agent.add") if row["decision"] == "allow"}
    assert (added["alices-agent"]["agent"], added["alices-agent"]["session"]) == ("@admin:alice", alice.fingerprint)
    assert (added["bobs-agent"]["agent"], added["bobs-agent"]["session"]) == ("@admin:bob", bob.fingerprint)
    log = [json.loads(line) for line in team.log_path.read_text().splitlines() if '"admin_action"' in line]
    assert any(
        e["caller"] == "@admin:bob" and e["key"] == bob.fingerprint and e["object_id"] == "bobs-agent" for e in log
    )


def test_a_key_nobody_enrolled_is_refused_and_audited(team: Guardian, agent: SshAgent, people: dict[str, Any]) -> None:
    carol = people["keys"]["carol"]
    result = as_person(team, agent, carol, "agents", "add", "carols-agent")
    assert result.returncode != 0
    assert f"no admin is enrolled with the key {carol.fingerprint}" in result.stderr
    denied = [row for row in rows_by(team, "admin.agent.add") if row["session"] == carol.fingerprint]
    assert [(row["agent"], row["decision"]) for row in denied] == [("@admin-socket", "deny")]
    log = [json.loads(line) for line in team.log_path.read_text().splitlines() if '"denied"' in line]
    assert any(entry.get("key") == carol.fingerprint and entry["reason"] == "unauthenticated" for entry in log)
    assert "carols-agent" not in team.ctl("agents", "list").stdout


def test_unsigned_replayed_reshaped_and_late_requests_are_refused(team: Guardian) -> None:
    signer = KeyFileSigner(team.admin_key)
    data = admin_pb2.AddAgentRequest(name="replayed").SerializeToString()
    metadata = signed_metadata(signer, ADD_AGENT, data)
    assert isinstance(raw_call(team, ADD_AGENT, data, metadata), bytes)
    again = raw_call(team, ADD_AGENT, data, metadata)
    assert isinstance(again, grpc.RpcError) and again.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already served once" in (again.details() or "")

    other = admin_pb2.AddAgentRequest(name="smuggled").SerializeToString()
    fresh = signed_metadata(signer, ADD_AGENT, data)
    reshaped = raw_call(team, ADD_AGENT, other, fresh)
    assert isinstance(reshaped, grpc.RpcError) and "does not match this request" in (reshaped.details() or "")
    moved = raw_call(team, STATUS, data, signed_metadata(signer, ADD_AGENT, data))
    assert isinstance(moved, grpc.RpcError) and "does not match this request" in (moved.details() or "")

    late = raw_call(team, ADD_AGENT, other, signed_metadata(signer, ADD_AGENT, other, now_ms=now_ms() - 600_000))
    assert isinstance(late, grpc.RpcError) and "behind the guardian's clock" in (late.details() or "")
    unsigned = raw_call(team, ADD_AGENT, other, ())
    assert isinstance(unsigned, grpc.RpcError) and unsigned.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not signed" in (unsigned.details() or "")
    garbage = raw_call(team, ADD_AGENT, other, (("x-guardian-signature-bin", b"SSHSIG\x00"),))
    assert isinstance(garbage, grpc.RpcError) and "signature: truncated" in (garbage.details() or "")
    listed = team.ctl("agents", "list").stdout
    assert "replayed" in listed and "smuggled" not in listed
    reasons = [row["reason"] for row in rows_by(team, "admin.agent.add") if row["decision"] == "deny"]
    assert any("already served once" in reason for reason in reasons)
    assert any("does not match this request" in reason for reason in reasons)


def test_a_replay_is_refused_after_a_restart(people: dict[str, Any]) -> None:
    with running_guardian() as guardian:
        signer = KeyFileSigner(guardian.admin_key)
        data = admin_pb2.StatusRequest().SerializeToString()
        metadata = signed_metadata(signer, STATUS, data)
        assert isinstance(raw_call(guardian, STATUS, data, metadata), bytes)
        guardian.stop()
        guardian.start()
        again = raw_call(guardian, STATUS, data, metadata)
        assert isinstance(again, grpc.RpcError) and "already served once" in (again.details() or "")


def test_roles_decide_what_each_person_may_do(team: Guardian, people: dict[str, Any]) -> None:
    directory: Path = people["dir"]
    viewer, operator = KeyFileSigner(directory / "vic"), KeyFileSigner(directory / "otto")
    assert team.admin("Status", admin_pb2.StatusRequest(), signer=viewer).policy_version
    for signer, method, request, needed in (
        (viewer, "AddAgent", admin_pb2.AddAgentRequest(name="by-vic"), "security"),
        (viewer, "ListBackups", admin_pb2.ListBackupsRequest(), "operator"),
        (operator, "ReleaseQuarantined", admin_pb2.QuarantineRequest(id="mem_" + "0" * 26), "security"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            team.admin(method, request, signer=signer)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"needs the {needed} role" in (refused.value.details() or "")
    assert team.admin("ListBackups", admin_pb2.ListBackupsRequest(), signer=operator) is not None
    denied = [row for row in team.audit_rows() if row["agent"] == "@admin:vic" and row["decision"] == "deny"]
    assert {row["operation"] for row in denied} >= {"admin.agent.add", "admin.backup.list"}


def test_a_policy_apply_needs_a_second_person(
    team: Guardian, agent: SshAgent, people: dict[str, Any], tmp_path: Path
) -> None:
    alice, bob = people["keys"]["alice"], people["keys"]["bob"]
    policy = yaml.safe_load(team.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).text)
    policy["sessions"] = {**policy.get("sessions", {}), "max_per_agent": 5}
    new_file = tmp_path / "policy.yaml"
    new_file.write_text(yaml.safe_dump(policy))
    before = team.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).version

    alone = as_person(team, agent, alice, "policy", "apply", str(new_file))
    assert alone.returncode != 0 and "a second person must approve this" in alone.stderr
    proposed = as_person(team, agent, alice, "--json", "policy", "apply", str(new_file), "--propose")
    assert proposed.returncode == 0, proposed.stderr
    proposal_id = json.loads(proposed.stdout)["id"]
    assert team.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).version == before

    own = as_person(team, agent, alice, "approve", proposal_id, "--yes")
    assert own.returncode != 0 and "a different person must approve it" in own.stderr
    shown = as_person(team, agent, bob, "proposals", "show", proposal_id)
    assert "+  max_per_agent: 5" in shown.stdout and "proposed by @admin:alice" in shown.stdout
    approved = as_person(team, agent, bob, "approve", proposal_id, "--yes")
    assert approved.returncode == 0, approved.stderr
    assert "approved and done: admin.policy.apply" in approved.stdout
    assert team.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).version != before
    again = as_person(team, agent, bob, "approve", proposal_id, "--yes")
    assert again.returncode != 0 and "the proposal is approved; nothing to approve" in again.stderr

    kept = json.loads(as_person(team, agent, bob, "--json", "proposals", "show", proposal_id).stdout)
    for field, person in (("proposal_signature", alice), ("decision_signature", bob)):
        signed = kept[field]
        message = request_message(
            signed["method"], int(signed["timestamp_ms"]), signed["nonce"], base64.b64decode(signed["request"])
        )
        signature = SshSignature.parse(base64.b64decode(signed["sshsig"]))
        assert signature.verifies(message) and signature.public_key == person
    created = [row for row in rows_by(team, "admin.proposal.create") if proposal_id in row["object_id"]]
    assert [(row["agent"], row["session"]) for row in created] == [("@admin:alice", alice.fingerprint)]
    applied = [row for row in rows_by(team, "admin.policy.apply") if row["decision"] == "allow"]
    assert applied[-1]["agent"] == "@admin:bob" and applied[-1]["session"] == bob.fingerprint
    assert applied[-1]["reason"].startswith(f"approves {proposal_id} of @admin:alice ({alice.fingerprint})")


def test_turning_the_rule_off_needs_a_second_person_too(
    team: Guardian, agent: SshAgent, people: dict[str, Any], tmp_path: Path
) -> None:
    alice = people["keys"]["alice"]
    current = yaml.safe_load(team.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).text)
    current["administration"] = {"two_person": []}
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump(current))
    result = as_person(team, agent, alice, "policy", "apply", str(off))
    assert result.returncode != 0 and "a second person must approve this" in result.stderr


def test_an_expired_proposal_cannot_be_approved(team: Guardian, agent: SshAgent, people: dict[str, Any]) -> None:
    alice, bob = people["keys"]["alice"], people["keys"]["bob"]
    proposed = as_person(team, agent, alice, "--json", "agents", "add", "later", "--propose")
    assert proposed.returncode == 0, proposed.stderr
    proposal_id = json.loads(proposed.stdout)["id"]
    with team.keyed_db() as connection:  # as someone holding the key, to skip the hour
        connection.execute("UPDATE proposals SET expires_at_ms = ? WHERE id = ?", (now_ms() - 1, proposal_id))
    result = as_person(team, agent, bob, "approve", proposal_id, "--yes")
    assert result.returncode != 0 and "the proposal is expired" in result.stderr
    assert "later" not in team.ctl("agents", "list").stdout


def test_bad_admin_input_gets_a_clear_error_and_changes_nothing(team: Guardian, people: dict[str, Any]) -> None:
    before = team.ctl("--json", "admins", "list").stdout
    for key, expected in (
        ("ssh-ed25519 AAAA", "public_key:"),
        ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7", "expected an OpenSSH Ed25519 public key"),
        (people["keys"]["alice"].openssh, "is already enrolled, for 'alice'"),
    ):
        result = team.ctl("admins", "add", "mallory", "--public-key", key, "--role", "security")
        assert result.returncode != 0 and expected in result.stderr, result.stderr
    carol = people["keys"]["carol"].openssh
    with pytest.raises(grpc.RpcError) as refused:
        team.admin("AddAdmin", admin_pb2.AddAdminRequest(name="m", public_key=carol, role="root"))
    assert "role: must be one of viewer, operator, security" in (refused.value.details() or "")
    assert team.ctl("--json", "admins", "list").stdout == before


def test_the_last_security_admin_cannot_be_removed() -> None:
    with running_guardian() as guardian:
        name = json.loads(guardian.ctl("--json", "whoami").stdout)["name"]
        result = guardian.ctl("admins", "remove", name)
        assert result.returncode != 0 and "is the last admin with the security role" in result.stderr


def test_stub_signing_through_the_harness_is_the_same_as_guardianctl(team: Guardian) -> None:
    with team.channel("admin") as channel:
        assert admin_pb2_grpc.AdminServiceStub(channel).WhoAmI(admin_pb2.WhoAmIRequest()).role == "security"
