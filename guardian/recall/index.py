"""The in-memory vector index: one partition per namespace, searched only for the caller's namespaces.

A search scans the partitions of the namespaces the caller may read and no
others, so neither its results, nor their order, nor its time depend on what any
other namespace holds (as for the full-text index, guardian/store/search_index.py).
The score of a memory is the cosine of its vector with the query's (both unit
vectors, up to quantisation: guardian/recall/vectors.py). Only committed, active
memories are here: the store adds and removes entries once their transaction has
committed (Database.after_commit).

A partition keeps its int8 vectors in *lists*. A small one (under IVF_MIN vectors)
is one list, scanned whole: exact. A large one is an inverted file: about
sqrt(n) lists, each around a centroid (spherical k-means on a sample), and a
search scans the NPROBE lists whose centroids are nearest the query, so its cost
grows with sqrt(n), not n. Training runs in the background (guardian/daemon/recall.py),
never under the index's lock but for short steps: the partition then has a next
set of lists beside the current one, every put goes to the next, a search scans
both, and the background moves the current lists' vectors over a chunk at a
time until none is left. A partition is trained again when it has doubled.

At start the index is loaded from the stored vectors while requests are served;
until that is done (:attr:`VectorIndex.ready`) a search may miss memories, and a
commit meanwhile wins over the (older) stored vector the loader read.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from guardian.recall.vectors import Quantized

__all__ = ["IVF_MIN", "MIN_COSINE", "NPROBE", "VectorIndex"]

#: The least cosine that counts as a match by meaning: below it a memory is not found by the semantic
#: leg at all (so a query about nothing stored finds nothing). On bench/recall_eval with the shipped
#: model, 86% of the right answers to questions in other words score at least 0.10, against 19% of
#: all notes.
MIN_COSINE: Final = 0.10
#: A partition with this many vectors or more is searched as an inverted file (not scanned whole).
IVF_MIN: Final = 20_000
#: How many lists of an inverted file a search scans.
NPROBE: Final = 24
#: Rows scored per step (bounds the float32 copy a step makes).
_CHUNK: Final = 8192
#: Vectors moved to the next lists per step of training (the lock is held for one step).
_MOVE_STEP: Final = 1024
#: Vectors k-means learns the centroids from, per list, and rounds of it.
_SAMPLE_PER_LIST: Final = 32
_KMEANS_ROUNDS: Final = 8
_INITIAL_ROWS: Final = 16

Floats = npt.NDArray[np.float32]
_NONE: Final = -1


class _Slots:
    """Where each memory's vector is, by rowid: its partition, list and row there (-1: nowhere).

    numpy arrays indexed by rowid (SQLite's rowids are dense), grown as rowids grow: about
    10 bytes a rowid, where dicts would take some 300 bytes a vector at a million of them.
    """

    def __init__(self) -> None:
        self.partition = np.full(1024, _NONE, dtype=np.int16)
        self.list = np.full(1024, _NONE, dtype=np.int32)
        self.row = np.full(1024, _NONE, dtype=np.int32)

    def reserve(self, rowid: int) -> None:
        """Room for rowid."""
        if rowid >= len(self.row):
            size = max(rowid + 1, len(self.row) * 3 // 2)
            self.partition = _grown(self.partition, size)
            self.list = _grown(self.list, size)
            self.row = _grown(self.row, size)

    def where(self, rowid: int) -> tuple[int, int, int]:
        """(partition, list, row) of rowid, each -1 when it has no vector here."""
        if rowid >= len(self.row):
            return _NONE, _NONE, _NONE
        return int(self.partition[rowid]), int(self.list[rowid]), int(self.row[rowid])

    def place(self, rowid: int, partition: int, index: int, row: int) -> None:
        """Record where rowid's vector is."""
        self.partition[rowid], self.list[rowid], self.row[rowid] = partition, index, row

    def clear(self, rowid: int) -> None:
        """rowid has no vector here any more."""
        self.partition[rowid] = self.list[rowid] = self.row[rowid] = _NONE


def _grown(array: npt.NDArray[np.signedinteger[Any]], size: int) -> npt.NDArray[np.signedinteger[Any]]:
    grown = np.full(size, _NONE, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


@dataclass
class _Block:
    """One list's vectors: int8 values, scales and rowids in growing arrays (their rows kept in the slots)."""

    dims: int
    slots: _Slots
    values: npt.NDArray[np.int8] = field(init=False)
    scales: Floats = field(init=False)
    rowids: npt.NDArray[np.int64] = field(init=False)
    size: int = 0

    def __post_init__(self) -> None:
        self.values = np.zeros((_INITIAL_ROWS, self.dims), dtype=np.int8)
        self.scales = np.zeros(_INITIAL_ROWS, dtype=np.float32)
        self.rowids = np.zeros(_INITIAL_ROWS, dtype=np.int64)

    def append(self, rowid: int, vector: Quantized) -> int:
        """Add rowid's vector (none of it is here); its row."""
        values, scale = vector
        if self.size == len(self.rowids):
            self._grow()
        row = self.size
        self.values[row], self.scales[row], self.rowids[row] = values, scale, rowid
        self.size += 1
        return row

    def remove_row(self, row: int) -> None:
        """Remove the vector at row (the last one takes its place, and its slot says so)."""
        last = self.size - 1
        if row != last:
            moved = int(self.rowids[last])
            self.values[row] = self.values[last]
            self.scales[row] = self.scales[last]
            self.rowids[row] = moved
            self.slots.row[moved] = row
        self.size = last

    def scores(self, query: Floats) -> Floats:
        out = np.empty(self.size, dtype=np.float32)
        for start in range(0, self.size, _CHUNK):
            stop = min(start + _CHUNK, self.size)
            out[start:stop] = (self.values[start:stop].astype(np.float32) @ query) * self.scales[start:stop]
        return out

    def trim(self) -> None:
        """Give back the room grown ahead (after a partition's vectors all moved in)."""
        rows = max(self.size, _INITIAL_ROWS)
        self.values = self.values[:rows].copy()
        self.scales = self.scales[:rows].copy()
        self.rowids = self.rowids[:rows].copy()

    def _grow(self) -> None:
        rows = max(_INITIAL_ROWS, len(self.rowids) + len(self.rowids) // 2)
        values = np.zeros((rows, self.dims), dtype=np.int8)
        values[: self.size] = self.values[: self.size]
        self.values = values
        self.scales = np.resize(self.scales, rows)
        self.rowids = np.resize(self.rowids, rows)


@dataclass
class _Lists:
    """Vectors in lists: one list (exact), or one per centroid (an inverted file)."""

    dims: int
    slots: _Slots
    #: The partition's number in the slots.
    partition: int
    centroids: Floats | None = None
    #: Lists are numbered from 0 in the slots; the next lists of a partition being trained from ``offset``.
    offset: int = 0
    blocks: list[_Block] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        lists = 1 if self.centroids is None else len(self.centroids)
        self.blocks = [_Block(self.dims, self.slots) for _ in range(lists)]

    def __len__(self) -> int:
        return self.count

    def holds(self, index: int) -> bool:
        """Whether the list numbered index in the slots is one of these."""
        return self.offset <= index < self.offset + len(self.blocks)

    def put(self, rowid: int, vector: Quantized) -> None:
        """Add rowid's vector (none of it is here) to the list of the nearest centroid."""
        index = 0
        if self.centroids is not None:
            values, scale = vector
            index = int(np.argmax(self.centroids @ (values.astype(np.float32) * scale)))
        self._append(rowid, vector, index)

    def put_many(self, items: Sequence[tuple[int, Quantized]]) -> None:
        """put() for many vectors, their lists found in one product with the centroids."""
        if self.centroids is None or not items:
            for rowid, vector in items:
                self.put(rowid, vector)
            return
        floats = np.stack([values.astype(np.float32) * scale for _, (values, scale) in items])
        for (rowid, vector), index in zip(items, np.argmax(floats @ self.centroids.T, axis=1), strict=True):
            self._append(rowid, vector, int(index))

    def remove(self, rowid: int, index: int, row: int) -> None:
        """Remove rowid, at row of the list numbered index (as the slots say)."""
        self.blocks[index - self.offset].remove_row(row)
        self.slots.clear(rowid)
        self.count -= 1

    def search(self, query: Floats, k: int) -> list[tuple[float, int]]:
        if self.centroids is None:
            chosen = self.blocks
        else:
            near = self.centroids @ query
            probe = min(NPROBE, len(near))
            chosen = [self.blocks[i] for i in np.argpartition(-near, probe - 1)[:probe]]
        found: list[tuple[float, int]] = []
        for block in chosen:
            if block.size == 0:
                continue
            scores = block.scores(query)
            take = min(k, block.size)
            top = np.argpartition(-scores, take - 1)[:take] if take < block.size else np.arange(take)
            found.extend((float(scores[i]), int(block.rowids[i])) for i in top if scores[i] >= MIN_COSINE)
        return found

    def take_some(self, count: int) -> list[tuple[int, Quantized]]:
        """Remove and return up to count vectors (from the fullest lists' ends)."""
        taken: list[tuple[int, Quantized]] = []
        while len(taken) < count and self.count:
            position = max(range(len(self.blocks)), key=lambda i: self.blocks[i].size)
            block = self.blocks[position]
            while block.size and len(taken) < count:
                row = block.size - 1
                rowid = int(block.rowids[row])
                taken.append((rowid, (block.values[row].copy(), float(block.scales[row]))))
                self.remove(rowid, self.offset + position, row)
        return taken

    def sample(self, count: int, rng: np.random.Generator) -> Floats:
        """Up to count of its vectors as float32, drawn at random."""
        sizes = np.array([block.size for block in self.blocks])
        picks = rng.choice(int(sizes.sum()), size=min(count, int(sizes.sum())), replace=False)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        rows = []
        for block, start, size in zip(self.blocks, starts, sizes, strict=True):
            positions = picks[(picks >= start) & (picks < start + size)] - start
            if len(positions):
                rows.append(block.values[positions].astype(np.float32) * block.scales[positions, None])
        return np.concatenate(rows) if rows else np.zeros((0, self.dims), dtype=np.float32)

    def _append(self, rowid: int, vector: Quantized, index: int) -> None:
        self.slots.reserve(rowid)
        row = self.blocks[index].append(rowid, vector)
        self.slots.place(rowid, self.partition, self.offset + index, row)
        self.count += 1


@dataclass
class _Partition:
    """One namespace's vectors: its current lists, and while training, the next ones."""

    dims: int
    slots: _Slots
    #: Its number in the slots.
    number: int
    current: _Lists = field(init=False)
    next: _Lists | None = None
    #: How many vectors the current centroids were learnt from (0: exact).
    trained_at: int = 0

    def __post_init__(self) -> None:
        self.current = _Lists(self.dims, self.slots, self.number)

    def __len__(self) -> int:
        return len(self.current) + (len(self.next) if self.next is not None else 0)

    def put(self, rowid: int, vector: Quantized) -> None:
        (self.next if self.next is not None else self.current).put(rowid, vector)

    def remove(self, rowid: int, index: int, row: int) -> None:
        """Remove rowid, at row of the list numbered index (the next lists' numbers follow the current's)."""
        holder = self.next if self.next is not None and self.next.holds(index) else self.current
        holder.remove(rowid, index, row)

    def search(self, query: Floats, k: int) -> list[tuple[float, int]]:
        found = self.current.search(query, k)
        if self.next is not None:
            found += self.next.search(query, k)
        return found

    def begin_training(self, centroids: Floats, trained_at: int) -> None:
        """Start moving to lists around centroids (numbered after the current ones in the slots)."""
        offset = self.current.offset + len(self.current.blocks)  # numbers no current list has
        self.next = _Lists(self.dims, self.slots, self.number, centroids, offset)
        self.trained_at = trained_at

    def move_step(self, count: int) -> None:
        """Move up to count vectors from the current lists to the next; the next become current when all are."""
        if self.next is None:
            return
        self.next.put_many(self.current.take_some(count))
        if not self.current:
            self.current, self.next = self.next, None
            for block in self.current.blocks:
                block.trim()

    def needs_training(self) -> bool:
        size = len(self)
        return self.next is None and size >= IVF_MIN and size >= 2 * max(self.trained_at, IVF_MIN // 2)


class VectorIndex:
    """Vectors of active memories by namespace, for the semantic leg of a search."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self._slots = _Slots()
        self._partitions: dict[str, _Partition] = {}
        #: Partitions by their number in the slots.
        self._numbered: list[_Partition] = []
        self._count = 0
        self._lock = threading.Lock()
        #: While loading at start: the memories commits changed meanwhile (their stored vector,
        #: as the loader read it, may be older than what was put or removed here).
        self._touched: set[int] | None = set()
        self._rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return self._count

    @property
    def training(self) -> bool:
        """Whether a partition is due for training or being moved to new lists."""
        with self._lock:
            return any(p.next is not None or p.needs_training() for p in self._numbered)

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
                self._remove(rowid)

    def search(self, namespaces: Sequence[str], query: Floats, k: int) -> list[tuple[int, float]]:
        """The k memories of namespaces whose vectors are nearest query: (rowid, cosine), best first."""
        if not query.any():
            return []
        best: list[tuple[float, int]] = []
        with self._lock:
            for namespace in namespaces:
                partition = self._partitions.get(namespace)
                if partition is not None:
                    best.extend(partition.search(query, k))
        return [(rowid, score) for score, rowid in heapq.nlargest(k, best)]

    def train_step(self) -> bool:
        """One short step of training whichever partition needs it; whether there was anything to do.

        Learning the centroids runs outside the lock (on a copy of a sample); moving the
        vectors to the new lists takes the lock for _MOVE_STEP vectors at a time.
        """
        with self._lock:
            moving = next((p for p in self._numbered if p.next is not None), None)
            if moving is not None:
                moving.move_step(_MOVE_STEP)
                return True
            due = next((p for p in self._numbered if p.needs_training()), None)
            if due is None:
                return False
            size = len(due)
            lists = max(64, int(np.sqrt(size)))
            sample = due.current.sample(lists * _SAMPLE_PER_LIST, self._rng)
        centroids = _kmeans(sample, lists, self._rng)
        with self._lock:
            if due.next is None and len(due):
                due.begin_training(centroids, size)
        return True

    def _put(self, namespace: str, rowid: int, vector: Quantized) -> None:
        self._remove(rowid)
        partition = self._partitions.get(namespace)
        if partition is None:
            partition = _Partition(self.dims, self._slots, len(self._numbered))
            self._partitions[namespace] = partition
            self._numbered.append(partition)
        partition.put(rowid, vector)
        self._count += 1

    def _remove(self, rowid: int) -> None:
        number, index, row = self._slots.where(rowid)
        if number != _NONE:
            self._numbered[number].remove(rowid, index, row)
            self._count -= 1


def _kmeans(sample: Floats, lists: int, rng: np.random.Generator) -> Floats:
    """Spherical k-means: lists unit centroids of the sample's directions."""
    norms = np.linalg.norm(sample, axis=1, keepdims=True)
    points: Floats = sample / np.maximum(norms, np.float32(1e-12))
    centroids: Floats = points[rng.choice(len(points), size=min(lists, len(points)), replace=False)].copy()
    for _ in range(_KMEANS_ROUNDS):
        nearest = np.argmax(points @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, points)
        counts = np.bincount(nearest, minlength=len(centroids))
        empty = counts == 0
        sums[empty] = points[rng.choice(len(points), size=int(empty.sum()))]
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), np.float32(1e-12))
    return centroids.astype(np.float32)
