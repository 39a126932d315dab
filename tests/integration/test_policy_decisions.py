"""Policy decisions through a real guardian on its real socket, one table per rule type.

Each case asserts the outcome the agent sees and the audit row it left:
decision, reason and the policy version that decided it.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from shared.rpc.guardian.v1 import admin_pb2, agent_pb2_grpc
from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, running_guardian

pb = agent_pb2
OK = None


def _hours_not_now() -> dict[str, Any]:
    """An allowed-hours window that excludes the current UTC hour (all week)."""
    now = datetime.datetime.now(datetime.UTC)
    start = (now.hour + 2) % 24
    return {"timezone": "UTC", "from": f"{start:02d}:00", "to": f"{(start + 1) % 24:02d}:00"}


POLICY: dict[str, Any] = {
    "limits": {"max_content_bytes": 200, "max_tags": 3, "max_batch": 3, "max_metadata_depth": 3},
    "filters": [
        {"name": "test-secret", "pattern": r"SECRET-[0-9]{4}", "action": "reject"},
        {"name": "test-password", "pattern": r"pw=\S+", "action": "redact"},
        {"name": "test-script", "pattern": r"<script", "action": "quarantine", "ignore_case": True},
        {"name": "test-injection", "pattern": r"ignore previous instructions", "action": "flag"},
    ],
    "anomaly": {
        "unknown_ids": {"threshold": 3, "window": "1m", "response": "lock_agent", "lock": "1m"},
        "filter_hits": {"threshold": 100, "window": "1m", "response": "log"},
    },
    "profiles": {
        "default": {"operations": ["store", "get", "search", "list", "update", "delete"]},
        "reader": {"operations": ["get", "search", "list"]},
        "tight": {
            "operations": ["store", "get", "search", "list", "update", "delete"],
            "rate_limits": {
                "session": {"writes": {"burst": 3, "per_minute": 1}},
                "agent": {"writes": {"burst": 5, "per_minute": 1}},
                "cooldown": "30s",
            },
        },
        "brief": {
            "operations": ["store", "get"],
            "limits": {"max_batch": 2},
            "rate_limits": {"session": {"writes": {"burst": 2, "per_minute": 60}}, "cooldown": "1s"},
        },
        "night": {"operations": ["store", "get"], "allowed_hours": _hours_not_now()},
        "windowed": {"operations": ["store", "get", "search", "list"], "read_window": "1s"},
        "team": {
            "operations": ["store", "get", "search", "list", "update", "delete"],
            "namespaces": {"read": ["team-notes"], "write": ["team-notes"]},
        },
        "team-reader": {
            "operations": ["store", "get", "search", "list", "update", "delete"],
            "namespaces": {"read": ["team-notes"]},
        },
    },
    "agents": {
        "reader": "reader",
        "tight": "tight",
        "brief": "brief",
        "night": "night",
        "windowed": "windowed",
        "teamw": "team",
        "teamr": "team-reader",
    },
}


@dataclass
class Agent:
    name: str
    stub: agent_pb2_grpc.AgentServiceStub
    session: str
    token: str = ""

    def store(self, content: str, **draft: Any) -> pb.Memory:
        request = pb.StoreRequest(session_id=self.session, memory=pb.MemoryDraft(content=content, **draft))
        return self.stub.Store(request).memory


World = tuple[Guardian, dict[str, Agent]]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_guardian(**POLICY) as guardian:
        channel, stub = guardian.agent_stub()
        agents: dict[str, Agent] = {}
        for name in ("alice", "reader", "tight", "brief", "night", "windowed", "teamw", "teamr", "prober"):
            token = guardian.add_agent(name)
            if name == "night":  # outside its hours it cannot even open a session
                agents[name] = Agent(name, stub, token)
                continue
            session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
            agents[name] = Agent(name, stub, session, token)
        yield guardian, agents
        channel.close()


def running_version(guardian: Guardian) -> str:
    info: admin_pb2.PolicyInfo = guardian.admin("ShowPolicy", admin_pb2.ShowPolicyRequest())
    return info.version


def last_row(guardian: Guardian, agent: str) -> dict[str, Any]:
    return [row for row in guardian.audit_rows() if row["agent"] == agent][-1]


def expect(call: Any, code: grpc.StatusCode | None) -> Any:
    if code is None:
        return call()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value


def assert_audited(guardian: Guardian, agent: str, operation: str, decision: str, reason: str) -> dict[str, Any]:
    row = last_row(guardian, agent)
    assert (row["operation"], row["decision"]) == (operation, decision), row
    assert row["reason"].startswith(reason), row
    assert row["policy_version"] == running_version(guardian)
    return row


# -- limits -----------------------------------------------------------------------------------

LIMIT_CASES = [
    ("content over max_content_bytes", {"content": "x" * 201}, "invalid_argument: memory.content: 201 bytes"),
    ("four tags, limit three", {"content": "ok", "tags": ["a", "b", "c", "d"]}, "invalid_argument: memory.tags"),
    ("metadata four deep, limit three", {"content": "ok", "metadata_json": '{"a":{"b":{"c":{}}}}'}, "invalid_argument"),
    ("a namespace name that is not one", {"content": "ok", "namespace": "../etc"}, "invalid_argument"),
]


@pytest.mark.parametrize(("case", "draft", "reason"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES])
def test_limits(world: World, case: str, draft: dict[str, Any], reason: str) -> None:
    guardian, agents = world
    alice = agents["alice"]
    error = expect(lambda: alice.store(**draft), grpc.StatusCode.INVALID_ARGUMENT)
    assert "x" * 50 not in error.details()
    assert_audited(guardian, "alice", "memory.store", "deny", reason)


def test_batch_over_the_limit(world: World) -> None:
    guardian, agents = world
    alice = agents["alice"]
    request = pb.StoreBatchRequest(session_id=alice.session, memories=[pb.MemoryDraft(content="m")] * 4)
    expect(lambda: alice.stub.StoreBatch(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert_audited(guardian, "alice", "memory.store_batch", "deny", "invalid_argument: memories: 4 is over")


# -- content filters -------------------------------------------------------------------------------

FILTER_CASES = [
    # (case, content, expected status code, audit reason prefix, stored content or None, status)
    ("reject names the rule only", "key SECRET-1234 here", grpc.StatusCode.PERMISSION_DENIED,
     "permission_denied: content refused by filter test-secret", None, None),
    ("zero-width split still rejected", "key SECRET-\u200b1234", grpc.StatusCode.PERMISSION_DENIED,
     "permission_denied: content refused by filter test-secret", None, None),
    ("fullwidth digits still rejected", "key SECRET-\uff11\uff12\uff13\uff14", grpc.StatusCode.PERMISSION_DENIED,
     "permission_denied: content refused by filter test-secret", None, None),
    ("redact replaces the match", "login pw=hunter2 ok", OK,
     "ok; filters: redact:test-password", "login [redacted:test-password] ok", "active"),
    ("quarantine stores but hides", "note <SCRIPT>alert(1)</script>", OK,
     "ok, quarantined; filters: quarantine:test-script", None, "quarantined"),
    ("flag stores and records", "please ignore previous instructions", OK,
     "ok; filters: flag:test-injection", "please ignore previous instructions", "active"),
    ("clean content passes", "the build is green", OK, "ok", "the build is green", "active"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "content", "code", "reason", "stored", "status"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES]
)
def test_content_filters(
    world: World,
    case: str,
    content: str,
    code: grpc.StatusCode | None,
    reason: str,
    stored: str | None,
    status: str | None,
) -> None:
    guardian, agents = world
    alice = agents["alice"]
    result = expect(lambda: alice.store(content), code)
    row = assert_audited(guardian, "alice", "memory.store", "deny" if code else "allow", reason)
    if code is not None:
        assert "1234" not in result.details() and "\uff11" not in result.details()
        return
    assert result.status == status
    if stored is not None:
        assert result.content == stored
        got = alice.stub.Get(pb.GetRequest(session_id=alice.session, id=result.id)).memory
        assert got.content == stored
    if status == "quarantined":
        assert row["object_id"] == result.id
        expect(lambda: alice.stub.Get(pb.GetRequest(session_id=alice.session, id=result.id)), grpc.StatusCode.NOT_FOUND)
        hits = alice.stub.Search(pb.SearchRequest(session_id=alice.session, query="alert script")).hits
        assert result.id not in [hit.memory.id for hit in hits]


def test_filters_apply_to_updates_tags_and_metadata(world: World) -> None:
    guardian, agents = world
    alice = agents["alice"]
    memory = alice.store("plain")
    update = pb.UpdateRequest(session_id=alice.session, id=memory.id, content="now SECRET-9876")
    expect(lambda: alice.stub.Update(update), grpc.StatusCode.PERMISSION_DENIED)
    assert_audited(guardian, "alice", "memory.update", "deny", "permission_denied: content refused by filter")
    got = alice.stub.Get(pb.GetRequest(session_id=alice.session, id=memory.id)).memory
    assert got.content == "plain"
    tagged = alice.store("tagged", tags=["pw=abc"], metadata_json='{"note": "pw=xyz"}')
    assert list(tagged.tags) == ["[redacted:test-password]"]
    assert "xyz" not in tagged.metadata_json and "[redacted:test-password]" in tagged.metadata_json


def test_redaction_that_would_overflow_the_limit_is_refused(world: World) -> None:
    guardian, agents = world
    alice = agents["alice"]
    # 180 bytes of input; each 8-byte match grows to a 24-byte marker, far over the 200-byte limit.
    expect(lambda: alice.store("pw=abcde " * 20), grpc.StatusCode.INVALID_ARGUMENT)
    assert_audited(guardian, "alice", "memory.store", "deny", "invalid_argument: content (as stored, once redacted)")


def test_quarantine_release_and_purge(world: World) -> None:
    guardian, agents = world
    alice = agents["alice"]
    held = alice.store("<script>one</script>")
    purged = alice.store("<script>two</script>")
    listed = guardian.admin("ListQuarantine", admin_pb2.ListQuarantineRequest()).memories
    assert {held.id, purged.id} <= {memory.id for memory in listed}
    shown = guardian.admin("ShowQuarantined", admin_pb2.QuarantineRequest(id=held.id))
    assert shown.content == "<script>one</script>" and list(shown.memory.rules) == ["test-script"]
    guardian.admin("ReleaseQuarantined", admin_pb2.QuarantineRequest(id=held.id))
    got = alice.stub.Get(pb.GetRequest(session_id=alice.session, id=held.id)).memory
    assert got.content == "<script>one</script>" and got.status == "active"
    guardian.admin("PurgeQuarantined", admin_pb2.QuarantineRequest(id=purged.id))
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM memories WHERE id = ?", (purged.id,)).fetchone()[0] == 0
    ops = [(row["operation"], row["object_id"]) for row in guardian.audit_rows() if row["agent"].startswith("@admin")]
    assert ("admin.quarantine.release", held.id) in ops and ("admin.quarantine.purge", purged.id) in ops
    error = expect(
        lambda: guardian.admin("ReleaseQuarantined", admin_pb2.QuarantineRequest(id=purged.id)),
        grpc.StatusCode.NOT_FOUND,
    )
    assert "quarantined" in error.details()


# -- operations, hours, windows, namespaces ---------------------------------------------------------


def test_profile_operations_default_deny(world: World) -> None:
    guardian, agents = world
    reader = agents["reader"]
    expect(lambda: reader.store("mine"), grpc.StatusCode.PERMISSION_DENIED)
    assert_audited(guardian, "reader", "memory.store", "deny", "permission_denied: the policy does not allow")
    reader.stub.List(pb.ListRequest(session_id=reader.session))
    assert_audited(guardian, "reader", "memory.list", "allow", "ok")


def test_allowed_hours(world: World) -> None:
    guardian, agents = world
    night = agents["night"]
    token = night.session
    expect(lambda: night.stub.OpenSession(pb.OpenSessionRequest(agent_token=token)), grpc.StatusCode.PERMISSION_DENIED)
    assert_audited(
        guardian,
        "night",
        "session.open",
        "deny",
        "permission_denied: the policy does not allow this agent to make requests at this time",
    )


def test_read_window(world: World) -> None:
    guardian, agents = world
    windowed = agents["windowed"]
    memory = windowed.store("fresh")
    windowed.stub.Get(pb.GetRequest(session_id=windowed.session, id=memory.id))
    time.sleep(1.1)
    expect(
        lambda: windowed.stub.Get(pb.GetRequest(session_id=windowed.session, id=memory.id)), grpc.StatusCode.NOT_FOUND
    )
    assert_audited(guardian, "windowed", "memory.get", "deny", "not_found")
    assert not windowed.stub.List(pb.ListRequest(session_id=windowed.session)).memories


def test_shared_namespaces(world: World) -> None:
    guardian, agents = world
    writer, reader, alice = agents["teamw"], agents["teamr"], agents["alice"]
    shared = writer.store("team standup at nine", namespace="team-notes")
    assert (shared.namespace, shared.author) == ("team-notes", "teamw")
    got = reader.stub.Get(pb.GetRequest(session_id=reader.session, id=shared.id)).memory
    assert got.content == "team standup at nine"
    expect(lambda: reader.store("mine too", namespace="team-notes"), grpc.StatusCode.PERMISSION_DENIED)
    assert_audited(guardian, "teamr", "memory.store", "deny", "permission_denied: the policy does not let")
    delete = pb.DeleteRequest(session_id=reader.session, id=shared.id)
    expect(lambda: reader.stub.Delete(delete), grpc.StatusCode.PERMISSION_DENIED)
    assert_audited(guardian, "teamr", "memory.delete", "deny", "permission_denied: that memory is in a namespace")
    expect(lambda: alice.stub.Get(pb.GetRequest(session_id=alice.session, id=shared.id)), grpc.StatusCode.NOT_FOUND)
    expect(lambda: alice.store("sneak", namespace="team-notes"), grpc.StatusCode.PERMISSION_DENIED)


# -- rate limits, session limits, anomaly lockout -------------------------------------------------


def test_rate_limit_and_cooldown_survive_new_sessions(world: World) -> None:
    guardian, agents = world
    tight = agents["tight"]
    for index in range(3):
        tight.store(f"write {index}")
    error = expect(lambda: tight.store("one too many"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # The longer of the 30 s cooldown and the time to refill one token at 1 a minute.
    retry_after = int(dict(error.trailing_metadata())["retry-after-ms"])
    assert 30_000 <= retry_after <= 60_000
    assert_audited(guardian, "tight", "memory.store", "deny", "rate_limited")
    # Reads of the same session are refused too while it cools down.
    expect(lambda: tight.stub.List(pb.ListRequest(session_id=tight.session)), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # A new session gets a new session budget, but not a new agent budget (5 writes in all).
    fresh = Agent(
        "tight", tight.stub, tight.stub.OpenSession(pb.OpenSessionRequest(agent_token=tight.token)).session_id
    )
    fresh.store("write 4")
    fresh.store("write 5")
    expect(lambda: fresh.store("write 6"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    # While the agent cools down it cannot open a way around it either.
    reopen = pb.OpenSessionRequest(agent_token=tight.token)
    error = expect(lambda: tight.stub.OpenSession(reopen), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "agent" in error.details()


def test_after_the_cooldown_requests_succeed_again(world: World) -> None:
    guardian, agents = world
    brief = agents["brief"]
    brief.store("one")
    brief.store("two")
    error = expect(lambda: brief.store("three"), grpc.StatusCode.RESOURCE_EXHAUSTED)
    retry_after_ms = int(dict(error.trailing_metadata())["retry-after-ms"])
    assert 900 <= retry_after_ms <= 1100
    time.sleep(retry_after_ms / 1000 + 0.1)
    assert brief.store("three, later").content == "three, later"
    assert_audited(guardian, "brief", "memory.store", "allow", "ok")


def test_session_opens_are_limited_per_agent(world: World) -> None:
    guardian, _ = world
    token = guardian.add_agent("opener")
    channel, stub = guardian.agent_stub()
    with channel:
        codes = []
        for _ in range(12):
            try:
                stub.OpenSession(pb.OpenSessionRequest(agent_token=token))
                codes.append("ok")
            except grpc.RpcError as error:
                codes.append(error.code().name)
    # The default policy allows 8 open sessions per agent and 10 opens in a burst.
    assert codes[:8] == ["ok"] * 8 and set(codes[8:]) == {"RESOURCE_EXHAUSTED"}
    assert_audited(guardian, "opener", "session.open", "deny", "rate_limited")


def test_unknown_id_probing_locks_the_agent(world: World) -> None:
    guardian, agents = world
    prober = agents["prober"]
    for index in range(3):
        request = pb.GetRequest(session_id=prober.session, id=f"mem_{index:032x}")
        expect(lambda r=request: prober.stub.Get(r), grpc.StatusCode.NOT_FOUND)
    alerts = [row for row in guardian.audit_rows() if row["agent"] == "prober" and row["decision"] == "alert"]
    assert alerts and alerts[-1]["operation"] == "anomaly.lock_agent"
    error = expect(lambda: prober.store("locked?"), grpc.StatusCode.PERMISSION_DENIED)
    assert "locked" in error.details()
    listed = {a.name: a.locked for a in guardian.admin("ListAgents", admin_pb2.ListAgentsRequest()).agents}
    assert listed["prober"] is True
    assert guardian.admin("UnlockAgent", admin_pb2.UnlockAgentRequest(name="prober")).was_locked
    prober.store("unlocked")
    assert_audited(guardian, "prober", "memory.store", "allow", "ok")


# -- retention and failing filters -------------------------------------------------------------------


def test_retention_purges_old_memories_and_audits_it() -> None:
    with running_guardian(retention={"max_age": "2s", "purge_every": "1s"}) as guardian:
        config = guardian.config.read_text().replace("housekeeping_interval: 5s", "housekeeping_interval: 200ms")
        guardian.config.write_text(config)
        guardian.stop()
        guardian.start()
        token = guardian.add_agent("keeper")
        channel, stub = guardian.agent_stub()
        with channel:
            session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
            old = Agent("keeper", stub, session).store("short-lived")
            deadline = time.monotonic() + 15
            while True:
                purges = [row for row in guardian.audit_rows() if row["operation"] == "retention.purge"]
                if purges:
                    break
                assert time.monotonic() < deadline, "no retention purge within 15 s"
                time.sleep(0.2)
        assert purges[0]["agent"] == "@retention" and old.id in purges[0]["object_id"]
        assert purges[0]["decision"] == "allow" and purges[0]["policy_version"] == running_version(guardian)
        with guardian.keyed_db() as db:
            assert db.execute("SELECT count(*) FROM memories WHERE id = ?", (old.id,)).fetchone()[0] == 0


def test_a_pathological_filter_runs_to_its_answer_and_decides_by_the_text() -> None:
    # (x+x+)+y backtracks exponentially on a long run of x without a y; RE2 runs it in linear time, with no
    # time budget: the run without a y is stored unflagged, the run with one is flagged, nothing is refused.
    slow = [{"name": "slow-rule", "pattern": r"(x+x+)+y", "action": "flag"}]
    with running_guardian(filters=slow, anomaly=LOG_ONLY_ANOMALIES) as guardian:
        token = guardian.add_agent("slowpoke")
        channel, stub = guardian.agent_stub()
        with channel:
            agent = Agent("slowpoke", stub, stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id)
            assert agent.store("x" * 60_000).content == "x" * 60_000
            row = assert_audited(guardian, "slowpoke", "memory.store", "allow", "ok")
            assert "slow-rule" not in row["reason"]
            assert agent.store("x" * 60_000 + "y").content.endswith("xy")
            assert_audited(guardian, "slowpoke", "memory.store", "allow", "ok; filters: flag:slow-rule")
        with guardian.keyed_db() as db:
            assert db.execute("SELECT count(*) FROM memories WHERE agent = 'slowpoke'").fetchone()[0] == 2
