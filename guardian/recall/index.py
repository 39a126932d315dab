"""The in-memory vector index: one partition per namespace, searched only for the caller's namespaces.

A search scans the partitions of the namespaces the caller may read and no
others, so neither its results, nor their order, nor its time depend on what any
other namespace holds (as for the full-text index, guardian/store/search_index.py).
Each partition keeps int8 vectors and their scales (guardian/recall/vectors.py) in
one growing matrix; a removed row is replaced by the last one. The score of a
memory is the cosine of its vector with the query's (both unit vectors, up to
quantisation). Only committed, active memories are here: the store adds and
removes entries once their transaction has committed (Database.after_commit).

At start the index is loaded from the stored vectors while requests are served;
until that is done (:attr:`VectorIndex.ready`) a search may miss memories, and a
commit meanwhile wins over the (older) stored vector the loader read.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from guardian.recall.vectors import Quantized

__all__ = ["MIN_COSINE", "VectorIndex"]

#: The least cosine that counts as a match by meaning: below it a memory is not found by the semantic
#: leg at all (so a query about nothing stored finds nothing). On bench/recall_eval with the shipped
#: model, 86% of the right answers to questions in other words score at least 0.10, against 19% of
#: all notes.
MIN_COSINE: Final = 0.10
#: Rows scored per step (bounds the float32 copy a step makes).
_CHUNK: Final = 8192
_INITIAL_ROWS: Final = 64


@dataclass
class _Partition:
    """One namespace's vectors."""

    dims: int
    values: npt.NDArray[np.int8] = field(init=False)
    scales: npt.NDArray[np.float32] = field(init=False)
    rowids: npt.NDArray[np.int64] = field(init=False)
    size: int = 0
    at: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.zeros((_INITIAL_ROWS, self.dims), dtype=np.int8)
        self.scales = np.zeros(_INITIAL_ROWS, dtype=np.float32)
        self.rowids = np.zeros(_INITIAL_ROWS, dtype=np.int64)

    def put(self, rowid: int, vector: Quantized) -> None:
        values, scale = vector
        position = self.at.get(rowid)
        if position is None:
            if self.size == len(self.rowids):
                self._grow()
            position = self.at[rowid] = self.size
            self.size += 1
        self.values[position], self.scales[position], self.rowids[position] = values, scale, rowid

    def remove(self, rowid: int) -> None:
        position = self.at.pop(rowid)
        last = self.size - 1
        if position != last:
            moved = int(self.rowids[last])
            self.values[position] = self.values[last]
            self.scales[position] = self.scales[last]
            self.rowids[position] = moved
            self.at[moved] = position
        self.size = last

    def scores(self, query: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = np.empty(self.size, dtype=np.float32)
        for start in range(0, self.size, _CHUNK):
            stop = min(start + _CHUNK, self.size)
            out[start:stop] = (self.values[start:stop].astype(np.float32) @ query) * self.scales[start:stop]
        return out

    def _grow(self) -> None:
        rows = len(self.rowids) * 2
        values = np.zeros((rows, self.dims), dtype=np.int8)
        values[: self.size] = self.values[: self.size]
        self.values = values
        self.scales = np.resize(self.scales, rows)
        self.rowids = np.resize(self.rowids, rows)


class VectorIndex:
    """Vectors of active memories by namespace, for the semantic leg of a search."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self._partitions: dict[str, _Partition] = {}
        self._namespace_of: dict[int, str] = {}
        self._lock = threading.Lock()
        #: While loading at start: the memories commits changed meanwhile (their stored vector,
        #: as the loader read it, may be older than what was put or removed here).
        self._touched: set[int] | None = set()

    def __len__(self) -> int:
        return len(self._namespace_of)

    @property
    def ready(self) -> bool:
        """Whether loading at start is done (until then a search may miss memories)."""
        return self._touched is None

    def load(self, namespace: str, rowid: int, vector: Quantized) -> None:
        """Add a stored vector while loading at start, unless a commit has changed that memory since."""
        with self._lock:
            if self._touched is None or rowid not in self._touched:
                self._put(namespace, rowid, vector)

    def loaded(self) -> None:
        """Loading at start is done."""
        with self._lock:
            self._touched = None

    def put(self, namespace: str, rowid: int, vector: Quantized) -> None:
        """Add (or replace) the vector of memory rowid in namespace."""
        with self._lock:
            if self._touched is not None:
                self._touched.add(rowid)
            self._put(namespace, rowid, vector)

    def remove(self, rowids: Iterable[int]) -> None:
        """Drop the vectors of these memories (those it holds)."""
        with self._lock:
            for rowid in rowids:
                if self._touched is not None:
                    self._touched.add(rowid)
                namespace = self._namespace_of.pop(rowid, None)
                if namespace is not None:
                    self._partitions[namespace].remove(rowid)

    def search(self, namespaces: Sequence[str], query: npt.NDArray[np.float32], k: int) -> list[tuple[int, float]]:
        """The k memories of namespaces whose vectors are nearest query: (rowid, cosine), best first."""
        if not query.any():
            return []
        best: list[tuple[float, int]] = []
        with self._lock:
            for namespace in namespaces:
                partition = self._partitions.get(namespace)
                if partition is None or partition.size == 0:
                    continue
                scores = partition.scores(query)
                take = min(k, partition.size)
                top = np.argpartition(-scores, take - 1)[:take] if take < partition.size else np.arange(take)
                best.extend((float(scores[i]), int(partition.rowids[i])) for i in top if scores[i] >= MIN_COSINE)
        return [(rowid, score) for score, rowid in heapq.nlargest(k, best)]

    def _put(self, namespace: str, rowid: int, vector: Quantized) -> None:
        current = self._namespace_of.get(rowid)
        if current is not None and current != namespace:
            self._partitions[current].remove(rowid)
        partition = self._partitions.get(namespace)
        if partition is None:
            partition = self._partitions[namespace] = _Partition(self.dims)
        partition.put(rowid, vector)
        self._namespace_of[rowid] = namespace
