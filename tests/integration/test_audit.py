"""The audit chain: its canonical form, tamper detection through `guardianctl audit verify`,
fail-closed writes, the published heads, and reading the trail with `guardianctl audit`.

Tampering goes through a direct keyed connection to the database, as someone
holding the database key (but not the audit key) could.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import pytest

from guardian.keys.ring import KeyRing
from guardian.store import audit
from guardian.store.audit import AuditRow, AuditTrail
from shared.rpc.guardian.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tests.support.harness import ROOT, Guardian, running_guardian


def traffic(guardian: Guardian) -> None:
    """Allowed and denied requests: a few dozen audit rows."""
    token = guardian.add_agent("auditee")
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(agent_pb2.OpenSessionRequest(agent_token=token)).session_id
        for index in range(4):
            stub.Store(
                agent_pb2.StoreRequest(session_id=session, memory=agent_pb2.MemoryDraft(content=f"note {index}"))
            )
        for bad in ("", "not-a-session"):
            with pytest.raises(grpc.RpcError):
                stub.Store(agent_pb2.StoreRequest(session_id=bad, memory=agent_pb2.MemoryDraft(content="x")))
        stub.Search(agent_pb2.SearchRequest(session_id=session, query="note"))


# -- the canonical form ----------------------------------------------------------------------------


def test_the_canonical_form_is_pinned() -> None:
    """canonical(row) is documented as never-to-change: this vector must keep its mac forever."""
    row = AuditRow(
        seq=7,
        ts_ms=1795600000000,
        agent="alice",
        session="0123456789abcdef",
        operation="memory.store",
        object_id="mem_x",
        decision="allow",
        reason="ok",
        policy_version="p" * 64,
        args_digest="d" * 32,
        key_id="k1",
        mac="",
    )
    expected = (
        b"agent-guardian audit v1\n1:7,13:1795600000000,5:alice,16:0123456789abcdef,12:memory.store,"
        b"5:mem_x,5:allow,2:ok,64:" + b"p" * 64 + b",32:" + b"d" * 32 + b",2:k1,"
    )
    assert audit.canonical(row) == expected
    # The first row's mac under a known key: the genesis prev_mac is 64 ASCII zeros.
    ring = KeyRing(primary_id="k1", keys=MappingProxyType({"k1": bytes(range(32))}))
    pinned = "61922f91e0e6c700122d992ff2b77e80ad0fcd182855b62a14a068f2dfe5b1be"
    assert ring.sign(audit.canonical(row) + b"0" * 64) == ("k1", pinned)


def test_a_field_with_a_separator_cannot_pass_for_two_fields() -> None:
    base = dict(
        seq=1, ts_ms=1, session="", operation="op", object_id="", decision="allow", reason="r", policy_version="v"
    )
    one = AuditRow(agent="a,1:b", **base, args_digest="", key_id="k1", mac="")  # type: ignore[arg-type]
    two = AuditRow(agent="a", **base, args_digest="", key_id="k1", mac="")  # type: ignore[arg-type]
    assert audit.canonical(one) != audit.canonical(two)


# -- tampering, caught by guardianctl audit verify -------------------------------------------------


@pytest.fixture
def stopped_with_history() -> Iterator[Guardian]:
    """A guardian that served some traffic and was stopped (publishing its head at shutdown)."""
    with running_guardian() as guardian:
        guardian.check_audit = False  # these tests rewrite the trail on purpose
        traffic(guardian)
        guardian.stop()
        yield guardian


def row_count(guardian: Guardian) -> int:
    with guardian.keyed_db() as db:
        return int(db.execute("SELECT count(*) FROM audit").fetchone()[0])


def tamper_and_verify(guardian: Guardian, tamper: Callable[[Any], None], *verify_args: str) -> str:
    with guardian.keyed_db() as db:
        tamper(db)
    guardian.start()
    result = guardian.ctl("audit", "verify", *verify_args)
    assert result.returncode == 1, result.stdout + result.stderr
    return result.stdout


def test_an_untouched_chain_verifies(stopped_with_history: Guardian) -> None:
    guardian = stopped_with_history
    rows = row_count(guardian)
    guardian.start()
    result = guardian.ctl("--json", "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["intact"] is True
    assert report["rows_checked"] >= rows >= 10
    assert report["last_published_seq"] == rows  # the head published at shutdown


def test_a_changed_field_is_caught_naming_the_row(stopped_with_history: Guardian) -> None:
    def change(db: Any) -> None:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET reason = reason || ' (edited)' WHERE seq = 5")

    out = tamper_and_verify(stopped_with_history, change)
    assert out.startswith("BROKEN at row 5:"), out
    assert "does not match its mac" in out


def test_a_deleted_row_is_caught_naming_the_row(stopped_with_history: Guardian) -> None:
    def delete(db: Any) -> None:
        db.execute("DROP TRIGGER audit_no_delete")
        db.execute("DELETE FROM audit WHERE seq = 4")

    out = tamper_and_verify(stopped_with_history, delete)
    assert out.startswith("BROKEN at row 5:"), out
    assert "row 4 is missing" in out


def test_reordered_rows_are_caught_naming_the_row(stopped_with_history: Guardian) -> None:
    def swap(db: Any) -> None:
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET seq = -1 WHERE seq = 6")
        db.execute("UPDATE audit SET seq = 6 WHERE seq = 7")
        db.execute("UPDATE audit SET seq = 7 WHERE seq = -1")

    out = tamper_and_verify(stopped_with_history, swap)
    assert out.startswith("BROKEN at row 6:"), out


def test_a_truncated_tail_is_caught_by_the_published_head(stopped_with_history: Guardian) -> None:
    guardian = stopped_with_history
    rows = row_count(guardian)

    def truncate(db: Any) -> None:
        db.execute("DROP TRIGGER audit_no_delete")
        db.execute("DELETE FROM audit WHERE seq > ?", (rows - 3,))

    out = tamper_and_verify(guardian, truncate)
    assert f"the chain ends at row {rows - 3} but row {rows} was published" in out
    log = guardian.log_path.read_text()
    assert '"audit_head_mismatch"' in log, "the guardian must say so when it starts"
    # The head file keeps the evidence: a later publication does not overwrite it.
    assert json.loads((guardian.state_dir / "audit-head.json").read_text())["seq"] == rows


def test_a_truncated_tail_is_caught_from_the_security_log_alone(stopped_with_history: Guardian) -> None:
    """Someone who also deletes the head file is still caught by the heads in the security log."""
    guardian = stopped_with_history
    rows = row_count(guardian)
    security_log = guardian.state_dir / "security-copy.log"
    security_log.write_text(guardian.log_path.read_text())  # what was shipped off the host

    def truncate(db: Any) -> None:
        db.execute("DROP TRIGGER audit_no_delete")
        db.execute("DELETE FROM audit WHERE seq > ?", (rows - 2,))
        (guardian.state_dir / "audit-head.json").unlink()

    out = tamper_and_verify(guardian, truncate, "--security-log", str(security_log))
    assert f"but row {rows} was published" in out


def test_a_chain_rebuilt_without_the_audit_key_is_caught_at_row_1(stopped_with_history: Guardian) -> None:
    guardian = stopped_with_history

    def rebuild(db: Any) -> None:
        forged = AuditTrail(KeyRing(primary_id="k1", keys=MappingProxyType({"k1": secrets.token_bytes(32)})))
        rows = db.execute(
            "SELECT ts_ms, agent, session, operation, object_id, decision, reason, policy_version FROM audit"
            " ORDER BY seq"
        ).fetchall()
        db.execute("DROP TRIGGER audit_no_delete")
        db.execute("DELETE FROM audit")
        for values in rows:
            forged.append(db, audit.AuditRecord(*values))
        (guardian.state_dir / "audit-head.json").unlink()

    out = tamper_and_verify(guardian, rebuild)
    assert out.startswith("BROKEN at row 1:"), out


# -- fail closed ---------------------------------------------------------------------------------------


def test_a_request_whose_audit_row_cannot_be_written_does_not_happen() -> None:
    with running_guardian() as guardian:
        guardian.check_audit = False
        token = guardian.add_agent("closed")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(agent_pb2.OpenSessionRequest(agent_token=token)).session_id
            with guardian.keyed_db() as db:
                db.execute(
                    "CREATE TRIGGER audit_blocked BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'blocked'); END"
                )
            with pytest.raises(grpc.RpcError) as caught:
                stub.Store(agent_pb2.StoreRequest(session_id=session, memory=agent_pb2.MemoryDraft(content="lost?")))
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert caught.value.details() == "internal error"
            with guardian.keyed_db() as db:
                assert db.execute("SELECT count(*) FROM memories").fetchone()[0] == 0
                db.execute("DROP TRIGGER audit_blocked")
            stored = stub.Store(
                agent_pb2.StoreRequest(session_id=session, memory=agent_pb2.MemoryDraft(content="kept"))
            )
        rows = guardian.audit_rows()
        assert rows[-1]["object_id"] == stored.memory.id and rows[-1]["decision"] == "allow"
        with guardian.keyed_db() as db:
            assert db.execute("SELECT count(*) FROM memories").fetchone()[0] == 1
        assert guardian.ctl("audit", "verify").returncode == 0


# -- reading the trail --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy() -> Iterator[Guardian]:
    with running_guardian() as guardian:
        traffic(guardian)
        yield guardian


def test_every_row_carries_a_keyed_digest_of_its_request_and_never_the_token(busy: Guardian) -> None:
    rows = busy.audit_rows()
    stores = [row for row in rows if row["operation"] == "memory.store" and row["decision"] == "allow"]
    assert len(stores) == 4
    assert len({row["args_digest"] for row in stores}) == 4  # different requests, different digests
    assert all(len(row["args_digest"]) == 32 for row in stores)
    assert all(row["key_id"] == "k1" and len(row["mac"]) == 64 for row in rows)
    opens = [row for row in rows if row["operation"] == "session.open"]
    assert opens and all("agt_" not in json.dumps(row) for row in rows)


def test_query_filters_by_agent_operation_decision_and_time(busy: Guardian) -> None:
    result = busy.ctl("--json", "audit", "query", "--operation", "memory.*", "--decision", "deny")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and {row["operation"] for row in rows} == {"memory.store"}
    assert all(row["decision"] == "deny" and row["reason"].startswith("unauthenticated") for row in rows)
    mine = [json.loads(line) for line in busy.ctl("--json", "audit", "query", "--agent", "auditee").stdout.splitlines()]
    assert mine and all(row["agent"] == "auditee" for row in mine)
    assert busy.ctl("--json", "audit", "query", "--since", "2h", "--until", "1h").stdout == ""
    future = busy.ctl("audit", "query", "--since", "2999-01-01T00:00:00Z")
    assert future.returncode == 0 and future.stdout == ""
    bad = busy.ctl("audit", "query", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "is not a time" in bad.stderr
    bad_decision = busy.ctl("audit", "query", "--decision", "maybe")
    assert bad_decision.returncode == 2


def test_tail_shows_the_newest_rows_in_order(busy: Guardian) -> None:
    newest = busy.audit_rows()[-1]["seq"]
    result = busy.ctl("--json", "audit", "tail", "-n", "3")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["seq"] for row in rows] == [newest - 2, newest - 1, newest]


def test_tail_follow_prints_new_rows_and_not_its_own_reads(busy: Guardian) -> None:
    follower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guardian.ctl.main",
            "--config",
            str(busy.config),
            "--json",
            "audit",
            "tail",
            "-n",
            "1",
            "-f",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        follower.stdout.readline()  # the newest row at start
        time.sleep(0.5)
        busy.add_agent("followed")
        seen = json.loads(follower.stdout.readline())
        assert (seen["operation"], seen["object_id"]) == ("admin.agent.add", "followed")
    finally:
        follower.send_signal(signal.SIGINT)
        ended = follower.wait(timeout=10)
    assert ended == 0, "Ctrl-C is how following ends: exit status 0"
    time.sleep(0.2)
    own_reads = [r for r in busy.audit_rows() if r["operation"] == "admin.audit.query" and r["seq"] > seen["seq"]]
    assert len(own_reads) <= 3, "following waits on the guardian instead of polling it"


def test_ctrl_c_ends_following_at_once_while_it_waits_for_rows(busy: Guardian) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "guardian.ctl.main", "--config", str(busy.config), "audit", "tail", "-n", "1", "-f"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        follower.stdout.readline()  # started, and now waiting on the guardian for the next rows (up to 5 s a call)
        time.sleep(1.0)
        follower.send_signal(signal.SIGINT)
        sent = time.monotonic()
        assert follower.wait(timeout=10) == 0
        waited_s = time.monotonic() - sent
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    # Not the rest of the guardian's 5 s wait: the call in progress is cancelled (a generous bound for slow CI).
    assert waited_s < 3.0, f"Ctrl-C took {waited_s:.1f} s to end following"
    assert follower.stderr is not None and "Traceback" not in follower.stderr.read()


def test_export_writes_every_row_as_json_lines_and_refuses_to_overwrite(busy: Guardian, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    before = len(busy.audit_rows())
    result = busy.ctl("audit", "export", "--format", "jsonl", "--output", str(target))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) >= before and [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
    assert set(rows[0]) == {f.name for f in AuditRow.__dataclass_fields__.values()}
    again = busy.ctl("audit", "export", "--output", str(target))
    assert again.returncode != 0 and target.read_text().count("\n") == len(rows)


def test_audit_reads_are_themselves_audited_with_the_operator(busy: Guardian) -> None:
    busy.ctl("audit", "verify")
    row = [r for r in busy.audit_rows() if r["operation"] == "admin.audit.verify"][-1]
    assert row["agent"].startswith("@admin:") and row["object_id"].startswith("intact:")


def test_the_agent_socket_serves_no_audit_call(busy: Guardian) -> None:
    with grpc.insecure_channel(f"unix:{busy.agent_socket}") as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        calls: tuple[tuple[Callable[[Any], object], object], ...] = (
            (stub.QueryAudit, admin_pb2.AuditQuery()),
            (stub.VerifyAudit, admin_pb2.VerifyAuditRequest()),
        )
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    refused = [r["object_id"] for r in busy.audit_rows() if r["operation"] == "rpc.unknown"]
    assert "/guardian.v1.AdminService/QueryAudit" in refused and "/guardian.v1.AdminService/VerifyAudit" in refused
    # No agent RPC answers with anything of the trail: no response message holds an audit field.
    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    seen: set[str] = set()

    def fields(message: Any) -> Iterator[str]:
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        for field in message.fields:
            yield field.name
            if field.message_type is not None:
                yield from fields(field.message_type)

    names = {name for method in service.methods for name in fields(method.output_type)}
    assert not names & {"mac", "args_digest", "decision", "policy_version", "reason", "seq"}
    assert not hasattr(agent_pb2_grpc, "AdminServiceStub")


# -- rows written before the chain existed -------------------------------------------------------


def test_rows_from_before_the_chain_are_moved_into_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from guardian.keys.ring import load_keys
    from guardian.state.config import load_config
    from guardian.state.core import GuardianCore
    from guardian.state.statedir import init_state_dir
    from guardian.store import database, schema

    config = load_config(init_state_dir(tmp_path / "state").config)
    keys = load_keys(config.keys_dir)
    config.database.unlink()
    # A schema-2 database, with rows written the old way.
    monkeypatch.setattr(database, "MIGRATIONS", schema.MIGRATIONS[:2])
    monkeypatch.setattr(database, "SCHEMA_VERSION", 2)
    old = database.Database(config.database, keys.database_hex)
    with old.write() as connection:
        for index in range(3):
            connection.execute(
                "INSERT INTO audit (ts_ms, agent, session, operation, object_id, decision, reason, policy_version)"
                " VALUES (?, 'old-agent', '', 'memory.store', ?, 'allow', 'ok', 'v')",
                (1000 + index, f"mem_{index}"),
            )
    old.close()
    monkeypatch.undo()
    core = GuardianCore.open(config)
    try:
        with core.database.read() as reader:
            rows = audit.query(reader, audit.AuditQuery(limit=1000))
            report = core.audit.verify(reader)
            tables = {row[0] for row in reader.execute("SELECT name FROM sqlite_master").fetchall()}
        assert [row.object_id for row in rows[:3]] == ["mem_0", "mem_1", "mem_2"]
        assert [row.seq for row in rows] == list(range(1, len(rows) + 1))
        assert report.intact and report.rows_checked == len(rows) >= 4
        assert "audit_unchained" not in tables
    finally:
        core.close()
