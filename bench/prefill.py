"""Filling a guardian to N memories before the measurements.

Two ways, both leaving real memories (signed, FTS-indexed rows of the agent's
namespace) that every read verifies:

- ``grpc``: StoreBatch calls on the agent socket, the full pipeline (filters,
  HMAC, audit row per batch), a few batches in flight. The bench policy lifts
  max_batch and the rate limits so this is quick.
- ``direct``: with the guardian stopped, the guardian's own modules write the
  rows: ``guardian.store.database.Database`` (its PRAGMAs and migrations),
  ``guardian.store.memories.MemoryStore.insert`` (the same INSERT, the same ids,
  sha256 and HMAC with the memory key; the FTS triggers index them). The
  content filters are not run (the corpus holds only lowercase pseudo-words,
  which no shipped rule matches) and no audit row is written, since these
  memories are set-up, not requests. Used for a million memories, where
  StoreBatch would take many minutes. With agent-embedder configured (the
  shipped default), the vectors written are seeded random unit vectors under
  the transformer's id: the corpus is pseudo-words, whose embeddings mean no
  more than random ones, and embedding a million texts would take about 25
  minutes of CPU; what the index costs in time and memory depends on the
  count and the dimensions, which are the model's. Recall quality is
  measured on real text through the real embedder (bench/recall_eval).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Final

import grpc.aio
import numpy as np

from bench.corpus import Corpus, MemoryText
from bench.noop_grpc import CHANNEL_OPTIONS
from bench.procs import BenchGuardian
from guardian.keys.rotated import load_all_keys
from guardian.policy.compile import compile_policy
from guardian.policy.default import render_default_policy
from guardian.recall.model import Embedder, EmbeddingModel, Vector, builtin_files
from guardian.store.database import Database
from guardian.store.integrity import canonical_json
from guardian.store.memories import Draft, MemoryStore, Scope
from guardian.store.vectors import MemoryVectors
from shared.embedding import TRANSFORMER_DIMS, TRANSFORMER_ID
from shared.rpc.guardian.v1 import agent_pb2 as pb
from shared.rpc.guardian.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["PrefillReport", "prefill_direct", "prefill_grpc"]

_GRPC_BATCH: Final = 500
_GRPC_IN_FLIGHT: Final = 2
_DIRECT_CHUNK: Final = 5000
#: At most this many ids are kept for get to pick from (every k-th one beyond it).
_MAX_IDS: Final = 100_000


@dataclass(frozen=True)
class PrefillReport:
    """How the guardian was filled."""

    method: str
    memories: int
    seconds: float
    #: StoreBatch calls made (each has its audit row); 0 for a direct prefill.
    batches: int = 0

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready mapping."""
        rate = self.memories / self.seconds if self.seconds > 0 else 0.0
        return {
            "method": self.method,
            "memories": self.memories,
            "seconds": round(self.seconds, 2),
            "memories_per_s": round(rate, 1),
            "store_batch_calls": self.batches,
        }


def _keep(corpus: Corpus, ids: list[str], total: int) -> None:
    stride = max(1, total // _MAX_IDS)
    corpus.ids.extend(ids[::stride])


def _draft(text: MemoryText) -> pb.MemoryDraft:
    return pb.MemoryDraft(content=text.content, tags=text.tags, metadata_json=json.dumps(text.metadata))


async def prefill_grpc(guardian: BenchGuardian, token: str, count: int, corpus: Corpus) -> PrefillReport:
    """Store count memories with StoreBatch, a few batches in flight."""
    started = time.perf_counter()
    batches = [min(_GRPC_BATCH, count - start) for start in range(0, count, _GRPC_BATCH)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for size in batches:
        queue.put_nowait(size)
    ids: list[str] = []

    async def worker() -> None:
        async with grpc.aio.insecure_channel(f"unix:{guardian.agent_socket}", options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            session = (await stub.OpenSession(pb.OpenSessionRequest(agent_token=token), timeout=60)).session_id
            while not queue.empty():
                size = queue.get_nowait()
                drafts = [_draft(corpus.memory(len(ids) + offset)) for offset in range(size)]
                reply = await stub.StoreBatch(pb.StoreBatchRequest(session_id=session, memories=drafts), timeout=120)
                ids.extend(memory.id for memory in reply.memories)
            await stub.CloseSession(pb.CloseSessionRequest(session_id=session), timeout=10)

    await asyncio.gather(*(worker() for _ in range(_GRPC_IN_FLIGHT)))
    if len(ids) != count:
        raise RuntimeError(f"the prefill stored {len(ids)} memories, not {count}")
    _keep(corpus, ids, count)
    return PrefillReport("grpc StoreBatch", count, time.perf_counter() - started, len(batches))


class _SeededVectors:
    """The transformer's id and dimensions, random unit vectors (seeded): a direct prefill's stand-in for it."""

    id = TRANSFORMER_ID
    dims = TRANSFORMER_DIMS

    def __init__(self) -> None:
        self._random = np.random.default_rng(15)

    def embed(self, text: str) -> Vector:
        return self.embed_many([text])[0]

    def embed_many(self, texts: list[str]) -> list[Vector]:
        vectors = self._random.standard_normal((len(texts), self.dims)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return list(vectors)

    def close(self) -> None:
        return None


def prefill_direct(guardian: BenchGuardian, agent: str, count: int, corpus: Corpus) -> PrefillReport:
    """Write count signed memories and their vectors with the guardian's own modules (the guardian must be stopped)."""
    if guardian.spawned is not None:
        raise RuntimeError("stop the guardian before a direct prefill: it must be the only writer")
    started = time.perf_counter()
    keys = load_all_keys(guardian.state_dir / "keys", guardian.state_dir)
    database = Database(guardian.database, keys.database_hexes)
    # Vectors too, as the guardian writes them (its index is filled when it starts, from these).
    model: Embedder = _SeededVectors() if guardian.embedder_socket is not None else EmbeddingModel(builtin_files())
    vectors = MemoryVectors(model, keys.memory, after_commit=lambda action: None)
    store = MemoryStore(keys.memory, vectors)
    # The shipped policy's trust rules (a direct prefill writes as the agent's default source).
    trust = compile_policy(render_default_policy()).trust_view(agent)
    scope = Scope(agent=agent, namespaces=(agent,), writable=frozenset({agent}), trust=trust)
    ids: list[str] = []
    try:
        for start in range(0, count, _DIRECT_CHUNK):
            texts = [corpus.memory(start + offset) for offset in range(min(_DIRECT_CHUNK, count - start))]
            made = model.embed_many([text.content for text in texts])  # before the write, as the pipeline does
            drafts = [
                Draft(text.content, text.tags, canonical_json(text.metadata), vector=vector)
                for text, vector in zip(texts, made, strict=True)
            ]
            with database.write() as connection:
                stored = store.insert(connection, scope, drafts, time.time_ns() // 1_000_000)
            ids.extend(memory.id for memory in stored)
    finally:
        database.close()
    _keep(corpus, ids, count)
    return PrefillReport("direct (guardian modules, guardian stopped)", count, time.perf_counter() - started)
