"""FTS5 and SQL syntax where the guardian expects plain text, ids and cursors.

No call takes SQL or query syntax: search text is split into quoted words, ids and
namespaces must have the issued shape, and a list cursor is signed. So an injection
string is either refused (INVALID_ARGUMENT for an id, a namespace, a cursor, or a
query with no word in it) or served as the plain text it is: a search finds only the
caller's own memories holding one of its words, a tag comes back byte for byte, and
the tables are all still there afterwards.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import grpc
import pytest

from tests.security.hostile import Agent, Attack, enrol, marker, memory_row, refused, served
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
MARK: Final = marker()
SECRET_WORD: Final = f"vault{MARK}"
TABLES: Final = ("memories", "memory_terms", "audit", "agents")


@dataclass
class World:
    """Victim holds a secret memory; Mallory injects."""

    victim: Agent
    secret_id: str
    mallory: Agent
    #: Mallory's own memories.
    own: set[str]
    #: A real next_cursor from Mallory's List.
    cursor: str


@pytest.fixture(scope="module")
def world(guardian: Guardian) -> Iterator[World]:
    """A victim with a secret memory; Mallory with two memories and a list cursor."""
    victim, mallory = enrol(guardian, "victim"), enrol(guardian, "mallory")
    secret = victim.store(f"the {SECRET_WORD} code is 2468", tags=["private"])
    own = {mallory.store(text).id for text in ("and near the fox there is content", "select the union of notes")}
    cursor = mallory.stub.List(pb.ListRequest(session_id=mallory.session, page_size=1), timeout=20).next_cursor
    yield World(victim, secret.id, mallory, own, cursor)
    victim.close()
    mallory.close()


def tables_intact(guardian: Guardian, world: World, before: dict[str, Any] | None) -> None:
    """Every table is still there and the victim's memory is exactly as it was."""
    with guardian.keyed_db() as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(TABLES) <= names
    assert memory_row(guardian, world.secret_id) == before


# -- search text ---------------------------------------------------------------------------------

#: (attack, query). A query with a word in it is searched as those words; one without is refused.
QUERIES: Final = (
    (Attack("fts.lone-quote", "a lone double quote, to break out of a quoted FTS string"), '"'),
    (Attack("fts.star", "a bare *, to match everything"), "*"),
    (Attack("fts.parentheses", "unbalanced parentheses, to make the FTS parser fail"), "((( )"),
    (Attack("fts.near", "NEAR(), the FTS proximity operator", "allow"), f"NEAR(fox {SECRET_WORD}, 5)"),
    (Attack("fts.column-filter", "a column filter: content:", "allow"), f"content:{SECRET_WORD}"),
    (Attack("fts.column-set", "a column-set filter: {content tags}:", "allow"), f"{{content tags}}: {SECRET_WORD}"),
    (Attack("fts.boolean", "OR / NOT operators to widen the match", "allow"), f'fox" OR "{SECRET_WORD}" OR NOT "x'),
    (Attack("fts.prefix", "a prefix query vault*, to match the victim's word", "allow"), "vault*"),
    (Attack("fts.caret", "^, the initial-token operator", "allow"), f"^{SECRET_WORD}"),
    (Attack("sql.or-true", "' OR 1=1 --", "allow"), "fox' OR 1=1 --"),
    (Attack("sql.drop-table", "'); DROP TABLE memories; --", "allow"), "'); DROP TABLE memories; --"),
    (
        Attack("sql.union-select", "a UNION SELECT of every memory's content", "allow"),
        "x' UNION SELECT content FROM memories --",
    ),
    (Attack("sql.stacked-pragma", "a stacked PRAGMA to read the key", "allow"), "fox; PRAGMA key; --"),
)

QUERY_ATTACKS: Final = tuple(attack for attack, _ in QUERIES)


@pytest.mark.parametrize(("attack", "query"), [pytest.param(q[0], q[-1], id=q[0].id) for q in QUERIES])
def test_search_text_is_only_ever_words(guardian: Guardian, world: World, attack: Attack, query: str) -> None:
    before = memory_row(guardian, world.secret_id)
    mallory = world.mallory
    request = pb.SearchRequest(session_id=mallory.session, query=query)
    words = {word.lower() for word in re.findall(r"\w+", query)}
    assert (not words) == (attack.audited_as == "deny")
    if not words:
        refusal = refused(
            guardian,
            lambda: mallory.stub.Search(request, timeout=20),
            grpc.StatusCode.INVALID_ARGUMENT,
            "memory.search",
            agent=mallory.name,
        )
        assert "needs at least one word" in refusal.details
    else:
        by_words = pb.SearchRequest(session_id=mallory.session, query=query, mode=pb.SEARCH_MODE_LEXICAL)
        reply, _ = served(guardian, lambda: mallory.stub.Search(by_words, timeout=20), "memory.search")
        for hit in reply.hits:
            assert hit.memory.id in world.own, "a search reached beyond the caller's own memories"
            assert words & {word.lower() for word in re.findall(r"\w+", hit.memory.content)}
            assert SECRET_WORD not in hit.memory.content
        # By meaning too (the default): still only the caller's own memories, never the secret.
        reply, _ = served(guardian, lambda: mallory.stub.Search(request, timeout=20), "memory.search")
        for hit in reply.hits:
            assert hit.memory.id in world.own and SECRET_WORD not in hit.memory.content
    tables_intact(guardian, world, before)


# -- ids, namespaces, cursors ---------------------------------------------------------------------


def _cursor(created_at_ms: int, rowid: int, mac: str) -> str:
    """A cursor of the guardian's shape (base64 position, '.', 32 hex) with the given signature."""
    payload = base64.urlsafe_b64encode(struct.pack(">qq", created_at_ms, rowid)).decode().rstrip("=")
    return f"{payload}.{mac}"


def _retarget(cursor: str) -> str:
    """A real cursor with its position changed and its signature kept."""
    _, mac = cursor.split(".")
    return _cursor(2**62, 2**62, mac)


def _flip_mac(cursor: str) -> str:
    """A real cursor with the last character of its signature changed."""
    payload, mac = cursor.split(".")
    return f"{payload}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}"


def _get(memory_id: str) -> Callable[[World], object]:
    """Mallory's Get of memory_id."""
    return lambda w: w.mallory.stub.Get(pb.GetRequest(session_id=w.mallory.session, id=memory_id), timeout=20)


def _delete(memory_id: str) -> Callable[[World], object]:
    """Mallory's Delete of memory_id."""
    return lambda w: w.mallory.stub.Delete(pb.DeleteRequest(session_id=w.mallory.session, id=memory_id), timeout=20)


def _namespace(namespace: str) -> Callable[[World], object]:
    """Mallory's Store into namespace."""
    draft = pb.MemoryDraft(content="planted", namespace=namespace)
    return lambda w: w.mallory.stub.Store(pb.StoreRequest(session_id=w.mallory.session, memory=draft), timeout=20)


def _list(cursor: Callable[[World], str]) -> Callable[[World], object]:
    """Mallory's List with the cursor made from the world."""
    return lambda w: w.mallory.stub.List(pb.ListRequest(session_id=w.mallory.session, cursor=cursor(w)), timeout=20)


REFUSED: Final[tuple[tuple[Attack, Callable[[World], object], str], ...]] = (
    (Attack("sql.id-or-true", "a memory id of ' OR '1'='1"), _get(f"mem_' OR '1'='1 {MARK}"), "memory.get"),
    (Attack("sql.id-like-wildcard", "a memory id of LIKE wildcards (mem_%)"), _get(f"mem_%{MARK}"), "memory.get"),
    (
        Attack("sql.id-underscores", "an id of the issued length made of _ wildcards"),
        _get("mem_" + "_" * 32),
        "memory.get",
    ),
    (
        Attack("sql.id-drop-table", "Delete with an id of '); DROP TABLE memories; --"),
        _delete(f"'); DROP TABLE memories; -- {MARK}"),
        "memory.delete",
    ),
    (
        Attack("sql.id-newline-suffix", "a valid-looking id followed by a newline and SQL"),
        _get("mem_" + "0" * 32 + f"\n; DROP TABLE audit {MARK}"),
        "memory.get",
    ),
    (
        Attack("sql.namespace-or-true", "a namespace of victim' OR '1'='1"),
        _namespace(f"victim' OR '1'='1{MARK}"),
        "memory.store",
    ),
    (Attack("sql.namespace-traversal", "a namespace of ../victim"), _namespace(f"../victim{MARK}"), "memory.store"),
    (Attack("sql.namespace-wildcard", "a namespace of %, a LIKE wildcard"), _namespace(f"%{MARK}"), "memory.store"),
    (Attack("cursor.sql", "a cursor of ' OR 1=1 --"), _list(lambda w: f"' OR 1=1 -- {MARK}"), "memory.list"),
    (
        Attack("cursor.unsigned", "a well-formed cursor with a made-up signature"),
        _list(lambda w: _cursor(2**62, 2**62, "0" * 32)),
        "memory.list",
    ),
    (
        Attack("cursor.negative-position", "a cursor at position -1 with a made-up signature"),
        _list(lambda w: _cursor(-1, -1, "f" * 32)),
        "memory.list",
    ),
    (
        Attack("cursor.retargeted", "a real cursor with its position changed and its signature kept"),
        _list(lambda w: _retarget(w.cursor)),
        "memory.list",
    ),
    (
        Attack("cursor.bit-flipped-mac", "a real cursor with one signature character changed"),
        _list(lambda w: _flip_mac(w.cursor)),
        "memory.list",
    ),
    (
        Attack("cursor.padded", "a real cursor with base64 padding added"),
        _list(lambda w: w.cursor.replace(".", "==.")),
        "memory.list",
    ),
)

STORED_AS_TEXT: Final = (
    Attack("sql.tags-verbatim", "SQL and FTS syntax in tags, to be run when the tags are read", "allow"),
    Attack("sql.metadata-verbatim", "SQL in metadata keys and values", "allow"),
)

ATTACKS: Final = QUERY_ATTACKS + tuple(attack for attack, *_ in REFUSED) + STORED_AS_TEXT


@pytest.mark.parametrize(("attack", "attempt", "operation"), [pytest.param(*c, id=c[0].id) for c in REFUSED])
def test_injected_ids_namespaces_and_cursors_are_refused(
    guardian: Guardian, world: World, attack: Attack, attempt: Callable[[World], object], operation: str
) -> None:
    before = memory_row(guardian, world.secret_id)
    refusal = refused(
        guardian,
        lambda: attempt(world),
        grpc.StatusCode.INVALID_ARGUMENT,
        operation,
        payloads=[MARK, *world.cursor.split(".")],
        agent=world.mallory.name,
    )
    assert refusal.row["object_id"] == ""
    tables_intact(guardian, world, before)
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM memories WHERE content = 'planted'").fetchone()[0] == 0


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.id) for a in STORED_AS_TEXT])
def test_injection_in_tags_and_metadata_is_stored_as_text(guardian: Guardian, world: World, attack: Attack) -> None:
    before = memory_row(guardian, world.secret_id)
    mallory = world.mallory
    if attack.id == "sql.tags-verbatim":
        draft = pb.MemoryDraft(content="tagged", tags=["'); DROP TABLE memories; --", '" OR 1=1', "content:*", "NEAR("])
    else:
        draft = pb.MemoryDraft(content="annotated", metadata_json="{\"'); DROP TABLE audit; --\": \"' OR '1'='1\"}")
    stored, _ = served(
        guardian,
        lambda: mallory.stub.Store(pb.StoreRequest(session_id=mallory.session, memory=draft), timeout=20),
        "memory.store",
    )
    got = mallory.stub.Get(pb.GetRequest(session_id=mallory.session, id=stored.memory.id), timeout=20).memory
    assert list(got.tags) == list(draft.tags)
    if draft.metadata_json:
        assert got.metadata_json == "{\"'); DROP TABLE audit; --\":\"' OR '1'='1\"}"
    tables_intact(guardian, world, before)
