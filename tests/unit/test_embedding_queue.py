"""The write-behind queue of guardian/store/vectors.py: what a write leaves to be embedded after it commits.

A write's memory is queued only once its transaction commits (never when it rolls
back); a search waits for its own namespaces' queued memories only, and never while
the recall thread is not serving the queue; stopping the queue hands it to the scan.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from guardian.keys.ring import KeyRing
from guardian.recall.model import EmbeddingModel, builtin_files
from guardian.store.database import Database
from guardian.store.vectors import MemoryVectors

KEY_HEX = "ab" * 32


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(builtin_files())


@pytest.fixture
def database(tmp_path: Path) -> Database:
    return Database(tmp_path / "memory.db", [KEY_HEX])


@pytest.fixture
def vectors(model: EmbeddingModel, database: Database) -> MemoryVectors:
    return MemoryVectors(model, KeyRing("k1", {"k1": b"k" * 32}), database.after_commit)


def test_a_memory_is_queued_when_its_write_commits_and_never_when_it_rolls_back(
    database: Database, vectors: MemoryVectors
) -> None:
    class Refused(Exception):
        pass

    with pytest.raises(Refused), database.write():
        vectors.queue("alice", 1)
        raise Refused  # rolled back: nothing to embed
    assert vectors.queued(10) == [] and not vectors.wake.is_set()

    def write(connection: object) -> None:
        vectors.queue("alice", 2)
        assert vectors.queued(10) == []  # not before the commit

    database.submit(write)
    assert vectors.queued(10) == [2] and vectors.wake.is_set()


def test_a_search_waits_only_for_its_own_namespaces_and_only_while_the_queue_is_served(
    database: Database, vectors: MemoryVectors
) -> None:
    with database.write():
        vectors.queue("alice", 1)
    # Not served (the recall thread is loading, or catching up): nobody waits.
    started = time.monotonic()
    assert vectors.wait_embedded(("alice",), timeout_s=5.0)
    assert time.monotonic() - started < 1.0
    vectors.serve_queue(True)
    assert vectors.wait_embedded(("bob",), timeout_s=5.0)  # another agent's queue never delays bob
    assert not vectors.wait_embedded(("alice", "shared"), timeout_s=0.05)  # still queued: gave up

    waited: list[bool] = []
    waiter = threading.Thread(target=lambda: waited.append(vectors.wait_embedded(("alice",), timeout_s=10.0)))
    waiter.start()
    time.sleep(0.05)
    assert not waited  # still waiting for rowid 1
    vectors.embedded([1])
    waiter.join(timeout=5)
    assert waited == [True] and vectors.queued(10) == []


def test_stopping_the_queue_hands_it_to_the_scan_and_lets_waiting_searches_go(
    database: Database, vectors: MemoryVectors
) -> None:
    vectors.serve_queue(True)
    with database.write():
        vectors.queue("alice", 1)
        vectors.queue("alice", 2)
    waited: list[bool] = []
    waiter = threading.Thread(target=lambda: waited.append(vectors.wait_embedded(("alice",), timeout_s=10.0)))
    waiter.start()
    time.sleep(0.05)
    vectors.serve_queue(False)  # e.g. the embedder stopped answering
    waiter.join(timeout=5)
    assert waited == [True]
    assert vectors.queued(10) == [] and vectors.behind.is_set()  # the scan embeds them when it is back


def test_queued_hands_out_at_most_limit_across_namespaces(database: Database, vectors: MemoryVectors) -> None:
    with database.write():
        for rowid in range(1, 6):
            vectors.queue("alice" if rowid % 2 else "bob", rowid)
    first = vectors.queued(3)
    assert len(first) == 3 and set(first) <= {1, 2, 3, 4, 5}
    vectors.embedded(first)
    assert sorted(vectors.queued(10)) == sorted({1, 2, 3, 4, 5} - set(first))


def test_the_queue_fills_for_a_moment_unless_it_is_full_or_a_search_waits(
    database: Database, vectors: MemoryVectors
) -> None:
    assert vectors.batch_wait_s(limit=3, linger_s=10.0) == 0.0  # nothing queued
    with database.write():
        vectors.queue("alice", 1)
    assert 9.0 < vectors.batch_wait_s(limit=3, linger_s=10.0) <= 10.0
    with database.write():
        vectors.queue("alice", 2)
        vectors.queue("bob", 3)
    assert vectors.batch_wait_s(limit=3, linger_s=10.0) == 0.0  # a full batch goes at once
    vectors.embedded([2, 3])
    vectors.serve_queue(True)
    waiter = threading.Thread(target=lambda: vectors.wait_embedded(("alice",), timeout_s=10.0))
    waiter.start()
    deadline = time.monotonic() + 5
    while vectors.batch_wait_s(limit=3, linger_s=10.0) > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert vectors.batch_wait_s(limit=3, linger_s=10.0) == 0.0  # a search waits for rowid 1: no more lingering
    vectors.embedded([1])
    waiter.join(timeout=5)
    assert not waiter.is_alive()


def test_a_memory_queued_again_while_its_batch_is_embedded_stays_queued(
    database: Database, vectors: MemoryVectors
) -> None:
    # An update commits while the recall thread embeds the memory's older content: that batch's vector is not
    # attached (the content changed), so the memory must still be queued for its new content.
    database.submit(lambda connection: vectors.queue("alice", 7))
    assert vectors.queued(10) == [7]
    database.submit(lambda connection: vectors.queue("alice", 7))  # the update, mid-batch
    vectors.embedded([7])
    assert vectors.queued(10) == [7]
    vectors.embedded([7])  # the next batch: done
    assert vectors.queued(10) == []
