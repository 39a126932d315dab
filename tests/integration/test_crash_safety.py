"""kill -9 of the guardian at random moments under concurrent writes loses nothing it acknowledged.

Twenty rounds: the guardian starts on the same state dir, four clients store, store
batches and delete their own memories as fast as they can, and after a random 0.2-0.9 s
the guardian is killed with SIGKILL. A write whose answer never came may or may not have
happened; one that was acknowledged must be there after the restart (a deleted one gone),
with its audit row; and at the end the file passes SQLite's and SQLCipher's integrity
checks, every memory's HMAC verifies, and so does the audit chain.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from guardian.keys.rotated import load_all_keys
from guardian.store.backup import verify_file
from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, running_guardian

pb = agent_pb2
ROUNDS = 20
CLIENTS = 4
HEAVY = {"burst": 100_000, "per_minute": 6_000_000}
#: Clients reopen sessions after every kill, and a restart no longer resets the session-open budget.
WIDE_OPEN = {
    "session": {"reads": HEAVY, "writes": HEAVY},
    "agent": {"reads": HEAVY, "writes": HEAVY},
    "session_opens": HEAVY,
}


@dataclass
class Acknowledged:
    """What the guardian answered OK to, across all rounds."""

    stored: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    #: Deletes sent, answered or not: one in flight at a kill may or may not have happened.
    delete_sent: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client(guardian: Guardian, token: str, seed: int, acked: Acknowledged, stop: threading.Event) -> None:
    """Store, store a batch, or delete one of its own acknowledged memories, until the guardian dies."""
    rng = random.Random(seed)
    channel, stub = guardian.agent_stub()
    mine: list[str] = []
    try:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token), timeout=5).session_id
        number = 0
        while not stop.is_set():
            number += 1
            choice = rng.random()
            if choice < 0.15 and mine:
                victim = mine.pop(rng.randrange(len(mine)))
                with acked.lock:
                    acked.delete_sent.add(victim)
                stub.Delete(pb.DeleteRequest(session_id=session, id=victim), timeout=10)
                with acked.lock:
                    acked.deleted.add(victim)
            elif choice < 0.35:
                drafts = [pb.MemoryDraft(content=f"crash batch {seed}-{number}-{i}") for i in range(3)]
                batch_reply = stub.StoreBatch(pb.StoreBatchRequest(session_id=session, memories=drafts), timeout=10)
                with acked.lock:
                    for memory in batch_reply.memories:
                        acked.stored[memory.id] = memory.content
                mine += [memory.id for memory in batch_reply.memories]
            else:
                content = f"crash note {seed}-{number}"
                reply = stub.Store(
                    pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=content)), timeout=10
                )
                with acked.lock:
                    acked.stored[reply.memory.id] = content
                mine.append(reply.memory.id)
    except grpc.RpcError as error:
        # The guardian was killed: the call in flight has no answer, so it proves nothing either way.
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), error
    finally:
        channel.close()


@pytest.fixture(scope="module")
def crashed() -> Iterator[tuple[Guardian, str, Acknowledged]]:
    with running_guardian(rate_limits=WIDE_OPEN, anomaly=LOG_ONLY_ANOMALIES) as guardian:
        guardian.check_audit = False  # answers lost to the kills make the call-by-call cross-check moot
        token = guardian.add_agent("crasher")
        acked = Acknowledged()
        rng = random.Random(20)
        for round_number in range(ROUNDS):
            if round_number:
                guardian.start()
            stop = threading.Event()
            clients = [
                threading.Thread(target=_client, args=(guardian, token, round_number * 10 + n, acked, stop))
                for n in range(CLIENTS)
            ]
            for client in clients:
                client.start()
            stop.wait(rng.uniform(0.2, 0.9))
            assert guardian.process is not None
            os.kill(guardian.process.pid, signal.SIGKILL)
            guardian.process.wait()
            stop.set()
            for client in clients:
                client.join(timeout=30)
        print(
            f"\n  [crash safety] {ROUNDS} SIGKILLs; {len(acked.stored)} memories and {len(acked.deleted)} deletes acked"
        )
        yield guardian, token, acked


def test_the_file_and_every_seal_in_it_verify_after_the_kills(crashed: tuple[Guardian, str, Acknowledged]) -> None:
    guardian, _, acked = crashed
    assert len(acked.stored) > ROUNDS * 10, "too little was written between the kills to prove anything"
    keys = load_all_keys(guardian.state_dir / "keys", guardian.state_dir)
    report = verify_file(guardian.database, keys)
    assert report.integrity == "ok" and report.cipher_integrity == "ok", report
    assert report.memories_failed_count == 0 and report.memories_checked >= len(acked.stored) - len(acked.deleted)
    assert report.audit == "ok" and report.audit_rows_checked > len(acked.stored) // 3  # a batch is one row


def test_every_acknowledged_write_is_there_and_audited(crashed: tuple[Guardian, str, Acknowledged]) -> None:
    guardian, token, acked = crashed
    with guardian.keyed_db() as db:
        present = dict(db.execute("SELECT id, content FROM memories").fetchall())
        stored_rows = {
            object_id
            for (object_id,) in db.execute(
                "SELECT object_id FROM audit WHERE operation IN ('memory.store', 'memory.store_batch')"
                " AND decision = 'allow'"
            ).fetchall()
        }
        deleted_rows = {
            object_id
            for (object_id,) in db.execute(
                "SELECT object_id FROM audit WHERE operation = 'memory.delete' AND decision = 'allow'"
            ).fetchall()
        }
    audited_stores = {memory_id for ids in stored_rows for memory_id in ids.split(",")}
    missing = [
        memory_id for memory_id in acked.stored if memory_id not in acked.delete_sent and memory_id not in present
    ]
    assert not missing, f"{len(missing)} acknowledged writes were lost, e.g. {missing[:3]}"
    changed = [
        memory_id
        for memory_id in present
        if memory_id in acked.stored and present[memory_id] != acked.stored[memory_id]
    ]
    assert not changed
    assert not (acked.deleted & set(present)), "an acknowledged delete came back"
    assert set(acked.stored) <= audited_stores, "an acknowledged store has no audit row"
    assert acked.deleted <= deleted_rows, "an acknowledged delete has no audit row"
    guardian.start()
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        for memory_id in sorted(set(acked.stored) - acked.delete_sent)[:200]:
            assert stub.Get(pb.GetRequest(session_id=session, id=memory_id)).memory.content == acked.stored[memory_id]
