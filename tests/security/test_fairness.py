"""One agent floods the guardian; another must keep being served.

The flooder runs many threads, each on its own connection, as fast as the guardian
answers: reads, writes, or garbage that is refused before any session is looked at
(every refusal still writes an audit row, so this is the cheapest way to load the
database). Meanwhile a second agent makes ordinary calls at an ordinary pace: every
one must succeed within a generous deadline, with a p99 under a few seconds; and
every call of the flood must have its audit row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import grpc
import pytest

from shared.rpc.guardian.v1 import agent_pb2_grpc
from tests.security.hostile import Agent, Attack, AuditWatch, cases, enrol
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
FLOOD_THREADS: Final = 16
FLOOD_S: Final = 2.0
#: Each of the steady agent's calls must finish within this; and 99% of them within P99_S.
DEADLINE_S: Final = 10.0
P99_S: Final = 3.0
#: The steady agent's pace: well inside its own rate limits (the shipped policy's), so any refusal is the flood's doing.
PACE_S: Final = 0.1
#: Outcomes of a flood call after which the guardian may not have seen it (so there is no row to expect).
_UNSEEN: Final = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

ATTACKS: Final = (
    Attack("fairness.read-flood", f"{FLOOD_THREADS} threads of Search and List from one agent"),
    Attack("fairness.write-flood", f"{FLOOD_THREADS} threads of Store from one agent"),
    Attack("fairness.garbage-flood", f"{FLOOD_THREADS} threads of malformed requests, each refused and audited"),
)


def flood_call(attack: Attack, flooder: Agent, channel: grpc.Channel) -> Callable[[int], object]:
    """What one flood thread sends, again and again (the argument is a counter)."""
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    session = flooder.session
    if attack.id == "fairness.read-flood":
        search = pb.SearchRequest(session_id=session, query="flood words")
        listing = pb.ListRequest(session_id=session)
        return lambda n: stub.Search(search, timeout=DEADLINE_S) if n % 2 else stub.List(listing, timeout=DEADLINE_S)
    if attack.id == "fairness.write-flood":
        return lambda n: stub.Store(
            pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=f"flood {n}")), timeout=DEADLINE_S
        )
    garbage = channel.unary_unary(
        "/guardian.v1.AgentService/Store", request_serializer=None, response_deserializer=None
    )
    return lambda n: garbage(b"\xff\xff\xff", timeout=DEADLINE_S)


def steady_calls(agent: Agent, memory_id: str) -> list[Callable[[], object]]:
    """The well-behaved agent's round of calls."""
    session = agent.session
    return [
        lambda: agent.stub.Store(
            pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="steady note")), timeout=DEADLINE_S
        ),
        lambda: agent.stub.Get(pb.GetRequest(session_id=session, id=memory_id), timeout=DEADLINE_S),
        lambda: agent.stub.Search(pb.SearchRequest(session_id=session, query="steady"), timeout=DEADLINE_S),
        lambda: agent.stub.List(pb.ListRequest(session_id=session, page_size=10), timeout=DEADLINE_S),
    ]


@pytest.mark.parametrize("attack", cases(ATTACKS))
def test_another_agent_is_served_while_one_floods(guardian: Guardian, attack: Attack) -> None:
    flooder, steady = enrol(guardian, "flooder"), enrol(guardian, "steady")
    memory_id = steady.store("steady memory").id
    stop = threading.Event()
    outcomes: list[grpc.StatusCode] = []

    def flood() -> None:
        """One flood thread: its own connection, calls until told to stop, every outcome noted."""
        with guardian.channel() as channel:
            send = flood_call(attack, flooder, channel)
            count = 0
            while not stop.is_set():
                count += 1
                try:
                    send(count)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    outcomes.append(error.code())

    watch = AuditWatch(guardian)
    latencies: list[float] = []
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=FLOOD_THREADS) as pool:
        floods = [pool.submit(flood) for _ in range(FLOOD_THREADS)]
        try:
            time.sleep(0.2)  # the flood is on before the steady agent starts
            next_at = time.monotonic()
            ends = next_at + FLOOD_S
            calls = steady_calls(steady, memory_id)
            while time.monotonic() < ends or len(latencies) + len(failures) < 12:
                made = len(latencies) + len(failures)
                call = calls[made % len(calls)]
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += PACE_S
                started = time.monotonic()
                try:
                    call()
                    latencies.append(time.monotonic() - started)
                except grpc.RpcError as error:
                    failures.append(error.code().name)
        finally:
            stop.set()
        for done in floods:
            done.result()
    flooder.close()
    steady.close()

    assert not failures, f"the steady agent was refused or timed out during the flood: {failures}"
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    assert p99 < P99_S, f"p99 {p99:.2f} s over {len(latencies)} calls during the flood"
    assert len(outcomes) > FLOOD_THREADS, "the flood never got going"
    assert grpc.StatusCode.INTERNAL not in outcomes and grpc.StatusCode.UNKNOWN not in outcomes
    flood_rows = [row for row in watch.rows() if row["agent"] in (flooder.name, "")]
    seen = [code for code in outcomes if code not in _UNSEEN]
    assert len(flood_rows) == len(seen), "a flood call has no audit row"
    if attack.id != "fairness.garbage-flood":
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes, "the flooder was never rate limited"
    steady_rows = [row for row in watch.rows() if row["agent"] == steady.name]
    assert len(steady_rows) == len(latencies) and all(row["decision"] == "allow" for row in steady_rows)
