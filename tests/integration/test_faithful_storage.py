"""What is stored is what was sent, on a real guardian: exact round trips of hostile Unicode, every limit
holding for the stored form, no replay past the read window, and no argument silently dropped.

The filters scan a normalised form (guardian/store/scan_form.py); the store keeps the text as sent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from guardian.store.scan_form import ScanForm
from tests.support.harness import LOG_ONLY_ANOMALIES, UNLIMITED_PROFILE, Guardian, agent_pb2, running_guardian
from tests.support.mcp_harness import call, call_error, stdio_params

pytestmark = pytest.mark.anyio

pb = agent_pb2
KEY = "faithful-key-0123456789"
POLICY: dict[str, Any] = {
    "anomaly": LOG_ONLY_ANOMALIES,
    "sessions": {"max_per_agent": 1000},
    "profiles": {
        "default": UNLIMITED_PROFILE,
        "windowed": {"operations": ["store", "get", "list", "update"], "read_window": "2s"},
    },
    "agents": {"windowed": "windowed"},
}

#: Texts the probes found changed on the way through: each must come back exactly.
HOSTILE = [
    "head of note\u200btail with a zero-width space",
    "\u200fright-to-left \u202eoverride\u202c, \U0001f468\u200d\U0001f469\u200d\U0001f467 family, \u2764\ufe0f",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 \u5168\u89d2 \uff11\uff12\uff13",  # fullwidth
    "\ufb01nance \ufb02ow, x\u00b2 + y\u00b3, \u2460 \u3392",  # ligatures, superscripts, circled, squared
    "e\u0301 vs \u00e9, \u1100\u1161 vs \uac00, \U0001f44d\U0001f3fd",  # decomposed, jamo, skin tone
    "windows\r\nline endings\r\n\ttab, bell \x07 and escape \x1b[31m",
    "tag chars \U000e0041\U000e0042 and variation \u8fba\U000e0101",
]


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Guardian, str]]:
    with running_guardian(**POLICY) as guardian:
        yield guardian, guardian.add_agent("faithful")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def session(guardian: Guardian, token: str) -> tuple[grpc.Channel, Any, str]:
    channel, stub = guardian.agent_stub()
    return channel, stub, stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id


def stored_bytes(guardian: Guardian, memory_id: str) -> tuple[int, str, str]:
    """What the database holds for a memory: its content's size in bytes, its tags and metadata as stored."""
    with guardian.keyed_db() as db:
        row = db.execute(
            "SELECT length(CAST(content AS BLOB)), tags, metadata FROM memories WHERE id = ?", (memory_id,)
        ).fetchone()
    return int(row[0]), str(row[1]), str(row[2])


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_unicode_comes_back_byte_for_byte(world: tuple[Guardian, str], text: str) -> None:
    guardian, token = world
    channel, stub, sid = session(guardian, token)
    with channel:
        tag = "".join(char for char in text if ord(char) >= 32 and char != "\x7f")[:20]  # tags take no controls
        draft = pb.MemoryDraft(content=text, tags=[tag])
        stored = stub.Store(pb.StoreRequest(session_id=sid, memory=draft)).memory
        got = stub.Get(pb.GetRequest(session_id=sid, id=stored.id)).memory
    assert stored.content == got.content == text
    assert got.content.encode() == text.encode()
    assert list(got.tags) == list(draft.tags)
    assert got.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert list(stored.redacted_by) == []
    assert stored_bytes(guardian, stored.id)[0] == len(text.encode())


def test_nul_is_refused_naming_its_position_and_nothing_is_stored(world: tuple[Guardian, str]) -> None:
    guardian, token = world
    channel, stub, sid = session(guardian, token)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.Store(pb.StoreRequest(session_id=sid, memory=pb.MemoryDraft(content="head of note\x00tail...")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        caught.value.details() == "memory.content: character 12 (counting from 0) is NUL (U+0000), which is not stored"
    )
    row = [r for r in guardian.audit_rows() if r["operation"] == "memory.store"][-1]
    assert row["decision"] == "deny" and row["reason"].startswith("invalid_argument: memory.content: character 12")
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM memories WHERE content LIKE '%tail...'").fetchone()[0] == 0


def test_the_limits_hold_for_what_is_stored(world: tuple[Guardian, str]) -> None:
    guardian, token = world
    bomb = "\ufdfa" * 21_845  # 65,535 bytes; its NFKC form is 720,885 bytes
    tag = "\ufdfa" * 21  # 63 bytes; NFKC: 693
    channel, stub, sid = session(guardian, token)
    with channel:
        stored = stub.Store(
            pb.StoreRequest(
                session_id=sid, memory=pb.MemoryDraft(content=bomb, tags=[tag], metadata_json=f'{{"k":"{tag}"}}')
            )
        ).memory
        assert stored.content == bomb and list(stored.tags) == [tag]
        size, tags, metadata = stored_bytes(guardian, stored.id)
        assert size == 65_535 and tags == f'["{tag}"]' and metadata == f'{{"k":"{tag}"}}'
        for draft, where in (
            (pb.MemoryDraft(content=bomb + "\ufdfa"), "memory.content: 65538 bytes is over the limit of 65536 bytes"),
            (pb.MemoryDraft(content="x", tags=[tag + "\ufdfa"]), "memory.tags[0]: 66 bytes is over the limit of 64"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Store(pb.StoreRequest(session_id=sid, memory=draft))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == where


def test_a_redaction_replaces_the_part_sent_and_the_reply_says_so(world: tuple[Guardian, str]) -> None:
    guardian, token = world
    channel, stub, sid = session(guardian, token)
    with channel:
        sent = "\u2764\ufe0f db login \uff50\uff41ss\u200bword=Tr0ub4dor&3 for \U0001f468\u200d\U0001f469"
        stored = stub.Store(pb.StoreRequest(session_id=sid, memory=pb.MemoryDraft(content=sent))).memory
        got = stub.Get(pb.GetRequest(session_id=sid, id=stored.id)).memory
    assert got.content == "\u2764\ufe0f db login [redacted:password-assignment] for \U0001f468\u200d\U0001f469"
    assert list(stored.redacted_by) == ["password-assignment"]
    assert list(got.redacted_by) == []  # a read does not repeat what the write's reply said


def test_a_marker_longer_than_the_match_cannot_push_the_stored_form_over_its_limit(
    world: tuple[Guardian, str],
) -> None:
    guardian, token = world
    channel, stub, sid = session(guardian, token)
    # 65,536 bytes exactly: the redaction marker is longer than the password it replaces.
    content = "password=hunter22 " + "x" * (65_536 - 18)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.Store(pb.StoreRequest(session_id=sid, memory=pb.MemoryDraft(content=content)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith("content (as stored, once redacted): 65549 bytes is over the limit")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=300),
    tag=st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=16),
)
def test_any_valid_text_within_limits_comes_back_identical(world: tuple[Guardian, str], content: str, tag: str) -> None:
    guardian, token = world
    channel, stub, sid = session(guardian, token)
    with channel:
        request = pb.StoreRequest(session_id=sid, memory=pb.MemoryDraft(content=content, tags=[tag]))
        blank = not ScanForm.of(content).text.strip() or not ScanForm.of(tag).text.strip()
        try:
            stored = stub.Store(request).memory
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and blank, error.details()
            return
        assert not blank
        got = stub.Get(pb.GetRequest(session_id=sid, id=stored.id)).memory
    if stored.redacted_by or stored.status != "active":  # a random text that looks like a secret or a script
        return
    assert got.content == content and list(got.tags) == [tag]


def test_a_replayed_update_does_not_outlive_the_read_window() -> None:
    with running_guardian(**POLICY) as guardian:
        token = guardian.add_agent("windowed")
        channel, stub, sid = session(guardian, token)
        with channel:
            stored = stub.Store(
                pb.StoreRequest(session_id=sid, memory=pb.MemoryDraft(content="the window hides me", tags=["a"]))
            ).memory
            update = pb.UpdateRequest(session_id=sid, id=stored.id, tags=pb.TagList(tags=["b"]), idempotency_key=KEY)
            assert stub.Update(update).memory.content == "the window hides me"
            assert stub.Update(update).memory.content == "the window hides me"  # a replay inside the window
            time.sleep(2.3)
            attempts: tuple[Callable[[], object], ...] = (
                lambda: stub.Get(pb.GetRequest(session_id=sid, id=stored.id)),
                lambda: stub.Update(update),
            )
            for attempt in attempts:
                with pytest.raises(grpc.RpcError) as caught:
                    attempt()
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert "the window hides me" not in str(caught.value.details())
            assert "no longer visible to this agent" in str(caught.value.details())
        rows = [r for r in guardian.audit_rows() if r["operation"] == "memory.update"]
        assert [r["decision"] for r in rows] == ["allow", "allow", "deny"]
        assert rows[-1]["reason"].startswith("not_found: this retry repeats a write that was done")


def test_a_replayed_store_of_a_quarantined_memory_shows_nothing(world: tuple[Guardian, str]) -> None:
    guardian, token = world
    channel, stub, sid = session(guardian, token)
    with channel:
        request = pb.StoreRequest(
            session_id=sid,
            memory=pb.MemoryDraft(content="<script>steal()</script> held"),
            idempotency_key="quarantined-key-0123456789",
        )
        assert stub.Store(request).memory.status == "quarantined"
        with pytest.raises(grpc.RpcError) as caught:
            stub.Store(request)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_through_the_stdio_gateway_content_is_exact_and_unknown_arguments_are_refused(
    world: tuple[Guardian, str],
) -> None:
    guardian, token = world
    async with Client(stdio_params(guardian, token)) as client:
        for text in HOSTILE:
            stored = (await call(client, "memory_store", content=text, metadata={"note": text}))["memory"]
            got = (await call(client, "memory_get", id=stored["id"]))["memory"]
            assert got["content"] == text and got["metadata"] == {"note": text}
        refused = await call_error(client, "memory_store", content="typo", contnet_typo="x", owner="root")
        assert "contnet_typo" in refused and "owner" in refused
        redacted = await call(client, "memory_store", content="login password=Tr0ub4dor&3")
        assert redacted["memory"]["redacted_by"] == ["password-assignment"]
        assert "redacted before it was stored (content filter: password-assignment)" in redacted["note"]
    with guardian.keyed_db() as db:
        assert db.execute("SELECT count(*) FROM memories WHERE content = 'typo'").fetchone()[0] == 0
