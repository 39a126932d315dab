"""Memories an agent may not see although they are its own: outside its read window, or quarantined.

A profile's ``read_window`` hides memories older than it; a filter with action
``quarantine`` stores a memory hidden until the security team releases it. Neither
may come back through any read RPC (Get, Search, List), nor be reached by Update
(which could launder quarantined content) or Delete (which could destroy the
evidence): NOT_FOUND, audited, the row in the database unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import grpc
import pytest

from tests.security.hostile import Agent, Attack, enrol, hostile_guardian, marker, memory_row, refused, served
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
MARK: Final = marker()
ALL_OPERATIONS: Final = ["store", "get", "search", "list", "update", "delete"]
#: The shipped filters stay in force: their script-injection rule quarantines.
HIDING_POLICY: Final = {
    "profiles": {"windowed": {"operations": ALL_OPERATIONS, "read_window": "1s"}},
    "agents": {"late": "windowed"},
}
HIDDEN: Final = ("window", "quarantine")


@dataclass
class Hidden:
    """One hidden memory and the agent that wrote it."""

    agent: Agent
    memory_id: str
    #: A word only this memory holds.
    word: str


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    """A guardian whose agent ``late`` sees only memories younger than a second."""
    with hostile_guardian(**HIDING_POLICY) as started:
        yield started


@pytest.fixture(scope="module")
def hidden(guardian: Guardian) -> Iterator[dict[str, Hidden]]:
    """A memory that has left its agent's read window, and a quarantined one."""
    late = enrol(guardian, "late", exact=True)
    old = late.store(f"an old note {MARK}window")
    hider = enrol(guardian, "hider")
    held = hider.store(f"<script>steal()</script> {MARK}quarantine")
    assert held.status == "quarantined"
    time.sleep(1.2)
    assert late.store("a fresh note").id in late.listed_ids()  # the window still shows what is young
    yield {
        "window": Hidden(late, old.id, f"{MARK}window"),
        "quarantine": Hidden(hider, held.id, f"{MARK}quarantine"),
    }
    late.close()
    hider.close()


DENIED_ACTIONS: Final = ("get", "update", "delete")
SHOWN_ACTIONS: Final = ("search", "list")
_TRIES: Final = {
    "get": "Get {what} by its id",
    "update": "Update {what} (to launder or release it)",
    "delete": "Delete {what} (to destroy it)",
    "search": "Search for the words only {what} holds",
    "list": "List every page, looking for {what}",
}
_WHAT: Final = {"window": "a memory older than the read window", "quarantine": "a quarantined memory"}

DENIED_ATTACKS: Final = tuple(
    Attack(f"{kind}.{action}", _TRIES[action].format(what=_WHAT[kind])) for kind in HIDDEN for action in DENIED_ACTIONS
)
SHOWN_ATTACKS: Final = tuple(
    Attack(f"{kind}.{action}", _TRIES[action].format(what=_WHAT[kind]), audited_as="allow")
    for kind in HIDDEN
    for action in SHOWN_ACTIONS
)
ATTACKS: Final = DENIED_ATTACKS + SHOWN_ATTACKS


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.id) for a in DENIED_ATTACKS])
def test_hidden_memories_cannot_be_read_changed_or_deleted(
    guardian: Guardian, hidden: dict[str, Hidden], attack: Attack
) -> None:
    kind, _, action = attack.id.partition(".")
    target = hidden[kind]
    agent, session = target.agent, target.agent.session
    before = memory_row(guardian, target.memory_id)
    assert before is not None
    attempts = {
        "get": lambda: agent.stub.Get(pb.GetRequest(session_id=session, id=target.memory_id), timeout=20),
        "update": lambda: agent.stub.Update(
            pb.UpdateRequest(session_id=session, id=target.memory_id, content="harmless now"), timeout=20
        ),
        "delete": lambda: agent.stub.Delete(pb.DeleteRequest(session_id=session, id=target.memory_id), timeout=20),
    }
    refusal = refused(
        guardian, attempts[action], grpc.StatusCode.NOT_FOUND, f"memory.{action}", payloads=[MARK], agent=agent.name
    )
    assert refusal.row["object_id"] == target.memory_id
    assert memory_row(guardian, target.memory_id) == before


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.id) for a in SHOWN_ATTACKS])
def test_hidden_memories_never_come_back_from_search_or_list(
    guardian: Guardian, hidden: dict[str, Hidden], attack: Attack
) -> None:
    kind, _, action = attack.id.partition(".")
    target = hidden[kind]
    agent = target.agent
    before = memory_row(guardian, target.memory_id)
    if action == "search":
        request = pb.SearchRequest(session_id=agent.session, query=f"{target.word} note script steal")
        reply, row = served(guardian, lambda: agent.stub.Search(request, timeout=20), "memory.search")
        shown = {hit.memory.id for hit in reply.hits}
        assert not any(target.word in hit.memory.content for hit in reply.hits)
    else:
        shown, row = served(guardian, agent.listed_ids, "memory.list")
    assert target.memory_id not in shown
    assert target.memory_id not in row["object_id"]
    assert memory_row(guardian, target.memory_id) == before
