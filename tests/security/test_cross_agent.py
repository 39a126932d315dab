"""One agent reaching for another's memories: its ids, its namespace, its list cursor.

A session identifies its agent, so agent B cannot borrow agent A's identity; what B
can do is name A's memory ids, A's namespace or a cursor A was given. Each must get
as far as an id that does not exist: NOT_FOUND (or PERMISSION_DENIED for a
namespace, INVALID_ARGUMENT for a cursor), audited under B, with A's memory exactly
as it was; Search and List must simply never show A's memories.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import grpc
import pytest

from tests.security.hostile import Agent, Attack, cases, enrol, marker, memory_row, refused, served
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
MARK: Final = marker()


@dataclass
class World:
    """Alice owns the memories; Bob is the attacker."""

    alice: Agent
    bob: Agent
    #: Alice's memory ids, the first one with MARK in its content, tags and metadata.
    ids: list[str]
    #: A next_cursor List gave Alice.
    cursor: str
    #: Words of Bob's twin memories ("probe WORD"): Alice wrote the first one in memories of hers too.
    twins: tuple[str, str]


@pytest.fixture(scope="module")
def world(guardian: Guardian) -> Iterator[World]:
    """Alice with three memories and a list cursor; Bob with one memory of his own."""
    alice, bob = enrol(guardian, "alice"), enrol(guardian, "bob")
    ids = [alice.store(f"alice's plan {MARK}", tags=[MARK], metadata_json=f'{{"k": "{MARK}"}}').id]
    ids += [alice.store(f"alice's note {index}").id for index in range(2)]
    bob.store("bob's own note")
    twins = (f"zebra{MARK}", f"quagga{MARK}"[: len(f"zebra{MARK}")])
    for word in twins:
        bob.store(f"probe {word}")
    ids += [alice.store(f"alice also wrote {twins[0]} here, note {index}").id for index in range(5)]
    cursor = alice.stub.List(pb.ListRequest(session_id=alice.session, page_size=1), timeout=20).next_cursor
    assert cursor
    yield World(alice, bob, ids, cursor, twins)
    alice.close()
    bob.close()


def _update(**fields: Any) -> Callable[[World], object]:
    """Bob's Update of Alice's first memory, setting fields."""
    return lambda w: w.bob.stub.Update(pb.UpdateRequest(session_id=w.bob.session, id=w.ids[0], **fields), timeout=20)


#: (attack, the call Bob makes, expected status, audit operation).
DENIED: Final[tuple[tuple[Attack, Callable[[World], object], grpc.StatusCode, str], ...]] = (
    (
        Attack("cross-agent.get", "Get with another agent's memory id"),
        lambda w: w.bob.stub.Get(pb.GetRequest(session_id=w.bob.session, id=w.ids[0]), timeout=20),
        grpc.StatusCode.NOT_FOUND,
        "memory.get",
    ),
    (
        Attack("cross-agent.update-content", "Update another agent's memory's content"),
        _update(content="bob was here"),
        grpc.StatusCode.NOT_FOUND,
        "memory.update",
    ),
    (
        Attack("cross-agent.update-tags", "Update another agent's memory's tags"),
        _update(tags=pb.TagList(tags=["bob"])),
        grpc.StatusCode.NOT_FOUND,
        "memory.update",
    ),
    (
        Attack("cross-agent.update-metadata", "Update another agent's memory's metadata"),
        _update(metadata_json='{"owner": "bob"}'),
        grpc.StatusCode.NOT_FOUND,
        "memory.update",
    ),
    (
        Attack("cross-agent.delete", "Delete another agent's memory"),
        lambda w: w.bob.stub.Delete(pb.DeleteRequest(session_id=w.bob.session, id=w.ids[0]), timeout=20),
        grpc.StatusCode.NOT_FOUND,
        "memory.delete",
    ),
    (
        Attack("cross-agent.store-into-namespace", "Store into another agent's namespace"),
        lambda w: w.bob.stub.Store(
            pb.StoreRequest(session_id=w.bob.session, memory=pb.MemoryDraft(content="planted", namespace=w.alice.name)),
            timeout=20,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "memory.store",
    ),
    (
        Attack("cross-agent.batch-into-namespace", "StoreBatch of an own memory and one into another's namespace"),
        lambda w: w.bob.stub.StoreBatch(
            pb.StoreBatchRequest(
                session_id=w.bob.session,
                memories=[
                    pb.MemoryDraft(content="planted, mine"),
                    pb.MemoryDraft(content="planted", namespace=w.alice.name),
                ],
            ),
            timeout=20,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "memory.store_batch",
    ),
    (
        Attack("cross-agent.cursor-replay", "List with a cursor the guardian gave another agent"),
        lambda w: w.bob.stub.List(pb.ListRequest(session_id=w.bob.session, cursor=w.cursor), timeout=20),
        grpc.StatusCode.INVALID_ARGUMENT,
        "memory.list",
    ),
)

INVISIBLE: Final = (
    Attack("cross-agent.search", "Search for words only another agent's memory holds", audited_as="allow"),
    Attack("cross-agent.list", "List every page, looking for another agent's memories", audited_as="allow"),
)

#: Search scores and order computed over every agent's memories would tell Bob what Alice wrote.
ORACLES: Final = (
    Attack(
        "cross-agent.score-oracle",
        "compare the scores of twin own memories to learn whether another agent wrote a word",
        audited_as="allow",
    ),
    Attack(
        "cross-agent.rank-oracle",
        "rank twin own memories in one search to learn which word another agent wrote",
        audited_as="allow",
    ),
)

ATTACKS: Final = tuple(attack for attack, *_ in DENIED) + INVISIBLE + ORACLES


def alice_rows(guardian: Guardian, world: World) -> list[dict[str, Any] | None]:
    """Alice's memories as stored, every column."""
    return [memory_row(guardian, memory_id) for memory_id in world.ids]


def bob_has_nothing_planted(guardian: Guardian) -> None:
    """No memory Bob tried to plant exists, in any namespace."""
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM memories WHERE content LIKE 'planted%'").fetchone()[0] == 0


@pytest.mark.parametrize(("attack", "attempt", "code", "operation"), [pytest.param(*c, id=c[0].id) for c in DENIED])
def test_another_agents_memories_are_out_of_reach(
    guardian: Guardian,
    world: World,
    attack: Attack,
    attempt: Callable[[World], object],
    code: grpc.StatusCode,
    operation: str,
) -> None:
    before = alice_rows(guardian, world)
    refusal = refused(guardian, lambda: attempt(world), code, operation, payloads=[MARK], agent=world.bob.name)
    assert world.alice.name not in refusal.details
    assert alice_rows(guardian, world) == before
    bob_has_nothing_planted(guardian)


@pytest.mark.parametrize("attack", cases(INVISIBLE))
def test_search_and_list_never_show_another_agents_memories(guardian: Guardian, world: World, attack: Attack) -> None:
    before = alice_rows(guardian, world)
    bob = world.bob
    if attack.id == "cross-agent.search":
        request = pb.SearchRequest(session_id=bob.session, query=f"alice plan note {MARK}")
        reply, _ = served(guardian, lambda: bob.stub.Search(request, timeout=20), "memory.search")
        shown = {hit.memory.id for hit in reply.hits}
        assert all(hit.memory.author == bob.name for hit in reply.hits)
    else:
        shown, _ = served(guardian, bob.listed_ids, "memory.list")
    assert not shown & set(world.ids)
    assert alice_rows(guardian, world) == before


@pytest.mark.parametrize("attack", cases(ORACLES))
def test_search_results_do_not_depend_on_another_agents_memories(
    guardian: Guardian, world: World, attack: Attack
) -> None:
    bob, (written, unwritten) = world.bob, world.twins

    def search(query: str) -> list[tuple[str, float]]:
        """Bob's search by words for query: (content, score) of each hit, audited as an allow.

        The words' statistics are what could tell; the semantic leg's partitions are tested in
        tests/integration/test_recall.py.
        """
        request = pb.SearchRequest(session_id=bob.session, query=query, mode=pb.SEARCH_MODE_LEXICAL)
        reply, _ = served(guardian, lambda: bob.stub.Search(request, timeout=20), "memory.search")
        return [(hit.memory.content, hit.score) for hit in reply.hits]

    if attack.id == "cross-agent.score-oracle":
        [(_, score_written)], [(_, score_unwritten)] = search(written), search(unwritten)
    else:
        scores = dict(search(f"{written} {unwritten}"))
        score_written, score_unwritten = scores[f"probe {written}"], scores[f"probe {unwritten}"]
    assert score_written == pytest.approx(score_unwritten, rel=1e-6), (
        f"twin memories score {score_written} and {score_unwritten}: the difference is what another agent wrote"
    )
