"""The guardian's operations endpoint and gRPC health, checked with the real curl.

/healthz says alive; /readyz and the gRPC health service turn unready while the
database cannot take a write (here: another connection holds its write lock,
as a stuck backup or a hostile process would) and ready again after; /metrics
follows Prometheus naming and counts what the guardian did.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardian.state.config import load_config
from shared.errors import ConfigError
from shared.rpc.guardian.v1 import admin_pb2
from tests.support.harness import Guardian, agent_pb2, running_guardian
from tests.support.harness import curl as harness_curl

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def curl(url: str) -> tuple[int, str]:
    answer = harness_curl(url)
    return answer.status, answer.body


def health(guardian: Guardian, service: str = "guardian.v1.AgentService") -> int:
    with grpc.insecure_channel(f"unix:{guardian.agent_socket}") as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status)


def wait_for(check: Any, timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    with running_guardian() as started:
        token = started.add_agent("watched")
        channel, stub = started.agent_stub()
        with channel:
            session = stub.OpenSession(agent_pb2.OpenSessionRequest(agent_token=token)).session_id
            stub.Store(agent_pb2.StoreRequest(session_id=session, memory=agent_pb2.MemoryDraft(content="a note")))
            with pytest.raises(grpc.RpcError):
                stub.Get(agent_pb2.GetRequest(session_id=session, id="mem_" + "0" * 32))
        yield started


def test_healthz_and_readyz_report_alive_and_ready(guardian: Guardian) -> None:
    assert curl(guardian.ops_url + "/healthz") == (200, '{"alive": true}\n')
    status, body = curl(guardian.ops_url + "/readyz")
    assert status == 200
    checks = {"audit": "ok", "database": "ok", "policy": "ok"}
    assert json.loads(body) == {"ready": True, "checks": checks, "warnings": {}}
    assert curl(guardian.ops_url + "/nowhere")[0] == 404
    assert health(guardian) == SERVING and health(guardian, "") == SERVING


def test_metrics_follow_prometheus_conventions_and_count_requests(guardian: Guardian) -> None:
    status, text = curl(guardian.ops_url + "/metrics")
    assert status == 200
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    expected = {
        "guardian_requests_total": "counter",
        "guardian_denials_total": "counter",
        "guardian_request_duration_seconds": "histogram",
        "guardian_rate_limit_hits_total": "counter",
        "guardian_filter_hits_total": "counter",
        "guardian_anomaly_events_total": "counter",
        "guardian_audit_write_failures_total": "counter",
        "guardian_sessions_open": "gauge",
        "guardian_database_size_bytes": "gauge",
        "guardian_audit_chain_rows": "gauge",
        "guardian_policy_file_refused": "gauge",
        "guardian_policy_info": "gauge",
    }
    families = types
    assert families == expected
    assert all(name.startswith("guardian_") for name in families)
    assert "_created" not in text
    samples = dict(re.findall(r"^(\S+) (\S+)$", text, re.MULTILINE))
    assert float(samples['guardian_requests_total{decision="allow",operation="memory.store"}']) == 1
    assert float(samples['guardian_requests_total{decision="deny",operation="memory.get"}']) == 1
    assert float(samples['guardian_denials_total{reason="not_found"}']) == 1
    assert float(samples['guardian_request_duration_seconds_count{operation="memory.store"}']) == 1
    assert float(samples["guardian_sessions_open"]) == 1
    assert float(samples["guardian_database_size_bytes"]) > 4096
    rows = guardian.audit_rows()
    assert float(samples["guardian_audit_chain_rows"]) == rows[-1]["seq"] == len(rows)
    policy_version = next(row["policy_version"] for row in rows)
    assert float(samples[f'guardian_policy_info{{version="{policy_version}"}}']) == 1
    assert "watched" not in text and "a note" not in text, "no agent names or content in labels"


def test_a_held_write_lock_makes_the_guardian_unready_then_ready_again(guardian: Guardian) -> None:
    with guardian.keyed_db() as db:
        db.execute("BEGIN IMMEDIATE")  # holds the database's write lock
        try:
            status, body = curl(guardian.ops_url + "/readyz")
            assert status == 503
            checks = json.loads(body)["checks"]
            assert checks["database"] == "a write transaction cannot start: database is locked"
            assert checks["audit"] != "ok" and checks["policy"] == "ok"
            assert curl(guardian.ops_url + "/healthz")[0] == 200, "alive, only not ready"
            assert wait_for(lambda: health(guardian) == NOT_SERVING), "gRPC health follows readiness"
            assert health(guardian, "") == NOT_SERVING
        finally:
            db.execute("ROLLBACK")
    assert curl(guardian.ops_url + "/readyz")[0] == 200
    assert wait_for(lambda: health(guardian) == SERVING)


def test_a_failed_audit_write_makes_the_guardian_unready_until_one_succeeds() -> None:
    with running_guardian() as guardian:
        guardian.check_audit = False  # the blocked request has no row, by design
        with guardian.keyed_db() as db:
            db.execute("CREATE TRIGGER audit_blocked BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'no'); END")
        with pytest.raises(grpc.RpcError):
            guardian.add_agent("blocked")
        status, body = curl(guardian.ops_url + "/readyz")
        assert status == 503 and json.loads(body)["checks"]["audit"].startswith("the last audit row could not")
        _, metrics = curl(guardian.ops_url + "/metrics")
        assert re.search(r"^guardian_audit_write_failures_total ([1-9]\d*)\.0$", metrics, re.MULTILINE)
        with guardian.keyed_db() as db:
            db.execute("DROP TRIGGER audit_blocked")
        guardian.add_agent("unblocked")
        assert curl(guardian.ops_url + "/readyz")[0] == 200


def test_the_chain_head_is_published_at_the_interval_and_at_shutdown() -> None:
    with running_guardian() as guardian:
        guardian.stop()
        guardian.set_config(audit={"head_interval": "1s"}, housekeeping_interval="1s")
        guardian.start()
        guardian.add_agent("headed")

        def heads() -> list[dict[str, Any]]:
            lines = guardian.log_path.read_text().splitlines()
            return [json.loads(line) for line in lines if '"audit_chain_head"' in line]

        assert wait_for(lambda: [h for h in heads() if h["published_because"] == "interval"], 10)
        guardian.stop()
        last = heads()[-1]
        assert last["published_because"] == "shutdown"
        assert last["logger"] == "agent_guardian.security"
        rows = guardian.audit_rows()
        assert (last["seq"], last["mac"]) == (rows[-1]["seq"], rows[-1]["mac"])
        assert json.loads((guardian.state_dir / "audit-head.json").read_text()) == {
            "seq": last["seq"],
            "mac": last["mac"],
        }


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("0.0.0.0:9464", "not a loopback address"),
        ("10.1.2.3:9464", "not a loopback address"),
        ("localhost:9464", "must be a loopback IP address"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("127.0.0.1:99999", "out of range"),
    ],
)
def test_the_ops_endpoint_listens_only_on_loopback(tmp_path: Any, listen: str, message: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f'ops:\n  listen: "{listen}"\n')
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_the_security_log_file_holds_denials_anomalies_policy_changes_heads_and_admin_actions() -> None:
    anomalies = {"denials": {"threshold": 2, "window": "1m", "response": "log"}}
    with running_guardian(anomaly=anomalies) as guardian:
        guardian.stop()
        main_file, security_file = guardian.state_dir / "guardian.log", guardian.state_dir / "security.log"
        guardian.set_config(logging={"file": str(main_file), "security_file": str(security_file)})
        guardian.start()
        token = guardian.add_agent("logged")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(agent_pb2.OpenSessionRequest(agent_token=token)).session_id
            for _ in range(3):
                with pytest.raises(grpc.RpcError):
                    stub.Get(agent_pb2.GetRequest(session_id=session, id="mem_" + "1" * 32))
        policy = yaml.safe_load(guardian.admin("ShowPolicy", admin_pb2.ShowPolicyRequest()).text)
        policy["anomaly"]["denials"]["threshold"] = 3
        guardian.admin("ApplyPolicy", admin_pb2.PolicyText(text=yaml.safe_dump(policy)))
        first_admin = guardian.admin("WhoAmI", admin_pb2.WhoAmIRequest())
        guardian.stop()
        security = [json.loads(line) for line in security_file.read_text().splitlines()]
        main = [json.loads(line) for line in main_file.read_text().splitlines()]
    events = {entry.get("event") for entry in security}
    assert {"denied", "anomaly", "policy_applied", "audit_chain_head", "admin_action"} <= events
    assert all(entry["logger"] == "agent_guardian.security" for entry in security)
    assert not any(entry["logger"] == "agent_guardian.security" for entry in main), "security lines only there"
    assert {"serving", "stopped"} <= {entry.get("event") for entry in main}
    applied = next(
        entry for entry in security if entry.get("event") == "policy_applied" and entry["by"] != "@policy-file"
    )
    assert applied["by"] == f"@admin:{first_admin.name}" and applied["source"] == "apply"
    admin_actions = [entry for entry in security if entry.get("event") == "admin_action"]
    assert {entry["key"] for entry in admin_actions} == {first_admin.fingerprint}
    assert {"admin.agent.add", "admin.policy.show", "admin.policy.apply"} <= {a["operation"] for a in admin_actions}
