"""Getting around the rate limits: fresh sessions, big batches, many requests at once.

The guardian here runs tight, slow-refilling buckets (one token a minute), so what
an agent gets is exactly its burst, whatever it tries: a session's writes, then the
agent's, however many sessions it opens and closes; a batch costs one write per
memory and is all or nothing; concurrent requests cannot overdraw a bucket. Every
refusal is RESOURCE_EXHAUSTED (INVALID_ARGUMENT for a batch over the size limit)
and audited; what was refused was not stored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import grpc
import pytest

from tests.security.hostile import Agent, Attack, AuditWatch, cases, enrol, hostile_guardian, refused, trailers
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
SESSION_WRITES: Final = 4
AGENT_WRITES: Final = 10
SESSION_READS: Final = 6
SESSION_OPENS: Final = 5
MAX_SESSIONS: Final = 3
MAX_BATCH: Final = 4
RATE_POLICY: Final = {
    "rate_limits": {
        "session": {
            "writes": {"burst": SESSION_WRITES, "per_minute": 1},
            "reads": {"burst": SESSION_READS, "per_minute": 1},
        },
        "agent": {"writes": {"burst": AGENT_WRITES, "per_minute": 1}, "reads": {"burst": 20, "per_minute": 1}},
        "session_opens": {"burst": SESSION_OPENS, "per_minute": 1},
        "cooldown": "5s",
    },
    "limits": {"max_batch": MAX_BATCH},
    "sessions": {"max_per_agent": MAX_SESSIONS},
}

ATTACKS: Final = (
    Attack("rate.session-churn", "open, drain and close session after session to reset the write budget"),
    Attack("rate.open-flood", "open more sessions at once than the policy lets one agent hold"),
    Attack("rate.open-close-flood", "open and close sessions in a loop, past the session-open budget"),
    Attack("rate.batch-over-max", "a StoreBatch one memory over max_batch"),
    Attack("rate.batch-over-remaining", "a StoreBatch that costs more writes than the session has left"),
    Attack("rate.concurrent-writes", "many Store calls at the same instant on one session"),
    Attack("rate.concurrent-sessions", "many Store calls at the same instant spread over several sessions"),
    Attack("rate.concurrent-reads", "many Search calls at the same instant on one session"),
)


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    """A guardian with small bursts that refill one token a minute."""
    with hostile_guardian(**RATE_POLICY) as started:
        yield started


def stored_by(guardian: Guardian, agent: Agent) -> int:
    """How many memories the agent has stored."""
    with guardian.keyed_db() as db:
        return int(db.execute("SELECT count(*) FROM memories WHERE agent = ?", (agent.name,)).fetchone()[0])


def codes_at_once(calls: list[Callable[[], object]]) -> list[grpc.StatusCode]:
    """Run every call at the same instant (a barrier), each on its own thread; their status codes."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> grpc.StatusCode:
        """Wait for every other thread, then make the call; its status code."""
        barrier.wait(timeout=30)
        try:
            call()
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def assert_audited_outcomes(watch: AuditWatch, agent: Agent, operation: str, codes: list[grpc.StatusCode]) -> None:
    """One row per call: an allow for each OK, a rate_limited deny for each refusal."""
    rows = [row for row in watch.rows() if row["agent"] == agent.name and row["operation"] == operation]
    allowed = sum(code == grpc.StatusCode.OK for code in codes)
    assert sum(row["decision"] == "allow" for row in rows) == allowed
    denied = [row for row in rows if row["decision"] == "deny"]
    assert len(denied) == len(codes) - allowed
    assert all(row["reason"].startswith("rate_limited:") for row in denied)


def _store(agent: Agent, session: str, content: str) -> Callable[[], object]:
    """A Store on session."""
    request = pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=content))
    return lambda: agent.stub.Store(request, timeout=30)


@pytest.mark.parametrize("attack", cases(ATTACKS))
def test_rate_limits_hold(guardian: Guardian, attack: Attack) -> None:
    with enrol(guardian, "greedy") as agent:
        check: dict[str, Callable[[Guardian, Agent], None]] = {
            "rate.session-churn": _session_churn,
            "rate.open-flood": _open_flood,
            "rate.open-close-flood": _open_close_flood,
            "rate.batch-over-max": _batch_over_max,
            "rate.batch-over-remaining": _batch_over_remaining,
            "rate.concurrent-writes": _concurrent_writes,
            "rate.concurrent-sessions": _concurrent_sessions,
            "rate.concurrent-reads": _concurrent_reads,
        }
        check[attack.id](guardian, agent)


def _session_churn(guardian: Guardian, agent: Agent) -> None:
    """Drain, close, reopen: the agent's budget caps the total, then the agent is refused."""
    watch = AuditWatch(guardian)
    written, codes = 0, []
    session = agent.session
    for round_ in range(SESSION_OPENS + 2):
        for index in range(SESSION_WRITES + 1):
            try:
                _store(agent, session, f"churn {round_}.{index}")()
                written += 1
            except grpc.RpcError as error:
                codes.append(error.code())
                break
        agent.stub.CloseSession(pb.CloseSessionRequest(session_id=session), timeout=20)
        try:
            session = agent.open_session()
        except grpc.RpcError as error:
            codes.append(error.code())
            break
    assert written == AGENT_WRITES, "new sessions must not reset the agent's budget"
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert stored_by(guardian, agent) == AGENT_WRITES
    denials = [row for row in watch.rows() if row["decision"] == "deny"]
    assert len(denials) == len(codes) and all(row["reason"].startswith("rate_limited:") for row in denials)
    # And now the agent is refused outright, whatever session it comes with.
    refused(guardian, agent.open_session, grpc.StatusCode.RESOURCE_EXHAUSTED, "session.open", agent=agent.name)


def _open_flood(guardian: Guardian, agent: Agent) -> None:
    """Twelve OpenSession calls at once: at most max_per_agent sessions in all."""
    watch = AuditWatch(guardian)
    request = pb.OpenSessionRequest(agent_token=agent.token)
    codes = codes_at_once([lambda: agent.stub.OpenSession(request, timeout=30)] * 12)
    assert codes.count(grpc.StatusCode.OK) <= MAX_SESSIONS - 1  # the fixture's session is one of them
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert_audited_outcomes(watch, agent, "session.open", codes)
    refused(guardian, agent.open_session, grpc.StatusCode.RESOURCE_EXHAUSTED, "session.open", agent=agent.name)


def _open_close_flood(guardian: Guardian, agent: Agent) -> None:
    """Open and close until the session-open budget is spent: the next open is refused."""
    opened = 1  # the fixture's
    agent.stub.CloseSession(pb.CloseSessionRequest(session_id=agent.session), timeout=20)
    while opened < SESSION_OPENS:
        session = agent.open_session()
        opened += 1
        agent.stub.CloseSession(pb.CloseSessionRequest(session_id=session), timeout=20)
    refusal = refused(guardian, agent.open_session, grpc.StatusCode.RESOURCE_EXHAUSTED, "session.open")
    assert refusal.row["agent"] == agent.name
    assert int(trailers(refusal.error)["retry-after-ms"]) > 0


def _batch(agent: Agent, count: int) -> Callable[[], object]:
    """A StoreBatch of count memories."""
    drafts = [pb.MemoryDraft(content=f"batched {index}") for index in range(count)]
    return lambda: agent.stub.StoreBatch(pb.StoreBatchRequest(session_id=agent.session, memories=drafts), timeout=30)


def _batch_over_max(guardian: Guardian, agent: Agent) -> None:
    """A batch over max_batch is refused whole."""
    refusal = refused(
        guardian, _batch(agent, MAX_BATCH + 1), grpc.StatusCode.INVALID_ARGUMENT, "memory.store_batch", agent=agent.name
    )
    assert f"batch limit of {MAX_BATCH}" in refusal.details
    assert stored_by(guardian, agent) == 0


def _batch_over_remaining(guardian: Guardian, agent: Agent) -> None:
    """A batch that costs more writes than are left is refused whole."""
    _store(agent, agent.session, "one write")()
    refused(
        guardian, _batch(agent, MAX_BATCH), grpc.StatusCode.RESOURCE_EXHAUSTED, "memory.store_batch", agent=agent.name
    )
    assert stored_by(guardian, agent) == 1, "a refused batch stores none of its memories"


def _concurrent_writes(guardian: Guardian, agent: Agent) -> None:
    """24 Stores at once on one session: at most the session's write burst succeed."""
    watch = AuditWatch(guardian)
    codes = codes_at_once([_store(agent, agent.session, f"at once {index}") for index in range(24)])
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert 1 <= codes.count(grpc.StatusCode.OK) <= SESSION_WRITES
    assert stored_by(guardian, agent) == codes.count(grpc.StatusCode.OK)
    assert_audited_outcomes(watch, agent, "memory.store", codes)


def _concurrent_sessions(guardian: Guardian, agent: Agent) -> None:
    """30 Stores at once over three sessions: at most the agent's write burst succeed."""
    sessions = [agent.session] + [agent.open_session() for _ in range(MAX_SESSIONS - 1)]
    watch = AuditWatch(guardian)
    calls = [_store(agent, sessions[index % len(sessions)], f"spread {index}") for index in range(30)]
    codes = codes_at_once(calls)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert 1 <= codes.count(grpc.StatusCode.OK) <= AGENT_WRITES
    assert stored_by(guardian, agent) == codes.count(grpc.StatusCode.OK)
    assert_audited_outcomes(watch, agent, "memory.store", codes)


def _concurrent_reads(guardian: Guardian, agent: Agent) -> None:
    """30 Searches at once on one session: at most the session's read burst succeed."""
    watch = AuditWatch(guardian)
    request = pb.SearchRequest(session_id=agent.session, query="anything at all")
    search: Callable[[], Any] = lambda: agent.stub.Search(request, timeout=30)  # noqa: E731
    codes = codes_at_once([search] * 30)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert 1 <= codes.count(grpc.StatusCode.OK) <= SESSION_READS
    assert_audited_outcomes(watch, agent, "memory.search", codes)
