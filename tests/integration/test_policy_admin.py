"""Changing the policy on a running guardian: guardianctl policy ..., SIGHUP, restarts, history."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import yaml

from shared.rpc.guardian.v1 import admin_pb2
from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, curl, running_guardian

pb = agent_pb2


def edited_policy(guardian: Guardian, tmp_path: Path, name: str, **changes: Any) -> Path:
    data = yaml.safe_load((guardian.state_dir / "policy.yaml").read_text())
    data.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def version(guardian: Guardian) -> str:
    info: admin_pb2.PolicyInfo = guardian.admin("ShowPolicy", admin_pb2.ShowPolicyRequest())
    return info.version


def store_allowed(guardian: Guardian, token: str) -> bool:
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        try:
            stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="probe")))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            return False
        return True


def test_validate_diff_apply_history_rollback(tmp_path: Path) -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("bot")
        original = version(guardian)
        read_only = edited_policy(guardian, tmp_path, "ro.yaml", agents={"bot": "read-only"})

        checked = guardian.ctl("policy", "validate", str(read_only))
        assert checked.returncode == 0, checked.stderr
        assert "valid" in checked.stdout and "profile read-only" in checked.stdout

        diff = guardian.ctl("policy", "diff", str(read_only))
        assert diff.returncode == 1 and "+agents:" in diff.stdout and "bot: read-only" in diff.stdout

        applied = guardian.ctl("--json", "policy", "apply", str(read_only))
        assert applied.returncode == 0, applied.stderr
        new = json.loads(applied.stdout)
        assert new["previous"] == original and not new["unchanged"]
        assert version(guardian) == new["version"]
        assert not store_allowed(guardian, token)
        again = json.loads(guardian.ctl("--json", "policy", "apply", str(read_only)).stdout)
        assert again["unchanged"]

        history = json.loads(guardian.ctl("--json", "policy", "history").stdout)
        assert [entry["source"] for entry in history[:2]] == ["apply", "file"]
        assert history[0]["by"].startswith("@admin:")

        rolled = guardian.ctl("policy", "rollback", original[:12])
        assert rolled.returncode == 0, rolled.stderr
        assert version(guardian) == original
        assert store_allowed(guardian, token)

        shown = guardian.ctl("policy", "show")
        assert original in shown.stdout and "rollback" in shown.stdout and "profiles:" in shown.stdout

        rows = [
            row
            for row in guardian.audit_rows()
            if row["operation"].startswith("admin.policy.") and row["operation"] != "admin.policy.show"
        ]
        assert [row["operation"] for row in rows if row["decision"] == "allow"][-2:] == [
            "admin.policy.history",
            "admin.policy.rollback",
        ]
        apply_row = next(row for row in rows if row["operation"] == "admin.policy.apply")
        assert apply_row["object_id"] == new["version"] and apply_row["policy_version"] == original


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\nprofiles: {default: {operations: [store, fly]}}\n", "profiles.default.operations[1]"),
        (
            "version: 1\nprofiles: {default: {operations: [get]}}\nfilters: [{name: x, pattern: '(', action: flag}]\n",
            "filters[0].pattern (rule x): not a valid regular expression",
        ),
        ("version: 1\nprofiles: {default: {operations: [get]}}\nlimits: {max_tags: lots}\n", "limits.max_tags"),
        ("version: 1\nprofiles: {default: {operations: [get]}}\ncolour: blue\n", "colour: unknown key"),
        ("{not yaml", "not valid YAML"),
    ],
)
def test_a_bad_policy_is_refused_recorded_and_the_running_one_stays(text: str, message: str) -> None:
    with running_guardian() as guardian:
        before = version(guardian)
        result = guardian.ctl("policy", "apply", "-", stdin=text)
        assert result.returncode == 1
        assert "guardianctl: invalid request: " in result.stderr and message in result.stderr
        assert version(guardian) == before
        row = [row for row in guardian.audit_rows() if row["operation"] == "admin.policy.apply"][-1]
        assert row["decision"] == "deny"
        assert message in row["reason"]


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        ("(?<![A-Za-z0-9])AKIA[A-Z0-9]{16}", "uses a lookbehind '(?<!'"),
        (r"(\w+) \1", "uses a backreference '\\1'"),
        ("(?>a+)b", "uses an atomic group '(?>'"),
    ],
)
def test_a_rule_the_linear_time_engine_cannot_run_is_refused_by_validate_and_apply(
    pattern: str, construct: str
) -> None:
    text = yaml.safe_dump(
        {
            "version": 1,
            "profiles": {"default": {"operations": ["get"]}},
            "filters": [
                {"name": "plain", "pattern": "x{3}", "action": "flag"},
                {"name": "old-rule", "pattern": pattern, "action": "reject"},
            ],
        }
    )
    expected = f"filters[1].pattern (rule old-rule): {construct}, which the linear-time engine (RE2) cannot run"
    with running_guardian() as guardian:
        before = version(guardian)
        for verb in ("validate", "apply"):
            result = guardian.ctl("policy", verb, "-", stdin=text)
            assert result.returncode == 1, result.stdout
            assert expected in result.stderr, result.stderr
        assert version(guardian) == before
        rows = [
            row for row in guardian.audit_rows() if row["operation"] in ("admin.policy.validate", "admin.policy.apply")
        ]
        assert [(row["operation"], row["decision"]) for row in rows[-2:]] == [
            ("admin.policy.validate", "deny"),
            ("admin.policy.apply", "deny"),
        ]
        assert all(expected in row["reason"] for row in rows[-2:])


def test_sighup_reloads_the_file_and_a_broken_file_changes_nothing(tmp_path: Path) -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("bot")
        before = version(guardian)
        policy_file = guardian.state_dir / "policy.yaml"
        good = policy_file.read_text()
        policy_file.write_text(good + "\nthis is: [not valid\n")
        assert guardian.process is not None
        os.kill(guardian.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not [r for r in guardian.audit_rows() if r["operation"] == "policy.reload"]:
            assert time.monotonic() < deadline, "the failed reload was not audited"
            time.sleep(0.1)
        assert version(guardian) == before
        failed = [r for r in guardian.audit_rows() if r["operation"] == "policy.reload"][-1]
        assert failed["decision"] == "deny" and "not valid YAML" in failed["reason"]

        data = yaml.safe_load(good)
        data["agents"] = {"bot": "read-only"}
        policy_file.write_text(yaml.safe_dump(data))
        os.kill(guardian.process.pid, signal.SIGHUP)
        while version(guardian) == before:
            assert time.monotonic() < deadline + 10, "SIGHUP did not apply the new file"
            time.sleep(0.1)
        assert not store_allowed(guardian, token)


def test_a_refused_policy_file_does_not_block_the_next_start(tmp_path: Path) -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("bot")
        before = version(guardian)
        assert guardian.ctl("status").returncode == 0
        policy_file = guardian.state_dir / "policy.yaml"
        good = policy_file.read_text()
        policy_file.write_text(good + "\nthis is: [not valid\n")
        assert guardian.process is not None
        os.kill(guardian.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while guardian.ctl("status").returncode == 0:
            assert time.monotonic() < deadline, "the refused reload does not show in guardianctl status"
            time.sleep(0.1)

        guardian.stop()
        guardian.start()  # today's main fails here: "cannot start: ..."
        assert version(guardian) == before
        assert store_allowed(guardian, token)
        status = guardian.ctl("status")
        assert status.returncode == 1
        assert "WARNING: the policy file is refused (" in status.stdout and "not valid YAML" in status.stdout
        assert f"policy in force: {before}" in status.stdout
        as_json = json.loads(guardian.ctl("--json", "status").stdout)
        assert as_json["ready"] is True and "not valid YAML" in as_json["policy_file_refusal"]
        ready = curl(guardian.ops_url + "/readyz")
        assert ready.status == 200 and "the policy file is refused" in ready.json()["warnings"]["policy_file"]
        assert "not valid YAML" not in ready.body  # the unauthenticated endpoint does not say why
        assert "guardian_policy_file_refused 1.0" in curl(guardian.ops_url + "/metrics").body
        loaded = [row for row in guardian.audit_rows() if row["operation"] == "policy.load"][-1]
        assert loaded["decision"] == "deny" and "not valid YAML" in loaded["reason"]
        assert loaded["policy_version"] == before
        log = [json.loads(line) for line in guardian.log_path.read_text().splitlines() if line.startswith("{")]
        assert any(entry.get("event") == "policy_file_refused" for entry in log)

        # Fixed and reloaded: the warning goes.
        policy_file.write_text(good)
        os.kill(guardian.process.pid, signal.SIGHUP)
        while guardian.ctl("status").returncode != 0:
            assert time.monotonic() < deadline + 20, "the fixed file was not taken back"
            time.sleep(0.1)
        assert curl(guardian.ops_url + "/readyz").json()["warnings"] == {}


def test_a_refused_policy_file_on_a_first_start_stops_it(tmp_path: Path) -> None:
    with running_guardian() as guardian:
        guardian.stop()
        shutil.rmtree(guardian.state_dir / "data")
        (guardian.state_dir / "data").mkdir(mode=0o700)
        (guardian.state_dir / "policy.yaml").write_text("{not yaml")
        with pytest.raises(RuntimeError, match="not valid YAML"):
            guardian.start()
        guardian.process = None


def test_an_applied_policy_survives_a_restart_until_the_file_changes(tmp_path: Path) -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("bot")
        applied = edited_policy(guardian, tmp_path, "ro.yaml", agents={"bot": "read-only"})
        assert guardian.ctl("policy", "apply", str(applied)).returncode == 0
        applied_version = version(guardian)
        guardian.stop()
        guardian.start()
        assert version(guardian) == applied_version
        assert not store_allowed(guardian, token)
        # An edit of the file is newer intent: it wins at the next start.
        policy_file = guardian.state_dir / "policy.yaml"
        data = yaml.safe_load(policy_file.read_text())
        data["sessions"] = {**data.get("sessions", {}), "max_per_agent": 5}
        policy_file.write_text(yaml.safe_dump(data))
        guardian.stop()
        guardian.start()
        assert version(guardian) not in {applied_version}
        assert store_allowed(guardian, token)


def test_rollback_of_an_unknown_version() -> None:
    with running_guardian() as guardian:
        result = guardian.ctl("policy", "rollback", "deadbeefdeadbeef")
        assert result.returncode == 1 and "guardianctl: not found: " in result.stderr
        short = guardian.ctl("policy", "rollback", "abc")
        assert short.returncode == 1 and "at least its first 8 hex digits" in short.stderr


def test_a_hundred_reloads_during_traffic_fail_no_request(tmp_path: Path) -> None:
    with running_guardian(anomaly=LOG_ONLY_ANOMALIES) as guardian:
        token = guardian.add_agent("busy")
        base = yaml.safe_load((guardian.state_dir / "policy.yaml").read_text())
        generous = {"burst": 100_000, "per_minute": 6_000_000}
        base["rate_limits"] = {
            "session": {"reads": generous, "writes": generous},
            "agent": {"reads": generous, "writes": generous},
        }
        texts = []
        for size in (60_000, 65_536):  # two policies that differ, both allowing the traffic
            base["limits"]["max_content_bytes"] = size
            texts.append(yaml.safe_dump(base))
        failures: list[str] = []
        done = threading.Event()
        stored = 0

        def traffic() -> None:
            nonlocal stored
            channel, stub = guardian.agent_stub()
            with channel:
                session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
                while not done.is_set():
                    try:
                        memory = stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="tick")))
                        stub.Get(pb.GetRequest(session_id=session, id=memory.memory.id))
                        stored += 1
                    except grpc.RpcError as error:
                        if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the write budget, not a reload
                            trailing = cast("Iterable[tuple[str, str]]", error.trailing_metadata())
                            time.sleep(int(dict(trailing)["retry-after-ms"]) / 1000)
                            continue
                        failures.append(f"{error.code().name}: {error.details()}")

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            versions = set()
            for index in range(100):
                response = guardian.admin("ApplyPolicy", admin_pb2.PolicyText(text=texts[index % 2]))
                versions.add(response.version)
        finally:
            done.set()
            worker.join(timeout=30)
        assert not failures, failures[:5]
        assert len(versions) == 2 and stored > 0
        applies = [r for r in guardian.audit_rows() if r["operation"] == "admin.policy.apply"]
        assert len(applies) == 100 and {r["decision"] for r in applies} == {"allow"}
        print(f"100 policy applies during traffic: {stored} store+get pairs, 0 failed")


def test_the_agent_socket_has_no_policy_calls() -> None:
    with running_guardian() as guardian:
        with grpc.insecure_channel(f"unix:{guardian.agent_socket}") as channel:
            for method in ("ShowPolicy", "ApplyPolicy", "PolicyHistory", "ListQuarantine", "UnlockAgent"):
                call = channel.unary_unary(
                    f"/guardian.v1.AdminService/{method}", request_serializer=None, response_deserializer=None
                )
                with pytest.raises(grpc.RpcError) as caught:
                    call(b"")
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        denied = [r["object_id"] for r in guardian.audit_rows() if r["operation"] == "rpc.unknown"]
        assert "/guardian.v1.AdminService/ApplyPolicy" in denied


def test_guardianctl_quarantine_list_show_release_purge() -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("writer")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
            ids = [
                stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=text))).memory.id
                for text in ("<script>first</script>", "<iframe src=x> second")
            ]
        listed = json.loads(guardian.ctl("--json", "quarantine", "list").stdout)
        assert [row["id"] for row in listed] == ids and listed[0]["rules"] == ["script-injection"]
        shown = guardian.ctl("quarantine", "show", ids[0])
        assert shown.returncode == 0 and "<script>first</script>" in shown.stdout and "writer" in shown.stdout
        assert "source:      agent" in shown.stdout and "trust:       unverified" in shown.stdout
        session_line = next(line for line in shown.stdout.splitlines() if line.startswith("session:"))
        assert session_line.split()[1] == hashlib.sha256(session.encode()).hexdigest()[:16]
        assert listed[0]["source"] == "agent" and listed[0]["derived_from"] == []
        assert guardian.ctl("quarantine", "release", ids[0]).returncode == 0
        assert guardian.ctl("quarantine", "purge", ids[1]).returncode == 0
        assert json.loads(guardian.ctl("--json", "quarantine", "list").stdout) == []
        missing = guardian.ctl("quarantine", "show", ids[1])
        assert missing.returncode == 1 and "guardianctl: not found: " in missing.stderr
        bad = guardian.ctl("quarantine", "release", "not-an-id")
        assert bad.returncode == 1 and "guardianctl: invalid request: " in bad.stderr
        operators = {r["agent"] for r in guardian.audit_rows() if r["operation"] == "admin.quarantine.release"}
        assert all(name.startswith("@admin:") for name in operators)
