"""Signed admin requests: the SSHSIG format against OpenSSH's own ssh-keygen, keys, roles, first admins."""

from __future__ import annotations

import base64
import subprocess
import textwrap
from pathlib import Path

import pytest

from guardian.access.admins import parse_first_admins, role_allows
from guardian.access.key_file import KeyFileSigner, create_key_file
from guardian.access.proposals import TWO_PERSON_OPERATIONS
from guardian.access.signed_request import (
    NAMESPACE,
    PublicKey,
    SshSignature,
    request_message,
    sshsig_blob,
    sshsig_signed_data,
)
from guardian.policy.compile import compile_policy
from guardian.policy.default import render_default_policy
from guardian.service.rules import ADMIN_RULES, AGENT_RULES
from shared.errors import ConfigError, InvalidArgument, Unauthenticated

METHOD = "/guardian.v1.AdminService/ApplyPolicy"


def _armored(blob: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(blob).decode(), 70))
    return f"-----BEGIN SSH SIGNATURE-----\n{body}\n-----END SSH SIGNATURE-----\n"


def _unarmored(text: str) -> bytes:
    return base64.b64decode("".join(text.strip().splitlines()[1:-1]))


def test_the_message_binds_method_time_nonce_and_the_exact_bytes() -> None:
    message = request_message(METHOD, 1_700_000_000_000, "ab" * 16, b"\x0a\x03abc")
    assert message == (
        b"agent-guardian admin request v1\n"
        b"method /guardian.v1.AdminService/ApplyPolicy\n"
        b"timestamp_ms 1700000000000\n"
        b"nonce abababababababababababababababab\n"
        b"request_sha256 8ab7a6c5e74737878ac73863cb76739d15d4666de44e5756bf55a2f9e9ab5f44\n"
    )
    others = {
        request_message(METHOD, 1_700_000_000_001, "ab" * 16, b"\x0a\x03abc"),
        request_message(METHOD, 1_700_000_000_000, "cd" * 16, b"\x0a\x03abc"),
        request_message(METHOD, 1_700_000_000_000, "ab" * 16, b"\x0a\x03abd"),
        request_message(METHOD.replace("Apply", "Rollback"), 1_700_000_000_000, "ab" * 16, b"\x0a\x03abc"),
    }
    assert message not in others and len(others) == 4


def test_our_signature_is_one_ssh_keygen_verifies(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "admin.key", "test")
    signer = KeyFileSigner(tmp_path / "admin.key")
    message = request_message(METHOD, 1, "0" * 32, b"request")
    blob = sshsig_blob(key.blob, signer.sign(sshsig_signed_data(message)))
    (tmp_path / "signature").write_text(_armored(blob))
    checked = subprocess.run(
        ["ssh-keygen", "-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(tmp_path / "signature")],
        input=message,
        capture_output=True,
        check=False,
        timeout=10,
    )
    assert checked.returncode == 0, checked.stderr
    assert key.fingerprint.encode() in checked.stdout
    wrong = subprocess.run(
        ["ssh-keygen", "-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(tmp_path / "signature")],
        input=message + b"x",
        capture_output=True,
        check=False,
        timeout=10,
    )
    assert wrong.returncode != 0


def test_a_signature_ssh_keygen_made_is_one_we_verify(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True, timeout=10)
    message = request_message(METHOD, 2, "1" * 32, b"other request")
    (tmp_path / "message").write_bytes(message)
    subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", NAMESPACE, "-f", str(tmp_path / "id"), str(tmp_path / "message")],
        check=True,
        capture_output=True,
        timeout=10,
    )
    signature = SshSignature.parse(_unarmored((tmp_path / "message.sig").read_text()))
    assert signature.verifies(message) and not signature.verifies(message + b"\n")
    listed = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "id.pub")], capture_output=True, text=True, check=True)
    assert signature.public_key.fingerprint == listed.stdout.split()[1]
    assert PublicKey.parse((tmp_path / "id.pub").read_text()) == signature.public_key


def test_a_signature_for_another_namespace_or_malformed_is_refused(tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True, timeout=10)
    (tmp_path / "message").write_bytes(b"hello")
    subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-n", "git", "-f", str(tmp_path / "id"), str(tmp_path / "message")],
        check=True,
        capture_output=True,
        timeout=10,
    )
    blob = _unarmored((tmp_path / "message.sig").read_text())
    with pytest.raises(Unauthenticated, match="made for another use"):
        SshSignature.parse(blob)
    for bad in (b"", b"SSHSIG", b"SSHSIG" + b"\x00" * 3, b"SSHSIG\x00\x00\x00\x01\xff\xff\xff\xff", b"x" * 2000):
        with pytest.raises(Unauthenticated):
            SshSignature.parse(bad)
    with pytest.raises(Unauthenticated, match="unexpected bytes"):
        SshSignature.parse(blob.replace(b"git", b"agent-guardian-admin"[:3]) + b"\x00")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected an OpenSSH Ed25519 public key"),
        ("ssh-rsa AAAAB3NzaC1yc2E=", "expected an OpenSSH Ed25519 public key"),
        ("ssh-ed25519 !!!notbase64", "does not decode"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "truncated"),
    ],
)
def test_a_malformed_public_key_is_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        PublicKey.parse(text)


def test_a_key_file_others_can_read_or_not_ed25519_is_refused(tmp_path: Path) -> None:
    create_key_file(tmp_path / "k", "t")
    (tmp_path / "k").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        KeyFileSigner(tmp_path / "k")
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(tmp_path / "ec")], check=True, timeout=10)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        KeyFileSigner(tmp_path / "ec")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(tmp_path / "locked")], check=True, timeout=10
    )
    with pytest.raises(ConfigError, match="is encrypted: load it into ssh-agent"):
        KeyFileSigner(tmp_path / "locked")


def test_roles_nest() -> None:
    assert role_allows("security", "viewer") and role_allows("operator", "operator")
    assert not role_allows("viewer", "operator") and not role_allows("operator", "security")


def test_the_first_admins_file_is_checked_line_by_line(tmp_path: Path) -> None:
    key = create_key_file(tmp_path / "k", "t").openssh
    admins = parse_first_admins(f"# comment\nalice security {key} alice@host\n\n", "first-admins", 5)
    assert [(a.name, a.role, a.added_by) for a in admins] == [("alice", "security", "@first-admins")]
    with pytest.raises(ConfigError, match="first-admins line 2: role: must be one of"):
        parse_first_admins(f"alice security {key}\nbob root {key}", "first-admins", 5)
    with pytest.raises(ConfigError, match="names no admin with the security role"):
        parse_first_admins(f"vic viewer {key}", "first-admins", 5)
    with pytest.raises(ConfigError, match="line 1: expected NAME ROLE"):
        parse_first_admins("alice security", "first-admins", 5)


def test_the_policy_names_only_operations_the_two_person_rule_covers() -> None:
    base = render_default_policy()
    policy = compile_policy(base.replace("two_person: []", "two_person: [policy.apply, keys.rotate]"))
    assert policy.two_person.covers("policy.apply") and not policy.two_person.covers("agent.add")
    with pytest.raises(ConfigError, match=r"administration.two_person\[0\]: 'memory.store' is not an operation"):
        compile_policy(base.replace("two_person: []", "two_person: [memory.store]"))
    with pytest.raises(ConfigError, match="proposals_expire: between 1m and 7d"):
        compile_policy(base.replace("proposals_expire: 24h", "proposals_expire: 30d"))


def test_every_admin_request_names_its_least_role_and_the_rule_covers_exactly_its_operations() -> None:
    assert all(rule.role is not None for rule in ADMIN_RULES.values())
    assert all(rule.role is None and not rule.two_person for rule in AGENT_RULES.values())
    covered = {rule.admin_operation for rule in ADMIN_RULES.values() if rule.two_person}
    assert covered == TWO_PERSON_OPERATIONS
    readers = {name for name, rule in ADMIN_RULES.items() if rule.role == "viewer"}
    assert {"Status", "Stats", "QueryAudit", "VerifyAudit"} <= readers
    assert not readers & {"ShowQuarantined", "ApplyPolicy", "RotateKey", "AddAdmin", "CreateBackup"}
