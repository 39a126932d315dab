"""Limits that survive a restart: a real guardian stopped (cleanly, or with kill -9) and started again.

A restart, or a crash, must not be a way around a lockout: anomaly locks and
cooldowns stay in force, and a drained budget stays drained, since what a request
takes is kept in the transaction that acknowledges it.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, running_guardian

pb = agent_pb2
_OPS = ["store", "get", "search", "list", "update", "delete"]
POLICY: dict[str, Any] = {
    "anomaly": {
        **LOG_ONLY_ANOMALIES,
        "unknown_ids": {"threshold": 3, "window": "1m", "response": "lock_agent", "lock": "10m"},
    },
    "rate_limits": {
        "session": {"writes": {"burst": 100, "per_minute": 6000}},
        "agent": {"writes": {"burst": 3, "per_minute": 1}},
        "cooldown": "30s",
    },
    "limits": {"max_batch": 3},
    "profiles": {"default": {"operations": _OPS}},
}


@pytest.fixture
def guardian() -> Iterator[Guardian]:
    with running_guardian(**POLICY) as running:
        running.check_audit = False  # a kill -9 may lose the audit rows of calls in flight
        yield running


def open_session(guardian: Guardian, token: str) -> tuple[grpc.Channel, Any, str]:
    channel, stub = guardian.agent_stub()
    session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
    return channel, stub, session


def store(stub: Any, session: str, text: str) -> grpc.StatusCode:
    try:
        stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=text)))
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def restart(guardian: Guardian, sig: int) -> None:
    guardian.stop(sig)
    guardian.start()


def kept(guardian: Guardian) -> dict[str, Any]:
    with guardian.keyed_db() as connection:
        return {
            agent: json.loads(state) for agent, state in connection.execute("SELECT agent, state FROM agent_limits")
        }


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill -9", "stop"])
def test_an_anomaly_lock_outlives_a_restart(guardian: Guardian, sig: int) -> None:
    token = guardian.add_agent("prober")
    channel, stub, session = open_session(guardian, token)
    with channel:
        for _ in range(3):  # three unknown ids in a minute: the agent is locked for 10 minutes
            with pytest.raises(grpc.RpcError):
                stub.Get(pb.GetRequest(session_id=session, id="mem_" + "0" * 32))
    locked_until = kept(guardian)["prober"]["locked_until_ms"]
    assert locked_until > time.time() * 1000 + 9 * 60_000  # kept with the lock's audit row, before any tick

    restart(guardian, sig)
    channel, stub = guardian.agent_stub()
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.OpenSession(pb.OpenSessionRequest(agent_token=token))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "locked by the anomaly detector" in str(caught.value.details())
    # The security team's unlock still works, and the lock stays lifted after another restart.
    assert guardian.ctl("agents", "unlock", "prober").returncode == 0
    restart(guardian, signal.SIGTERM)
    channel, _, _ = open_session(guardian, token)
    channel.close()


def test_a_drained_budget_and_its_cooldown_survive_a_clean_restart(guardian: Guardian) -> None:
    token = guardian.add_agent("writer")
    channel, stub, session = open_session(guardian, token)
    with channel:
        assert [store(stub, session, f"note {n}") for n in range(4)] == [grpc.StatusCode.OK] * 3 + [
            grpc.StatusCode.RESOURCE_EXHAUSTED
        ]
    restart(guardian, signal.SIGTERM)
    channel, stub = guardian.agent_stub()
    with channel, pytest.raises(grpc.RpcError) as caught:  # the 30 s cooldown, still running, refuses all
        stub.OpenSession(pb.OpenSessionRequest(agent_token=token))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cooling down" in str(caught.value.details())
    writes = kept(guardian)["writer"]["buckets"]["writes"]
    assert writes[0] < 1  # the agent's write budget: still drained (per_minute 1)


def test_a_crash_never_grants_more_than_the_policy_allows(guardian: Guardian) -> None:
    """Drained, then killed at once: what each acknowledged store took was kept with it, so after the
    restart the agent gets no second burst; an agent that took nothing keeps its whole burst."""
    token = guardian.add_agent("burster")
    late_token = guardian.add_agent("newcomer")
    channel, stub, session = open_session(guardian, token)
    with channel:
        outcomes = [store(stub, session, f"note {n}") for n in range(3)]
    restart(guardian, signal.SIGKILL)
    assert outcomes == [grpc.StatusCode.OK] * 3
    granted: dict[str, int] = {}
    for name, agent_token in (("burster", token), ("newcomer", late_token)):
        channel, stub, session = open_session(guardian, agent_token)
        with channel:
            granted[name] = sum(store(stub, session, f"again {n}") == grpc.StatusCode.OK for n in range(4))
    assert granted == {"burster": 0, "newcomer": 3}  # per_minute 1: not a token refilled; burst 3
