"""Sessions the guardian did not issue, or no longer honours: forged, replayed, expired, confused with tokens.

Every call but OpenSession names a session; a session is the only thing that says
which agent is calling. A forged or dead one must get UNAUTHENTICATED on every
method, reach no memory, and leave a deny row that names no agent and no session.
The guardian here runs a policy with short sessions (1 s idle, 1.5 s in all).
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Final

import grpc
import pytest
from google.protobuf.message import Message

from tests.security.hostile import (
    AGENT_METHODS,
    OPERATION,
    Agent,
    Attack,
    AuditWatch,
    cases,
    enrol,
    hostile_guardian,
    marker,
    memory_row,
    raw_call,
    refused,
)
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
MARK: Final = marker()
SESSION_POLICY: Final = {
    "sessions": {"idle_timeout": "1s", "max_lifetime": "1500ms", "max_per_agent": 50},
    "rate_limits": {"session_opens": {"burst": 60, "per_minute": 600}},
}
#: Every method that takes a session id.
SESSION_METHODS: Final = tuple(name for name in AGENT_METHODS if name != "OpenSession")


def _swap_case(text: str) -> str:
    """A session id with the case of its random part swapped."""
    return "ses_" + text[4:].swapcase()


def _change_last(text: str) -> str:
    """text with its last character replaced by another."""
    return text[:-1] + ("A" if text[-1] != "A" else "B")


#: (attack, how to forge a session id from a live one).
FORGERIES: Final[tuple[tuple[Attack, Callable[[Agent], str]], ...]] = (
    (Attack("session.empty", "no session id at all"), lambda live: ""),
    (
        Attack("session.random-well-formed", "a random id of exactly the issued shape (ses_ + 32 base64url)"),
        lambda live: "ses_" + secrets.token_urlsafe(24),
    ),
    (Attack("session.wrong-prefix", "a live id with another prefix"), lambda live: "sez_" + live.session[4:]),
    (Attack("session.truncated", "a live id missing its last character"), lambda live: live.session[:-1]),
    (Attack("session.extended", "a live id with one more character"), lambda live: live.session + "A"),
    (
        Attack("session.one-char-changed", "a live id with its last character changed"),
        lambda live: _change_last(live.session),
    ),
    (Attack("session.case-swapped", "a live id with its letters' case swapped"), lambda live: _swap_case(live.session)),
    (
        Attack("session.whitespace-padded", "a live id padded with spaces and a newline (trimmed, it would match)"),
        lambda live: f" {live.session}\n",
    ),
    (
        Attack("session.nul-suffixed", "a live id followed by a NUL byte (a C string would stop there)"),
        lambda live: live.session + "\x00",
    ),
    (Attack("session.huge", "a 1 MiB session id"), lambda live: "ses_" + "A" * (1 << 20)),
    (Attack("session.agent-token", "the agent's token where its session id goes"), lambda live: live.token),
    (Attack("session.sql-injection", "SQL in the session id"), lambda live: f"ses_' OR '1'='1' -- {MARK}"),
)

OTHER_ATTACKS: Final = (
    Attack("replay.after-close", "every method with a session id after CloseSession ended it"),
    Attack("replay.close-twice", "CloseSession again with the id it just closed"),
    Attack("replay.after-revoke", "a session of an agent the security team revoked"),
    Attack("expired.idle", "a session left unused past the policy's idle timeout"),
    Attack("expired.absolute", "a session kept busy past the policy's maximum lifetime"),
    Attack("token.session-id-as-token", "a live session id where OpenSession wants an agent token"),
    Attack("token.forged-well-formed", "a random token of exactly the issued shape (agt_ + 43 base64url)"),
    Attack("token.revoked", "the token of a revoked agent"),
    Attack("identity.operator-header", "guardianctl's operator header on agent calls, to be recorded as an admin"),
)

ATTACKS: Final = tuple(attack for attack, _ in FORGERIES) + OTHER_ATTACKS


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    """A guardian whose sessions end after 1 s unused or 1.5 s in all."""
    with hostile_guardian(**SESSION_POLICY) as started:
        yield started


@pytest.fixture(scope="module")
def victim(guardian: Guardian) -> Iterator[tuple[Agent, str]]:
    """An agent with one memory that no forged session may reach: (agent, memory id)."""
    with enrol(guardian, "victim") as agent:
        yield agent, agent.store(f"the victim's memory {MARK}victim").id


def requests(session_id: str, memory_id: str) -> dict[str, Message]:
    """One request for each session method, naming session_id and, where it takes one, the victim's memory."""
    draft = pb.MemoryDraft(content=f"forged write {MARK}")
    return {
        "CloseSession": pb.CloseSessionRequest(session_id=session_id),
        "Store": pb.StoreRequest(session_id=session_id, memory=draft),
        "StoreBatch": pb.StoreBatchRequest(session_id=session_id, memories=[draft]),
        "Get": pb.GetRequest(session_id=session_id, id=memory_id),
        "Search": pb.SearchRequest(session_id=session_id, query=f"{MARK}victim"),
        "List": pb.ListRequest(session_id=session_id),
        "Update": pb.UpdateRequest(session_id=session_id, id=memory_id, content=f"overwritten {MARK}"),
        "Delete": pb.DeleteRequest(session_id=session_id, id=memory_id),
    }


def refused_everywhere(guardian: Guardian, session_id: str, memory_id: str, methods: tuple[str, ...]) -> None:
    """Each method with session_id is UNAUTHENTICATED, audited with no agent and no session."""
    built = requests(session_id, memory_id)
    echoes = [MARK] + ([session_id.strip()] if len(session_id.strip()) >= 8 else [])
    for method in methods:
        payload = built[method].SerializeToString()
        refusal = refused(
            guardian,
            functools.partial(raw_call, guardian, method, payload),
            grpc.StatusCode.UNAUTHENTICATED,
            OPERATION[method],
            payloads=echoes,
            agent="",
        )
        assert refusal.row["session"] == "", refusal.row


def assert_victim_untouched(guardian: Guardian, victim: tuple[Agent, str], before: dict[str, object] | None) -> None:
    """The victim's memory is exactly as it was, and nothing with the marker was stored."""
    assert memory_row(guardian, victim[1]) == before
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM memories WHERE content LIKE ?", ("%forged write%",)).fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM memories WHERE content LIKE ?", ("%overwritten%",)).fetchone()[0] == 0


@pytest.mark.parametrize(("attack", "forge"), [pytest.param(a, f, id=a.id) for a, f in FORGERIES])
def test_forged_session_ids_are_refused_on_every_method(
    guardian: Guardian, victim: tuple[Agent, str], attack: Attack, forge: Callable[[Agent], str]
) -> None:
    before = memory_row(guardian, victim[1])
    with enrol(guardian, "forger") as live:
        forged = forge(live)
        assert forged != live.session
        refused_everywhere(guardian, forged, victim[1], SESSION_METHODS)
    assert_victim_untouched(guardian, victim, before)


@pytest.mark.parametrize("attack", cases(OTHER_ATTACKS))
def test_dead_sessions_and_false_tokens(guardian: Guardian, victim: tuple[Agent, str], attack: Attack) -> None:
    before = memory_row(guardian, victim[1])
    case = attack.id
    with enrol(guardian, "replayer") as agent:
        if case in ("replay.after-close", "replay.close-twice"):
            agent.stub.CloseSession(pb.CloseSessionRequest(session_id=agent.session), timeout=20)
            methods = ("CloseSession",) if case == "replay.close-twice" else SESSION_METHODS[1:]
            refused_everywhere(guardian, agent.session, victim[1], methods)
        elif case == "replay.after-revoke":
            guardian.revoke_agent(agent.name)
            refused_everywhere(guardian, agent.session, victim[1], ("Store", "Get", "List"))
        elif case == "expired.idle":
            time.sleep(1.2)
            refusal = _refused_list(guardian, agent)
            assert "expired" in refusal
        elif case == "expired.absolute":
            for _ in range(2):  # busy: never idle as long as the idle timeout
                time.sleep(0.5)
                agent.stub.List(pb.ListRequest(session_id=agent.session), timeout=20)
            time.sleep(0.6)
            assert "expired" in _refused_list(guardian, agent)
        elif case == "identity.operator-header":
            _claim_operator(guardian, agent)
        else:
            token = {
                "token.session-id-as-token": agent.session,
                "token.forged-well-formed": "agt_" + secrets.token_urlsafe(32),
                "token.revoked": agent.token,
            }[case]
            if case == "token.revoked":
                guardian.revoke_agent(agent.name)
            payload = pb.OpenSessionRequest(agent_token=token).SerializeToString()
            refused(
                guardian,
                lambda: raw_call(guardian, "OpenSession", payload),
                grpc.StatusCode.UNAUTHENTICATED,
                "session.open",
                payloads=[token],
                agent="",
            )
    assert_victim_untouched(guardian, victim, before)


def _refused_list(guardian: Guardian, agent: Agent) -> str:
    """List with the agent's (dead) session: UNAUTHENTICATED and audited; the error message."""
    payload = pb.ListRequest(session_id=agent.session).SerializeToString()
    refusal = refused(
        guardian,
        lambda: raw_call(guardian, "List", payload),
        grpc.StatusCode.UNAUTHENTICATED,
        "memory.list",
        payloads=[agent.session],
        agent="",
    )
    return refusal.details


def _claim_operator(guardian: Guardian, agent: Agent) -> None:
    """With a forged session the call is refused; with a real one it is the agent's, never an admin's."""
    operator = (("x-guardian-operator", "root"),)
    forged = pb.ListRequest(session_id="ses_" + secrets.token_urlsafe(24))
    refused(
        guardian,
        lambda: agent.stub.List(forged, metadata=operator, timeout=20),
        grpc.StatusCode.UNAUTHENTICATED,
        "memory.list",
        agent="",
    )
    watch = AuditWatch(guardian)
    agent.stub.List(pb.ListRequest(session_id=agent.session), metadata=operator, timeout=20)
    assert watch.only_row()["agent"] == agent.name
