"""Search on a real SQLCipher file: FTS5 ranks, then only the best hits are joined and scoped.

The caller's scope (namespaces, active status, read window) is applied to the ranked hits,
so these tests put the caller's memories behind many better-ranked memories it may not see.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardian.keys.ring import KeyRing
from guardian.policy.compile import compile_policy
from guardian.policy.default import render_default_policy
from guardian.store import search_index
from guardian.store.database import Connection, Database
from guardian.store.memories import QUARANTINED, Draft, MemoryStore, Scope, SearchQuery, StoredMemory

KEY_HEX = "ab" * 32
NOW = 1_800_000_000_000


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "memory.db", KEY_HEX)
    with database.write() as connection:
        for name in ("alice", "bob"):
            connection.execute(
                "INSERT INTO agents (name, token_key_id, token_hash, created_at_ms) VALUES (?, 'k1', ?, 0)",
                (name, "hash-" + name),
            )
    yield database
    database.close()


STORE = MemoryStore(KeyRing("k1", {"k1": b"k" * 32}))
POLICY = compile_policy(render_default_policy())


def scope(agent: str, not_before_ms: int = 0) -> Scope:
    return Scope(
        agent=agent,
        namespaces=(agent,),
        writable=frozenset({agent}),
        trust=POLICY.trust_view(agent),
        not_before_ms=not_before_ms,
    )


def search(db: Database, caller: Scope, query: str, limit: int) -> list[tuple[StoredMemory, float]]:
    """The lexical leg alone (this store keeps no vectors)."""
    words = tuple(search_index.query_terms(query))
    with db.read() as reader:
        found = STORE.search(reader, caller, SearchQuery(words, "lexical"), limit)
    return [(hit.memory, hit.score) for hit in found.hits]


def put(connection: Connection, agent: str, content: str, at_ms: int = NOW, status: str = "active") -> str:
    [memory] = STORE.insert(connection, scope(agent), [Draft(content, (), "{}", status=status)], at_ms)
    return memory.id


def test_the_callers_memory_is_found_behind_many_better_ranked_ones_it_may_not_see(db: Database) -> None:
    with db.write() as connection:
        mine = put(connection, "alice", "a zebra crossed the road")
        for number in range(300):
            put(connection, "bob", f"zebra zebra zebra herd {number}")
    hits = search(db, scope("alice"), "zebra", 5)
    assert [memory.id for memory, _ in hits] == [mine]
    assert len(search(db, scope("bob"), "zebra", 5)) == 5


def test_quarantined_and_out_of_window_memories_are_never_hits(db: Database) -> None:
    with db.write() as connection:
        old = [put(connection, "alice", f"lantern note {n}", at_ms=NOW - 10_000) for n in range(50)]
        put(connection, "alice", "lantern lantern held back", status=QUARANTINED)
        recent = [put(connection, "alice", f"lantern fresh {n}", at_ms=NOW + n) for n in range(3)]
    ids = [memory.id for memory, _ in search(db, scope("alice", not_before_ms=NOW), "lantern", 10)]
    assert sorted(ids) == sorted(recent)
    everything = [memory.id for memory, _ in search(db, scope("alice"), "lantern", 100)]
    assert sorted(everything) == sorted(old + recent)


def test_hits_come_best_first_with_scores_that_fall(db: Database) -> None:
    with db.write() as connection:
        weak = put(connection, "alice", "one mention of comet among many other ordinary words here")
        strong = put(connection, "alice", "comet comet comet")
        middle = put(connection, "alice", "comet tails and comet dust")
    hits = search(db, scope("alice"), "comet", 10)
    assert [memory.id for memory, _ in hits] == [strong, middle, weak]
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True)


def test_the_limit_holds_when_many_match(db: Database) -> None:
    with db.write() as connection:
        for number in range(40):
            put(connection, "alice", f"harbour log {number}")
    assert len(search(db, scope("alice"), "harbour", 7)) == 7


def test_scores_and_order_do_not_depend_on_another_namespaces_words(db: Database) -> None:
    with db.write() as connection:
        put(connection, "bob", "probe zebrax")
        put(connection, "bob", "probe quaggx")
    before = {query: search(db, scope("bob"), query, 5)[0][1] for query in ("zebrax", "quaggx")}
    with db.write() as connection:
        for number in range(20):
            put(connection, "alice", f"zebrax sighting {number}")
    after = {query: search(db, scope("bob"), query, 5)[0][1] for query in ("zebrax", "quaggx")}
    # bm25 still counts every indexed memory (N, average length), which alice's writes change; what
    # must not change is how bob's two words compare: alice's word did not become "common" for bob.
    assert abs(before["zebrax"] - before["quaggx"]) < 1e-9
    assert abs(after["zebrax"] - after["quaggx"]) < 1e-9


def test_a_memory_is_found_by_its_new_words_after_an_update_and_after_a_release(db: Database) -> None:
    with db.write() as connection:
        memory_id = put(connection, "alice", "old walrus words")
        held = put(connection, "alice", "held narwhal words", status=QUARANTINED)
    assert search(db, scope("alice"), "narwhal", 5) == []
    with db.write() as connection:
        STORE.update(
            connection,
            scope("alice"),
            memory_id,
            Draft("new puffin words", (), "{}"),
            changed=frozenset({"content"}),
            now_ms=NOW + 1,
        )
        STORE.release(connection, held, NOW + 2)
    assert search(db, scope("alice"), "walrus", 5) == []
    assert [memory.id for memory, _ in search(db, scope("alice"), "puffin", 5)] == [memory_id]
    assert [memory.id for memory, _ in search(db, scope("alice"), "narwhal", 5)] == [held]
    with db.write() as connection:
        STORE.delete(connection, scope("alice"), memory_id)
    assert search(db, scope("alice"), "puffin", 5) == []
    with db.read() as reader:
        assert reader.execute("SELECT count(*) FROM memory_terms").fetchone()[0] == 1  # only the released one


def test_words_are_folded_the_same_way_for_the_index_and_the_query(db: Database) -> None:
    with db.write() as connection:
        fullwidth = "".join(chr(0xFEE0 + ord(char)) for char in "FULLWIDTH")
        memory_id = put(connection, "alice", f"Café İstanbul {fullwidth} naïve_snake")
    for query in ("cafe", "CAFÉ", "istanbul", "fullwidth", "naive", "snake"):
        assert [memory.id for memory, _ in search(db, scope("alice"), query, 5)] == [memory_id], query


def test_a_term_most_memories_hold_is_left_out_so_the_cost_follows_the_rare_ones(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search_index, "COMMON_TERM_ROWS", 5)
    with db.write() as connection:
        common = [put(connection, "alice", f"project status update number {n}", at_ms=NOW + n) for n in range(8)]
        rare = put(connection, "alice", "project status: the zebra migration is done", at_ms=NOW + 100)
        put(connection, "bob", "zebra zebra zebra")  # another namespace: never counted for alice
    with db.read() as reader:
        match, ranked = search_index.lexical_plan(reader, [("project",), ("zebra",)], ["alice"])
        assert ranked and "project" not in match and "zebra" in match
        match, ranked = search_index.lexical_plan(reader, [("project",), ("status",)], ["alice"])
        assert not ranked and " AND " in match
    assert [memory.id for memory, _ in search(db, scope("alice"), "project zebra", 5)] == [rare]
    newest = [memory.id for memory, _ in search(db, scope("alice"), "project status", 3)]
    assert newest == [rare, common[-1], common[-2]]  # the newest matches, unscored


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=200))
@settings(max_examples=300, deadline=None)
def test_the_ascii_shortcut_finds_the_same_words_as_the_full_path(text: str) -> None:
    assert search_index.words(text) == search_index.unicode_words(text)


def owes_merges(connection: Connection) -> bool:
    """Whether FTS5 has segments left to merge: one 'merge' step then changes 2 rows or more (it does the step)."""
    before = int(connection.execute("SELECT total_changes()").fetchone()[0])
    connection.execute("INSERT INTO memory_terms (memory_terms, rank) VALUES ('merge', 16)")
    return int(connection.execute("SELECT total_changes()").fetchone()[0]) - before >= 2


def bulk_write(db: Database, agent: str, transactions: int, per_transaction: int) -> list[str]:
    """Memories written many a transaction with FTS5's merging held back: the segments a bulk write leaves."""
    with db.write() as connection:
        connection.execute("INSERT INTO memory_terms (memory_terms, rank) VALUES ('automerge', 0)")
    ids = []
    for first in range(0, transactions * per_transaction, per_transaction):
        with db.write() as connection:
            ids += [
                put(connection, agent, f"field note {n} on topic{n % 7}") for n in range(first, first + per_transaction)
            ]
    with db.write() as connection:
        connection.execute("INSERT INTO memory_terms (memory_terms, rank) VALUES ('automerge', 4)")  # the default
    return ids


def test_optimize_merges_the_segments_a_bulk_write_left_and_every_memory_is_still_found(db: Database) -> None:
    ids = bulk_write(db, "alice", transactions=12, per_transaction=20)
    found = {memory.id for memory, _ in search(db, scope("alice"), "topic3", 100)}
    assert found == set(ids[3::7])
    with db.write() as connection:
        search_index.optimize(connection)
        assert not owes_merges(connection)
    assert {memory.id for memory, _ in search(db, scope("alice"), "topic3", 100)} == found


def test_a_rebuilt_index_leaves_no_merging_to_the_next_writes(db: Database) -> None:
    ids = bulk_write(db, "alice", transactions=12, per_transaction=20)
    with db.write() as connection:
        assert search_index.rebuild(connection) == len(ids)
        assert not owes_merges(connection)
    assert {memory.id for memory, _ in search(db, scope("alice"), "topic3", 100)} == set(ids[3::7])
