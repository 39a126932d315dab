"""Text that is not text: invalid UTF-8 and lone surrogates in every string field, and invisible-only text.

Protobuf strings must be UTF-8; a compromised gateway can send any bytes. Each kind
of broken encoding goes into each string field an agent request has, as raw bytes:
INVALID_ARGUMENT, audited before the session is resolved, nothing stored. Text that
is valid UTF-8 but nothing once normalised (controls, zero-width characters) is
refused too: a memory must hold something.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Final

import grpc
import pytest

from tests.security.hostile import OPERATION, Agent, Attack, enrol, marker, raw_call, refused
from tests.security.wire import field, message
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
MARK: Final = marker()

#: (attack, bytes that are not UTF-8 text).
ENCODINGS: Final[tuple[tuple[Attack, bytes], ...]] = (
    (Attack("utf8.invalid-bytes", "0xFF and 0xFE, which never occur in UTF-8"), b"\xff\xfe"),
    (
        Attack("utf8.lone-high-surrogate", "U+D800 encoded on its own (surrogatepass)"),
        "\ud800".encode(errors="surrogatepass"),
    ),
    (Attack("utf8.lone-low-surrogate", "U+DC00 encoded on its own"), "\udc00".encode(errors="surrogatepass")),
    (
        Attack("utf8.cesu8-pair", "an emoji as two encoded surrogates (CESU-8)"),
        "\ud83d\ude00".encode(errors="surrogatepass"),
    ),
    (Attack("utf8.overlong-slash", "'/' as an overlong two-byte sequence (0xC0 0xAF)"), b"\xc0\xaf"),
    (Attack("utf8.overlong-nul", "NUL as modified UTF-8 (0xC0 0x80)"), b"\xc0\x80"),
    (Attack("utf8.truncated-sequence", "a three-byte sequence cut after two bytes"), b"\xe2\x82"),
    (Attack("utf8.beyond-unicode", "a code point above U+10FFFF"), b"\xf4\x90\x80\x80"),
)

#: (where, method, how to build that method's request with bad bytes in that one field).
Builder = Callable[[bytes, bytes], bytes]
FIELDS: Final[tuple[tuple[str, str, Builder], ...]] = (
    ("agent_token", "OpenSession", lambda session, bad: field(1, b"agt_" + bad)),
    ("session_id", "Store", lambda session, bad: field(1, session[:-2] + bad) + field(2, field(1, b"ok"))),
    ("content", "Store", lambda session, bad: field(1, session) + field(2, field(1, b"note " + bad))),
    ("tag", "Store", lambda session, bad: field(1, session) + field(2, field(1, b"ok") + field(2, b"t" + bad))),
    (
        "metadata",
        "Store",
        lambda session, bad: field(1, session) + field(2, field(1, b"ok") + field(3, b'{"a":"' + bad + b'"}')),
    ),
    ("namespace", "Store", lambda session, bad: field(1, session) + field(2, field(1, b"ok") + field(4, b"ns" + bad))),
    (
        "batch content",
        "StoreBatch",
        lambda session, bad: field(1, session) + field(2, field(1, b"ok")) + field(2, field(1, bad)),
    ),
    ("id", "Get", lambda session, bad: field(1, session) + field(2, b"mem_" + bad)),
    ("query", "Search", lambda session, bad: field(1, session) + field(2, b"find " + bad)),
    ("cursor", "List", lambda session, bad: field(1, session) + field(3, bad)),
    ("update content", "Update", lambda session, bad: field(1, session) + field(2, b"mem_0") + field(3, bad)),
    ("update tags", "Update", lambda session, bad: field(1, session) + field(2, b"mem_0") + field(4, field(1, bad))),
    (
        "update metadata",
        "Update",
        lambda session, bad: field(1, session) + field(2, b"mem_0") + field(5, b'"' + bad + b'"'),
    ),
    ("delete id", "Delete", lambda session, bad: field(1, session) + field(2, bad)),
    ("close session_id", "CloseSession", lambda session, bad: field(1, bad + session)),
)

#: Valid UTF-8 that normalises to nothing (or to a control character where none may be).
INVISIBLE: Final[tuple[tuple[Attack, str, str], ...]] = (
    (
        Attack("text.controls-only-content", "content of NUL and other control characters only"),
        "\x00\x01\x7f\x1b",
        "content",
    ),
    (
        Attack("text.invisible-only-content", "content of zero-width and bidi characters only"),
        "\u200b\u200d\u202e\ufeff\u2060",
        "content",
    ),
    (Attack("text.nul-in-tag", "a tag with a NUL byte inside"), "tag\x00tail", "tags"),
    (Attack("text.escape-in-tag", "a tag carrying a terminal escape sequence"), "\x1b[31mred", "tags"),
)

ATTACKS: Final = tuple(attack for attack, _ in ENCODINGS) + tuple(attack for attack, *_ in INVISIBLE)


@pytest.fixture(scope="module")
def agent(guardian: Guardian) -> Iterator[Agent]:
    """The agent whose session the broken requests name."""
    with enrol(guardian, "writer") as enrolled:
        yield enrolled


def stored(guardian: Guardian, agent: Agent) -> int:
    """How many memories the agent has."""
    with guardian.keyed_db() as db:
        return int(db.execute("SELECT count(*) FROM memories WHERE agent = ?", (agent.name,)).fetchone()[0])


@pytest.mark.parametrize(("attack", "bad"), [pytest.param(a, b, id=a.id) for a, b in ENCODINGS])
def test_broken_utf8_is_refused_in_every_string_field(
    guardian: Guardian, agent: Agent, attack: Attack, bad: bytes
) -> None:
    session = agent.session.encode()
    for where, method, build in FIELDS:
        payload = message(build(session, bad + MARK.encode()))
        refusal = refused(
            guardian,
            functools.partial(raw_call, guardian, method, payload),
            grpc.StatusCode.INVALID_ARGUMENT,
            OPERATION[method],
            payloads=[MARK],
            agent="",
        )
        assert "malformed" in refusal.details, where
    assert stored(guardian, agent) == 0


@pytest.mark.parametrize(("attack", "text", "where"), [pytest.param(*c, id=c[0].id) for c in INVISIBLE])
def test_text_that_is_nothing_once_normalised_is_refused(
    guardian: Guardian, agent: Agent, attack: Attack, text: str, where: str
) -> None:
    draft = pb.MemoryDraft(content=text) if where == "content" else pb.MemoryDraft(content="ok", tags=[text])
    refused(
        guardian,
        lambda: agent.stub.Store(pb.StoreRequest(session_id=agent.session, memory=draft), timeout=20),
        grpc.StatusCode.INVALID_ARGUMENT,
        "memory.store",
        agent=agent.name,
    )
    assert stored(guardian, agent) == 0
