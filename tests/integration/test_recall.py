"""Recall by meaning on a real guardian: hybrid search, its legs, its limits, and the vectors' life.

The memories and questions here share no content word, so only the semantic leg can find them;
every assertion about which memory is found is one the shipped model (pinned by sha256) makes
deterministically.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from mcp import Client

from guardian.keys.rotated import load_all_keys
from guardian.recall.model import builtin_files
from guardian.store.backup import verify_file
from shared.rpc.guardian.v1 import admin_pb2
from tests.support.harness import LOG_ONLY_ANOMALIES, UNLIMITED_PROFILE, Guardian, agent_pb2, running_guardian
from tests.support.mcp_harness import call, call_error, stdio_params

pytestmark = pytest.mark.anyio

pb = agent_pb2
POLICY: dict[str, Any] = {
    "anomaly": LOG_ONLY_ANOMALIES,
    "sessions": {"max_per_agent": 1000},
    "profiles": {"default": UNLIMITED_PROFILE},
}

NOTES = {
    "allergy": "Priya is allergic to peanuts; birthday party snacks must be nut free.",
    "flight": "Booked the Lisbon trip: departure Thursday 7:40 from terminal 2, aisle seat.",
    "deploy": "The billing service goes out with blue-green releases behind the load balancer.",
    "dentist": "Dentist appointment moved to the 14th at half past three.",
}
#: A question in other words for each note (no content word in common).
QUESTIONS = {
    "allergy": "what can my daughter not eat at celebrations",
    "flight": "when does my plane leave for portugal",
    "deploy": "how do we roll out new versions of the payment system",
    "dentist": "dental checkup time",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Guardian, str, dict[str, str]]]:
    with running_guardian(**POLICY) as guardian:
        token = guardian.add_agent("alice")
        channel, stub, sid = session(guardian, token)
        with channel:
            ids = {name: store(stub, sid, text) for name, text in NOTES.items()}
        yield guardian, token, ids


def session(guardian: Guardian, token: str) -> tuple[grpc.Channel, Any, str]:
    channel, stub = guardian.agent_stub()
    return channel, stub, stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id


def store(stub: Any, sid: str, content: str, namespace: str = "") -> str:
    draft = pb.MemoryDraft(content=content, namespace=namespace)
    memory_id: str = stub.Store(pb.StoreRequest(session_id=sid, memory=draft)).memory.id
    return memory_id


def search(stub: Any, sid: str, query: str, mode: Any = pb.SEARCH_MODE_HYBRID, limit: int = 3) -> Any:
    return stub.Search(pb.SearchRequest(session_id=sid, query=query, limit=limit, mode=mode))


def test_a_question_in_other_words_finds_its_memory_by_meaning_alone(
    world: tuple[Guardian, str, dict[str, str]],
) -> None:
    guardian, token, ids = world
    channel, stub, sid = session(guardian, token)
    with channel:
        for name, question in QUESTIONS.items():
            lexical = search(stub, sid, question, pb.SEARCH_MODE_LEXICAL)
            assert ids[name] not in [hit.memory.id for hit in lexical.hits], "no word in common: words miss it"
            hybrid = search(stub, sid, question)
            top = hybrid.hits[0]
            assert top.memory.id == ids[name], (name, [h.memory.content for h in hybrid.hits])
            assert top.semantic_rank == 1 and top.lexical_rank == 0 and top.score > 0
            semantic = search(stub, sid, question, pb.SEARCH_MODE_SEMANTIC)
            assert semantic.hits[0].memory.id == ids[name] and 0 < semantic.hits[0].score <= 1.0
            assert all(hit.lexical_rank == 0 for hit in semantic.hits)
            assert not hybrid.semantic_pending


def test_an_exact_lookup_ranks_first_in_hybrid_as_by_words(world: tuple[Guardian, str, dict[str, str]]) -> None:
    guardian, token, _ = world
    channel, stub, sid = session(guardian, token)
    with channel:
        code = store(stub, sid, "The nightly export failed with ERR_CONN_RESET from /var/lib/exporter/queue.db.")
        for query in ("ERR_CONN_RESET", "/var/lib/exporter/queue.db"):
            for mode in (pb.SEARCH_MODE_HYBRID, pb.SEARCH_MODE_LEXICAL):
                hits = search(stub, sid, query, mode).hits
                assert hits[0].memory.id == code and hits[0].lexical_rank == 1
        stub.Delete(pb.DeleteRequest(session_id=sid, id=code))


def test_bad_searches_are_refused_clearly_and_audited(world: tuple[Guardian, str, dict[str, str]]) -> None:
    guardian, token, _ = world
    channel, stub, sid = session(guardian, token)
    with channel:
        cases = [
            (pb.SearchRequest(session_id=sid, query="   "), "query: must not be empty"),
            (pb.SearchRequest(session_id=sid, query="?! -- ..."), "query: needs at least one word"),
            (pb.SearchRequest(session_id=sid, query="x" * 5000), "query: 5000 bytes is over the limit"),
            (pb.SearchRequest(session_id=sid, query="peanuts", mode=7), "mode: expected hybrid, lexical or semantic"),  # type: ignore[arg-type]
        ]
        for request, message in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Search(request)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (refused.value.details() or "")
    denials = [
        row for row in guardian.audit_rows() if row["operation"] == "memory.search" and row["decision"] == "deny"
    ]
    reasons = [row["reason"] for row in denials[-4:]]
    assert all(reason.startswith(f"invalid_argument: {m}") for reason, (_, m) in zip(reasons, cases, strict=True)), (
        reasons
    )


def test_no_agent_finds_another_agents_memory_by_meaning(world: tuple[Guardian, str, dict[str, str]]) -> None:
    guardian, alice_token, ids = world
    bob = guardian.add_agent("bob")
    channel, stub, sid = session(guardian, bob)
    with channel:
        assert not search(stub, sid, QUESTIONS["allergy"], pb.SEARCH_MODE_SEMANTIC, limit=50).hits
        own = store(stub, sid, "Bob's son cannot eat shellfish or walnuts.")
        before = search(stub, sid, QUESTIONS["allergy"], limit=50)
        assert [hit.memory.id for hit in before.hits] == [own]
    channel, stub, sid = session(guardian, alice_token)
    with channel:  # alice writes what is nearest to bob's question: bob's answer must not change at all
        twin = store(stub, sid, "Bob's son cannot eat shellfish or walnuts, nor anything with nuts.")
    channel, stub, sid = session(guardian, bob)
    with channel:
        after = search(stub, sid, QUESTIONS["allergy"], limit=50)
        assert [(h.memory.id, h.score, h.semantic_rank) for h in after.hits] == [
            (h.memory.id, h.score, h.semantic_rank) for h in before.hits
        ]
    channel, stub, sid = session(guardian, alice_token)
    with channel:
        found = [hit.memory.id for hit in search(stub, sid, QUESTIONS["allergy"], limit=50).hits]
        assert own not in found and ids["allergy"] in found and twin in found
        stub.Delete(pb.DeleteRequest(session_id=sid, id=twin))


def test_a_memory_leaves_recall_when_deleted_held_or_changed_and_comes_back_when_released(
    world: tuple[Guardian, str, dict[str, str]],
) -> None:
    guardian, token, _ = world
    channel, stub, sid = session(guardian, token)
    question = "what instrument does my neighbour practise at night"
    with channel:
        memory = store(stub, sid, "The man next door plays the cello loudly after midnight.")
        assert search(stub, sid, question, pb.SEARCH_MODE_SEMANTIC).hits[0].memory.id == memory

        changed = "Grocery list: oat milk, lemons and rice."
        stub.Update(pb.UpdateRequest(session_id=sid, id=memory, content=changed))
        assert memory not in [h.memory.id for h in search(stub, sid, question, pb.SEARCH_MODE_SEMANTIC).hits]
        assert search(stub, sid, "what food do I need to buy", pb.SEARCH_MODE_SEMANTIC).hits[0].memory.id == memory

        stub.Delete(pb.DeleteRequest(session_id=sid, id=memory))
        assert memory not in [h.memory.id for h in search(stub, sid, "what food do I need to buy", limit=50).hits]

        held = store(stub, sid, "<script>x</script> the cellist next door practises his instrument at midnight")
    assert guardian.admin("ShowQuarantined", admin_pb2.QuarantineRequest(id=held)).memory.id == held
    channel, stub, sid = session(guardian, token)
    with channel:
        assert held not in [h.memory.id for h in search(stub, sid, question, limit=50).hits]
        guardian.admin("ReleaseQuarantined", admin_pb2.QuarantineRequest(id=held))
        # Found by words at once; by meaning once the recall thread has embedded it (no model runs in the writer).
        assert held in [h.memory.id for h in search(stub, sid, "cellist practises", pb.SEARCH_MODE_LEXICAL).hits]
        deadline = time.monotonic() + 10
        while held not in [h.memory.id for h in search(stub, sid, question, pb.SEARCH_MODE_SEMANTIC, limit=3).hits]:
            assert time.monotonic() < deadline, "a released memory was not embedded within 10 s"
            time.sleep(0.05)


async def test_memory_search_through_the_mcp_gateway_says_how_each_hit_was_found(
    world: tuple[Guardian, str, dict[str, str]],
) -> None:
    guardian, token, ids = world
    async with Client(stdio_params(guardian, token)) as client:
        found = await call(client, "memory_search", query=QUESTIONS["flight"])
        top = found["hits"][0]
        assert top["memory"]["id"] == ids["flight"] and top["found_by"] == ["meaning"]
        assert found.get("note") is None
        by_words = await call(client, "memory_search", query="Lisbon terminal", mode="lexical")
        assert by_words["hits"][0]["found_by"] == ["words"]
        both = await call(client, "memory_search", query="Lisbon trip departure")
        assert both["hits"][0]["memory"]["id"] == ids["flight"] and both["hits"][0]["found_by"] == ["words", "meaning"]
        refused = await call_error(client, "memory_search", query="Lisbon", mode="fuzzy")
        assert "mode" in refused and "hybrid" in refused


def test_vectors_live_in_the_encrypted_database_and_survive_a_restart(
    world: tuple[Guardian, str, dict[str, str]],
) -> None:
    guardian, token, ids = world
    with guardian.keyed_db() as db:
        rows = db.execute(
            "SELECT m.id, length(v.vector), v.model FROM memory_vectors AS v JOIN memories AS m ON m.rowid = v.rowid"
        ).fetchall()
    by_id = {memory_id: (size, model) for memory_id, size, model in rows}
    assert set(ids.values()) <= set(by_id)
    assert {size for size, _ in by_id.values()} == {4 + 256}
    assert guardian.stop() == 0
    guardian.start()
    status = guardian.admin("Status", admin_pb2.StatusRequest())
    channel, stub, sid = session(guardian, token)
    with channel:
        assert search(stub, sid, QUESTIONS["dentist"], pb.SEARCH_MODE_SEMANTIC).hits[0].memory.id == ids["dentist"]
    status = guardian.admin("Status", admin_pb2.StatusRequest())
    assert status.recall_index_ready and status.vectors_indexed >= len(ids) and status.memories_to_embed == 0
    assert not status.recall_index_training
    assert status.embedding_model.startswith("static-256-")
    shown = json.loads(guardian.ctl("--json", "status").stdout)
    assert shown["recall"]["index_ready"] is True and shown["recall"]["memories_to_embed"] == 0
    backup = guardian.admin("CreateBackup", admin_pb2.CreateBackupRequest())
    assert (
        backup.check.ok and backup.check.vectors_checked == status.vectors_indexed and not backup.check.vectors_failed
    )


def test_memories_without_vectors_are_embedded_in_the_background_and_tampered_ones_again() -> None:
    with running_guardian(**POLICY) as guardian:
        token = guardian.add_agent("carol")
        channel, stub, sid = session(guardian, token)
        with channel:
            ids = {name: store(stub, sid, text) for name, text in NOTES.items()}
        assert guardian.stop() == 0
        with guardian.keyed_db() as db:  # as after an upgrade from a guardian without vectors, and a tampering
            db.execute("DELETE FROM memory_vectors WHERE rowid IN (SELECT rowid FROM memories WHERE id IN (?, ?))",
                       (ids["allergy"], ids["flight"]))  # fmt: skip
            db.execute(
                "UPDATE memory_vectors SET vector = zeroblob(260)"
                " WHERE rowid = (SELECT rowid FROM memories WHERE id = ?)",
                (ids["deploy"],),
            )
        check = verify_file(guardian.database, load_all_keys(guardian.state_dir / "keys", guardian.state_dir))
        assert (check.vectors_checked, check.vectors_failed, check.ok) == (2, (ids["deploy"],), False)
        assert check.problem == f"1 vectors fail their HMAC (first of memory {ids['deploy']})"
        guardian.start()
        for _ in range(200):
            status = guardian.admin("Status", admin_pb2.StatusRequest())
            if status.recall_index_ready and status.memories_to_embed == 0:
                break
            time.sleep(0.05)
        assert status.memories_to_embed == 0 and status.vectors_indexed == len(ids)
        channel, stub, sid = session(guardian, token)
        with channel:
            for name in ("allergy", "flight", "deploy"):
                assert search(stub, sid, QUESTIONS[name], pb.SEARCH_MODE_SEMANTIC).hits[0].memory.id == ids[name]
        log = guardian.log_path.read_text()
        assert '"event": "vector_integrity_failure"' in log and '"count": 1' in log
        assert '"event": "embedding_done"' in log


def test_a_model_file_that_is_not_the_pinned_one_stops_the_guardian_with_the_reason(tmp_path: Path) -> None:
    with running_guardian(**POLICY) as guardian:
        assert guardian.stop() == 0
        shipped = builtin_files()
        weights = tmp_path / "weights.safetensors"
        shutil.copy(shipped.weights, weights)
        guardian.set_config(
            embedding={
                "model": "static",
                "weights": str(weights),
                "weights_sha256": "0" * 64,
                "tokenizer": str(shipped.tokenizer),
                "tokenizer_sha256": shipped.tokenizer_sha256,
            }
        )
        with pytest.raises(RuntimeError, match="exited 2") as failed:
            guardian.start()
        assert f"the weights file {weights} has sha256 {shipped.weights_sha256}, not the {'0' * 64}" in str(
            failed.value
        )
        guardian.process = None
