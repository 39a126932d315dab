"""The parts of recall by meaning, one at a time: the model, packed vectors, the index, fusion, query terms,
and the database's after-commit actions that keep the index in step with what committed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from bench.recall_eval.check_dataset import load
from guardian.keys.ring import KeyRing
from guardian.policy.compile import compile_policy
from guardian.policy.default import render_default_policy
from guardian.recall import index as index_module
from guardian.recall.fusion import fuse
from guardian.recall.index import MIN_COSINE, VectorIndex
from guardian.recall.model import EmbeddingModel, ModelFiles, builtin_files
from guardian.recall.vectors import nibble_scores, nibble_values, pack, quantize, to_nibbles, unpack
from guardian.service.agent_service import check_search
from guardian.service.call import Call
from guardian.state.core import GuardianCore
from guardian.store import search_index
from guardian.store import vectors as vectors_module
from guardian.store.database import Database
from guardian.store.memories import Draft, MemoryStore, Scope
from guardian.store.vectors import MemoryVectors
from shared.errors import ConfigError, InternalError, Unavailable
from shared.rpc.guardian.v1 import agent_pb2 as pb

KEY_HEX = "cd" * 32


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(builtin_files())


def test_the_shipped_model_gives_deterministic_unit_vectors(model: EmbeddingModel) -> None:
    vector = model.embed("the walrus hums at midnight")
    assert vector.dtype == np.float32 and vector.shape == (model.dims,) == (256,)
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert np.array_equal(vector, model.embed("the walrus hums at midnight"))
    assert not model.embed("").any()
    related = float(vector @ model.embed("a sea mammal singing late at night"))
    unrelated = float(vector @ model.embed("quarterly tax filing deadline for the invoice"))
    assert related > unrelated


def test_a_model_file_with_another_sha256_is_refused_naming_the_file(tmp_path: Path) -> None:
    shipped = builtin_files()
    copy = tmp_path / "tokenizer.json"
    shutil.copy(shipped.tokenizer, copy)
    with copy.open("ab") as file:
        file.write(b" ")
    files = ModelFiles(shipped.weights, shipped.weights_sha256, copy, shipped.tokenizer_sha256)
    with pytest.raises(ConfigError, match=f"the tokenizer file {copy} has sha256 [0-9a-f]{{64}}, not the"):
        EmbeddingModel(files)
    missing = ModelFiles(tmp_path / "absent", shipped.weights_sha256, copy, shipped.tokenizer_sha256)
    with pytest.raises(ConfigError, match="cannot read the weights file"):
        EmbeddingModel(missing)


def test_a_packed_vector_round_trips_within_quantisation(model: EmbeddingModel) -> None:
    vector = model.embed("blue-green releases behind the load balancer")
    values, scale = unpack(pack(vector), model.dims)
    assert len(pack(vector)) == 4 + model.dims
    assert float(np.abs(values.astype(np.float32) * scale - vector).max()) <= scale / 2 + 1e-7
    assert quantize(np.zeros(8, dtype=np.float32))[1] == 0.0
    with pytest.raises(ValueError, match="260 bytes, not 259"):
        unpack(b"\0" * 259, 256)


def _unit(seed: int, dims: int = 16) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    unit: np.ndarray = vector / np.linalg.norm(vector)
    return unit


def test_the_index_searches_only_the_namespaces_asked_for_and_keeps_in_step() -> None:
    index = VectorIndex(16)
    index.loaded()
    query = _unit(1)
    index.put("alice", 1, quantize(query))
    index.put("bob", 2, quantize(query))  # bob's copy of the very same vector
    for rowid in range(3, 200):  # enough to grow the partition several times
        index.put("alice", rowid, quantize(_unit(rowid)))
    found = index.search(["alice"], query, 5)
    assert found[0][0] == 1 and found[0][1] > 0.99 and all(rowid != 2 for rowid, _ in found)
    assert index.search(["bob"], query, 5)[0][0] == 2
    assert all(score >= MIN_COSINE for _, score in index.search(["alice"], query, 300))
    index.remove([1, 999])
    assert all(rowid != 1 for rowid, _ in index.search(["alice"], query, 300))
    index.put("alice", 5, quantize(query))  # replaced in place
    assert index.search(["alice"], query, 1)[0][0] == 5
    assert len(index) == 198
    assert index.search(["alice"], np.zeros(16, dtype=np.float32), 5) == []


def test_while_loading_a_commit_wins_over_the_older_stored_vector() -> None:
    index = VectorIndex(16)
    assert not index.ready
    index.put("alice", 1, quantize(_unit(1)))  # committed while the loader runs
    index.remove([2])
    # the loader's (older) copies
    index.load_many(
        [("alice", 1, quantize(_unit(7))), ("alice", 2, quantize(_unit(8))), ("alice", 3, quantize(_unit(9)))]
    )
    index.loaded()
    assert index.ready
    assert index.search(["alice"], _unit(1), 1)[0][0] == 1
    assert {rowid for rowid, _ in index.search(["alice"], _unit(9), 10)} <= {1, 3}
    assert 2 not in {rowid for rowid, _ in index.search(["alice"], _unit(8), 10)}


def test_fusion_counts_a_lexical_hit_by_how_much_of_the_query_it_holds() -> None:
    # 1: all of the query's words; 2: a third of them (one common word); 3 and 4: found by meaning.
    fused = fuse([(2, 1 / 3), (1, 1.0)], [3, 1, 4])
    assert [hit.rowid for hit in fused] == [1, 3, 4]
    assert (fused[0].lexical_rank, fused[0].semantic_rank) == (1, 2)
    assert (fused[1].lexical_rank, fused[1].semantic_rank) == (0, 1)
    assert fused[0].score > fused[1].score > fused[2].score > 0


def test_query_terms_drop_stopwords_and_keep_punctuated_tokens_as_phrases() -> None:
    assert search_index.query_terms("what can my daughter not eat") == [("daughter",), ("eat",)]
    assert search_index.query_terms("who am I") == [("who",), ("am",), ("i",)]
    assert search_index.query_terms("ERR_CONN_RESET in 24.0.4") == [("err", "conn", "reset"), ("24", "0", "4")]
    assert search_index.query_terms("?! -- ...") == []
    terms = search_index.query_terms("24.0.4 keycloak")
    assert search_index.coverage(terms, "Keycloak runs 24.0.4 here") == 1.0
    assert search_index.coverage(terms, "API 24, release 4.0 of keycloak") == 0.5


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(tmp_path / "memory.db", KEY_HEX)
    yield db
    db.close()


def test_after_commit_actions_run_only_for_what_committed(database: Database) -> None:
    ran: list[str] = []
    with database.write():
        database.after_commit(lambda: ran.append("write"))
        assert ran == []
    assert ran == ["write"]
    with pytest.raises(RuntimeError), database.write():
        database.after_commit(lambda: ran.append("rolled back"))
        raise RuntimeError("the work failed")

    def fails(_: object) -> None:
        database.after_commit(lambda: ran.append("failed job"))
        raise ValueError("this job fails alone")

    def succeeds(_: object) -> None:
        database.after_commit(lambda: ran.append("job"))

    with pytest.raises(ValueError, match="fails alone"):
        database.submit(fails)
    database.submit(succeeds)
    assert ran == ["write", "job"]
    with pytest.raises(InternalError):
        database.after_commit(lambda: None)


class _Core:
    """The slice of the guardian a search's check reads: its memories (and their vectors)."""

    def __init__(self, memories: MemoryStore) -> None:
        self.memories = memories


def test_until_the_index_is_loaded_hybrid_runs_on_words_and_semantic_is_retryable(model: EmbeddingModel) -> None:
    policy = compile_policy(render_default_policy())
    scope = Scope(agent="alice", namespaces=("alice",), writable=frozenset({"alice"}), trust=policy.trust_view("alice"))
    call = Call(method="Search", policy=policy, now_ms=0, agent="alice", profile=policy.profile_for("alice"))
    call.scope = scope
    ring = KeyRing("k1", {"k1": b"k" * 32})
    vectors = MemoryVectors(model, ring, after_commit=lambda action: None)
    core = cast(GuardianCore, _Core(MemoryStore(ring, vectors)))
    hybrid = check_search(core, call, pb.SearchRequest(query="dental checkup"))
    assert hybrid.semantic_pending and hybrid.query.mode == "lexical" and hybrid.query.vector is None
    with pytest.raises(Unavailable, match="still loading"):
        check_search(core, call, pb.SearchRequest(query="dental checkup", mode=pb.SEARCH_MODE_SEMANTIC))
    vectors.index.loaded()
    vectors.index.put("alice", 7, quantize(model.embed("Dentist appointment moved to the 14th")))
    vectors.index.put("bob", 8, quantize(model.embed("Dentist appointment moved to the 14th")))
    ready = check_search(core, call, pb.SearchRequest(query="dental checkup"))
    assert not ready.semantic_pending and ready.query.mode == "hybrid" and ready.query.vector is not None
    assert [rowid for rowid, _ in ready.query.nearest or ()] == [7]  # found before the transaction, in scope


def test_a_large_partition_becomes_an_inverted_file_step_by_step_and_stays_exact_for_what_it_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(index_module, "IVF_MIN", 400)
    monkeypatch.setattr(index_module, "_MOVE_STEP", 100)
    index = VectorIndex(16)
    index.loaded()
    vectors = {rowid: _unit(rowid) for rowid in range(1, 1001)}
    for rowid, vector in vectors.items():
        index.put("alice", rowid, quantize(vector))
    index.put("bob", 5000, quantize(vectors[7]))
    assert index.train_step()  # centroids learnt; the vectors move over in later steps
    partition = index._partitions["alice"]
    assert partition.next is not None and len(partition) == 1000
    index.train_step()  # one move step: some moved, some not
    assert 0 < len(partition.next) < 1000
    index.remove([3])  # a change in the middle of the move
    index.put("alice", 1001, quantize(vectors[7]))
    for query in (7, 500, 999):  # found wherever they are while moving
        assert index.search(["alice"], vectors[query], 1)[0][0] in {query, 1001}
    while index.train_step():
        pass
    assert partition.next is None and partition.current.centroids is not None
    assert len(partition.current.blocks) >= 64 and len(partition) == 1000
    assert 3 not in {rowid for rowid, _ in index.search(["alice"], vectors[3], 50)}
    hits = [index.search(["alice"], vectors[rowid], 1)[0][0] for rowid in range(10, 1000, 37)]
    assert sum(hit == rowid for hit, rowid in zip(hits, range(10, 1000, 37), strict=True)) >= 0.8 * len(hits)
    assert 5000 not in {rowid for rowid, _ in index.search(["alice"], vectors[7], 50)}  # bob's, never alice's
    assert not index.train_step()  # nothing left to do until it doubles
    for rowid in range(2001, 3001):
        vectors[rowid] = _unit(rowid)
        index.put("alice", rowid, quantize(vectors[rowid]))
    assert index.train_step() and partition.next is not None  # doubled: trained again
    index.train_step()
    index.remove([2500, 20])  # one in the next lists by now or not: either way it goes
    while index.train_step():
        pass
    assert partition.next is None and len(partition) == len(index) - 1 == 1998
    found = {rowid for rowid, _ in index.search(["alice"], vectors[2500], 100)}
    assert 2500 not in found and 20 not in found
    hits = [index.search(["alice"], vectors[rowid], 1)[0][0] for rowid in range(2003, 3000, 41)]
    assert sum(hit == rowid for hit, rowid in zip(hits, range(2003, 3000, 41), strict=True)) >= 0.8 * len(hits)


def test_the_tokenizer_without_its_word_cache_gives_the_same_tokens(model: EmbeddingModel) -> None:
    from tokenizers import Tokenizer

    as_shipped = Tokenizer.from_file(str(builtin_files().tokenizer))
    texts = [row["content"] for row in load("notes.jsonl")]
    assert all(
        as_shipped.encode(text, add_special_tokens=False).ids
        == model._tokenizer.encode(text, add_special_tokens=False).ids
        for text in texts
    )


def test_the_index_keeps_vectors_in_four_bits_that_score_as_the_stored_ones() -> None:
    stored = [quantize(_unit(seed, 384)) for seed in range(200)]
    for values, scale in stored[:20]:
        packed, step = to_nibbles((values, scale))
        assert packed.shape == (192,) and packed.dtype == np.int8
        rebuilt = nibble_values(packed[None, :])[0] * step
        original = values.astype(np.float32) * scale
        assert float(rebuilt @ original) / float(np.linalg.norm(rebuilt) * np.linalg.norm(original)) > 0.98
    query = _unit(7, 384)
    packed = np.stack([to_nibbles(vector)[0] for vector in stored])
    steps = np.array([to_nibbles(vector)[1] for vector in stored], dtype=np.float32)
    exact = np.array([values.astype(np.float32) @ query * scale for values, scale in stored])
    assert np.abs(nibble_scores(packed, steps, query) - exact).max() < 0.05
    assert int(np.argmax(nibble_scores(packed, steps, query))) == 7
    assert to_nibbles((np.zeros(8, dtype=np.int8), 0.0))[1] == 0.0


def test_a_list_grows_and_shrinks_by_chunks_and_finds_every_vector_it_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_CHUNK_ROWS", 8)
    index = VectorIndex(16)
    index.loaded()
    vectors = {rowid: _unit(rowid) for rowid in range(1, 101)}
    for rowid, vector in vectors.items():
        index.put("alice", rowid, quantize(vector))
    block = index._partitions["alice"].current.blocks[0]
    assert len(block.packed) == 13 and block.size == 100  # 8-row chunks, the last one partly used
    removed = set(range(1, 101, 3))
    index.remove(removed)
    assert block.size == 66 and len(block.packed) == 9  # chunks left empty are let go
    for rowid, vector in vectors.items():
        found = index.search(["alice"], vector, 1)
        assert (found[0][0] != rowid) if rowid in removed else (found[0][0] == rowid), rowid


def test_a_list_is_scored_a_few_rows_at_a_time_as_in_one_product(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_CHUNK_ROWS", 64)
    monkeypatch.setattr(index_module, "_SCORE_BYTES", 5 * 8 * 4)  # 16 dims: 5 rows a slice, chunks of 64
    index = VectorIndex(16)
    for rowid in range(1, 151):
        index.put("alice", rowid, quantize(_unit(rowid)))
    block = index._partitions["alice"].current.blocks[0]
    assert len(block.packed) == 3 and block.size == 150
    query = _unit(1000)
    packed = np.concatenate(block.packed)[: block.size]
    steps = np.concatenate(block.steps)[: block.size]
    # The same products summed in another order: float32 rounding apart (a cosine off by under 1e-6).
    np.testing.assert_allclose(block.scores(query), nibble_scores(packed, steps, query), rtol=1e-5, atol=1e-6)


def test_once_loaded_a_list_keeps_no_room_ahead_and_still_grows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_module, "_CHUNK_ROWS", 64)
    index = VectorIndex(16)
    vectors = {rowid: _unit(rowid) for rowid in range(1, 121)}
    for rowid in range(1, 101):  # as the load at start puts them
        index.put("alice", rowid, quantize(vectors[rowid]))
    block = index._partitions["alice"].current.blocks[0]
    assert [len(chunk) for chunk in block.packed] == [64, 48]  # the last chunk grown ahead by steps
    index.loaded()
    assert [len(chunk) for chunk in block.packed] == [64, 36] and block.size == 100
    assert [len(chunk) for chunk in block.steps] == [64, 36] and [len(chunk) for chunk in block.rowids] == [64, 36]
    for rowid in range(101, 121):
        index.put("alice", rowid, quantize(vectors[rowid]))
    assert block.size == 120 and [len(chunk) for chunk in block.packed] == [64, 64]
    for rowid, vector in vectors.items():
        assert index.search(["alice"], vector, 1)[0][0] == rowid


def test_a_large_namespace_is_loaded_straight_into_the_lists_learnt_from_a_sample(
    database: Database, model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vectors_module, "IVF_MIN", 400)
    ring = KeyRing("k1", {"k1": b"k" * 32})
    writer = MemoryStore(ring, MemoryVectors(model, ring, after_commit=lambda action: None))
    trust = compile_policy(render_default_policy()).trust_view("alice")
    scope = Scope(agent="alice", namespaces=("alice",), writable=frozenset({"alice"}), trust=trust)
    texts = [f"note {n}: the {('red', 'green', 'blue')[n % 3]} project of week {n // 7}" for n in range(600)]
    with database.write() as connection:
        connection.execute(
            "INSERT INTO agents (name, token_key_id, token_hash, created_at_ms) VALUES ('alice', 'k1', 'h', 0)"
        )
        stored = writer.insert(
            connection, scope, [Draft(text, (), "{}", vector=model.embed(text)) for text in texts], 0
        )
        connection.execute("UPDATE memory_vectors SET vector = zeroblob(260) WHERE rowid = 3")  # tampered
    loader = MemoryVectors(model, ring, after_commit=lambda action: None)
    with database.read() as reader:
        loaded, failed = loader.load(reader)
    loader.index.loaded()
    assert (loaded, failed) == (599, [3])
    partition = loader.index._partitions["alice"]
    assert partition.next is None and partition.current.centroids is not None  # no list to move out of
    assert len(partition.current.blocks) >= 64 and not loader.index.training
    rowids = {memory.id: rowid for rowid, memory in enumerate(stored, start=1)}
    hits = [loader.index.search(["alice"], model.embed(texts[n]), 3) for n in range(10, 600, 59)]
    assert (
        sum(
            rowids[stored[n].id] in {rowid for rowid, _ in hit} for n, hit in zip(range(10, 600, 59), hits, strict=True)
        )
        >= 8
    )
