"""The in-memory vector index: one partition per namespace, searched only for the caller's namespaces.

A search scans the partitions of the namespaces the caller may read and no
others, so neither its results, nor their order, nor its time depend on what any
other namespace holds (as for the full-text index, guardian/store/search_index.py).
The score of a memory is the cosine of its vector with the query's (both unit
vectors, up to quantisation: guardian/recall/vectors.py). Only committed, active
memories are here: the store adds and removes entries once their transaction has
committed (Database.after_commit).

A partition keeps its vectors, 4 bits a dimension (guardian/recall/vectors.py),
in *lists*. A small one (under IVF_MIN vectors) is one list, scanned whole:
exact. A large one is an inverted file: about sqrt(n) lists, each around a
centroid (spherical k-means on a sample), and a search scans the NPROBE lists
whose centroids are nearest the query, so its cost grows with sqrt(n), not n.
Training runs in the background (guardian/daemon/recall.py), never under the
index's lock but for short steps: the partition then has a next set of lists
beside the current one, every put goes to the next, a search scans both, and
the background moves the current lists' vectors over a chunk at a time until
none is left (the current lists let go of their chunks as they empty, so the
move never holds a partition twice). A partition is trained again when it has
doubled.

At start the index is loaded from the stored vectors while requests are served;
until that is done (:attr:`VectorIndex.ready`) a search may miss memories, and a
commit meanwhile wins over the (older) stored vector the loader read.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from guardian.recall import pages
from guardian.recall.vectors import Nibbles, Quantized, nibble_scores, nibble_values, to_nibbles

__all__ = ["IVF_MIN", "MIN_COSINE", "NPROBE", "TRAINING_SAMPLE", "VectorIndex"]

#: The least cosine that counts as a match by meaning: below it a memory is not found by the semantic
#: leg at all (so a query about nothing stored finds nothing). On bench/recall_eval with the shipped
#: model, 86% of the right answers to questions in other words score at least 0.10, against 19% of
#: all notes.
MIN_COSINE: Final = 0.10
#: A partition with this many vectors or more is searched as an inverted file (not scanned whole).
IVF_MIN: Final = 20_000
#: How many lists of an inverted file a search scans.
NPROBE: Final = 24
#: Points k-means assigns at once (bounds the points x centroids matrix).
_CHUNK: Final = 4096
#: Vectors whose lists are found in one product with the centroids (256 x 1,000 lists: 1 MiB).
_ASSIGN_ROWS: Final = 256
#: Rows a list holds in one chunk (guardian/recall/index.py _Block): 768 KiB of 384-dimension vectors.
_CHUNK_ROWS: Final = 4096
#: At most this many vectors are sampled to learn the centroids (28 MiB of float32 at 384 dimensions).
TRAINING_SAMPLE: Final = 20_000
#: Vectors moved to the next lists per step of training (the lock is held for one step).
_MOVE_STEP: Final = 1024
#: Vectors k-means learns the centroids from, per list, and rounds of it.
_SAMPLE_PER_LIST: Final = 32
_KMEANS_ROUNDS: Final = 8
_INITIAL_ROWS: Final = 16
#: A list's last chunk, and the slots, grow by 1/_GROWTH of themselves: at most an eighth more than needed.
_GROWTH: Final = 8
#: The most bytes of each float32 temporary of a search's scoring: under the heap's mmap threshold
#: (guardian/daemon/heap.py), so that a search's temporaries are reused heap, never fresh mappings.
_SCORE_BYTES: Final = 768 * 1024
#: At load, each list is sized ahead for this much of the vectors its share of the sample promises.
_RESERVE_SHARE: Final = 1.05

Floats = npt.NDArray[np.float32]
Halves = npt.NDArray[np.float16]
_Item = TypeVar("_Item", bound=np.generic)
_NONE: Final = -1


class _Slots:
    """Where each memory's vector is, by rowid: its partition, list and row there (-1: nowhere).

    numpy arrays indexed by rowid (SQLite's rowids are dense), grown as rowids grow: about
    10 bytes a rowid (and an eighth more ahead), where dicts would take some 300 bytes a vector at a million.
    """

    def __init__(self) -> None:
        self.partition = np.full(1024, _NONE, dtype=np.int16)
        self.list = np.full(1024, _NONE, dtype=np.int32)
        self.row = np.full(1024, _NONE, dtype=np.int32)

    def reserve(self, rowid: int) -> None:
        """Room for rowid."""
        if rowid >= len(self.row):
            size = max(rowid + 1, len(self.row) + len(self.row) // _GROWTH)
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
    grown: npt.NDArray[np.signedinteger[Any]] = pages.zeros((size,), array.dtype.type)
    grown.fill(_NONE)
    grown[: len(array)] = array
    return grown


@dataclass
class _Block:
    """One list's vectors (4-bit, guardian/recall/vectors.py), their steps and rowids, in chunks of rows.

    Row r is in chunk r // _CHUNK_ROWS. The last chunk grows by an eighth at a time up to
    _CHUNK_ROWS, then a new one is begun; a chunk left empty by removals is let go, and once
    the load at start is done the room grown ahead is given back (trim). So a list holds at
    most an eighth (or _INITIAL_ROWS rows) more than it needs, and never copies more than a
    chunk to grow: a million vectors in one list do not briefly take twice their room. A
    chunk of some 340 rows or more is pages of its own (guardian/recall/pages.py), so a
    grown list leaves no hole behind and room not yet written is not resident.
    """

    dims: int
    slots: _Slots
    packed: list[npt.NDArray[np.int8]] = field(default_factory=list)
    #: float16: a step's relative error (at most 2**-11) moves a score by as little, against 4-bit values.
    steps: list[Halves] = field(default_factory=list)
    #: int32, as the slots' rows: a rowid past 2**31 could not have slots (and numpy refuses to store it).
    rowids: list[npt.NDArray[np.int32]] = field(default_factory=list)
    size: int = 0

    def append(self, rowid: int, vector: Nibbles) -> int:
        """Add rowid's vector (none of it is here); its row."""
        if self.size == self._capacity():
            self._grow()
        row = self.size
        chunk, offset = divmod(row, _CHUNK_ROWS)
        self.packed[chunk][offset], self.steps[chunk][offset], self.rowids[chunk][offset] = *vector, rowid
        self.size += 1
        return row

    def remove_row(self, row: int) -> None:
        """Remove the vector at row (the last one takes its place, and its slot says so)."""
        last = self.size - 1
        if row != last:
            (to, at), (src, off) = divmod(row, _CHUNK_ROWS), divmod(last, _CHUNK_ROWS)
            moved = int(self.rowids[src][off])
            self.packed[to][at] = self.packed[src][off]
            self.steps[to][at] = self.steps[src][off]
            self.rowids[to][at] = moved
            self.slots.row[moved] = row
        self.size = last
        if len(self.packed) > 1 and self.size <= (len(self.packed) - 1) * _CHUNK_ROWS:
            for parts in (self.packed, self.steps, self.rowids):
                parts.pop()

    def rowid(self, row: int) -> int:
        """The rowid at row."""
        chunk, offset = divmod(row, _CHUNK_ROWS)
        return int(self.rowids[chunk][offset])

    def vector(self, row: int) -> Nibbles:
        """The vector at row (a copy)."""
        chunk, offset = divmod(row, _CHUNK_ROWS)
        return self.packed[chunk][offset].copy(), float(self.steps[chunk][offset])

    def floats(self, rows: npt.NDArray[np.int64]) -> Floats:
        """The vectors at rows, as float32 rows."""
        chunks, offsets = np.divmod(rows, _CHUNK_ROWS)
        out = np.empty((len(rows), self.dims), dtype=np.float32)
        for chunk in np.unique(chunks):
            at = chunks == chunk
            picked = offsets[at]
            out[at] = nibble_values(self.packed[chunk][picked]) * self.steps[chunk][picked, None]
        return out

    def scores(self, query: Floats) -> Floats:
        """Every row's score with query, in row order, a few hundred rows at a time (_SCORE_BYTES)."""
        out = np.empty(self.size, dtype=np.float32)
        rows = max(1, _SCORE_BYTES // (self.dims // 2 * 4))
        for chunk, packed in enumerate(self.packed):
            first = chunk * _CHUNK_ROWS
            used = max(0, min(len(packed), self.size - first))
            for at in range(0, used, rows):
                end = min(at + rows, used)
                out[first + at : first + end] = nibble_scores(packed[at:end], self.steps[chunk][at:end], query)
        return out

    def trim(self) -> None:
        """Give back the room grown ahead in the last chunk (once loading or a move to new lists is done)."""
        if not self.packed:
            return
        rows = max(self.size - (len(self.packed) - 1) * _CHUNK_ROWS, min(_INITIAL_ROWS, _CHUNK_ROWS))
        if rows < len(self.packed[-1]):
            self._resize_last(rows)

    def reserve(self, rows: int) -> None:
        """Make room for rows rows before they come (an empty list that knows about how many it will hold)."""
        if not self.packed and rows > 0:
            self._new_chunk(min(rows, _CHUNK_ROWS))

    def _capacity(self) -> int:
        return (len(self.packed) - 1) * _CHUNK_ROWS + len(self.packed[-1]) if self.packed else 0

    def _grow(self) -> None:
        """Room for one more row: the last chunk grown by an eighth (at least _INITIAL_ROWS rows) up to
        _CHUNK_ROWS, or a new chunk of _INITIAL_ROWS rows; each grows by copying at most one chunk."""
        last = len(self.packed[-1]) if self.packed else _CHUNK_ROWS
        if last < _CHUNK_ROWS:
            self._resize_last(min(_CHUNK_ROWS, last + max(_INITIAL_ROWS, last // _GROWTH)))
        else:
            self._new_chunk(min(_INITIAL_ROWS, _CHUNK_ROWS))

    def _new_chunk(self, rows: int) -> None:
        """A chunk of rows empty rows after the last."""
        self.packed.append(pages.zeros((rows, self.dims // 2), np.int8))
        self.steps.append(pages.zeros((rows,), np.float16))
        self.rowids.append(pages.zeros((rows,), np.int32))

    def _resize_last(self, rows: int) -> None:
        """The last chunk with rows rows (a copy: the rows past its size are zero)."""
        self.packed[-1] = _resized(self.packed[-1], rows)
        self.steps[-1] = _resized(self.steps[-1], rows)
        self.rowids[-1] = _resized(self.rowids[-1], rows)


def _resized(array: npt.NDArray[_Item], rows: int) -> npt.NDArray[_Item]:
    """array with rows rows: its first rows kept, the rest zero (a copy: the old array goes with its last reference)."""
    resized: npt.NDArray[_Item] = pages.zeros((rows, *array.shape[1:]), array.dtype.type)
    kept = min(rows, len(array))
    resized[:kept] = array[:kept]
    return resized


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

    def put(self, rowid: int, vector: Nibbles) -> None:
        """Add rowid's vector (none of it is here) to the list of the nearest centroid."""
        self.put_many([(rowid, vector)])

    def put_many(self, items: Sequence[tuple[int, Nibbles]]) -> None:
        """Add these vectors, their lists found in one product with the centroids."""
        if self.centroids is None or not items:
            for rowid, vector in items:
                self._append(rowid, vector, 0)
            return
        for at in range(0, len(items), _ASSIGN_ROWS):  # small products: no large temporary to fragment the heap
            some = items[at : at + _ASSIGN_ROWS]
            packed = np.stack([values for _, (values, _) in some])
            floats = nibble_values(packed) * np.array([step for _, (_, step) in some], dtype=np.float32)[:, None]
            for (rowid, vector), index in zip(some, np.argmax(floats @ self.centroids.T, axis=1), strict=True):
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
        scanned = [(block, block.scores(query)) for block in chosen if block.size]
        if not scanned:
            return []
        scores = np.concatenate([block_scores for _, block_scores in scanned])
        take = min(k, len(scores))
        top = np.argpartition(-scores, take - 1)[:take] if take < len(scores) else np.arange(take)
        top = top[scores[top] >= MIN_COSINE]
        starts = np.cumsum([0] + [len(block_scores) for _, block_scores in scanned])
        owners = np.searchsorted(starts, top, side="right") - 1
        return [
            (float(scores[at]), scanned[owner][0].rowid(int(at - starts[owner])))
            for at, owner in zip(top, owners, strict=True)
        ]

    def take_some(self, count: int) -> list[tuple[int, Nibbles]]:
        """Remove and return up to count vectors (from the fullest lists' ends, whose chunks are let go)."""
        taken: list[tuple[int, Nibbles]] = []
        while len(taken) < count and self.count:
            position = max(range(len(self.blocks)), key=lambda i: self.blocks[i].size)
            block = self.blocks[position]
            while block.size and len(taken) < count:
                row = block.size - 1
                rowid = block.rowid(row)
                taken.append((rowid, block.vector(row)))
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
                rows.append(block.floats(positions))
        return np.concatenate(rows) if rows else np.zeros((0, self.dims), dtype=np.float32)

    def _append(self, rowid: int, vector: Nibbles, index: int) -> None:
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

    def put(self, rowid: int, vector: Nibbles) -> None:
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

    def put_many(self, items: Sequence[tuple[int, Nibbles]]) -> None:
        (self.next if self.next is not None else self.current).put_many(items)

    def begin_training(self, centroids: Floats, trained_at: int) -> None:
        """Start moving to lists around centroids (numbered after the current ones in the slots); an empty
        partition takes them as its current lists at once."""
        if not len(self) and self.current.offset == 0:
            self.current = _Lists(self.dims, self.slots, self.number, centroids)
            self.trained_at = trained_at
            return
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

    def train_for_load(self, namespace: str, sample: Floats, count: int) -> None:
        """Before loading a large namespace at start: learn its lists from a sample of its count stored
        vectors, so they go straight into an inverted file (never first into one list, then moved), each
        list sized ahead for its share of the sample (and a twentieth more), so loading seldom copies."""
        centroids = _kmeans(sample, max(64, int(np.sqrt(count))), self._rng)
        shares = np.bincount(_nearest(sample, centroids), minlength=len(centroids)) / max(1, len(sample))
        with self._lock:
            partition = self._partition(namespace)
            partition.begin_training(centroids, count)
            if partition.next is None:  # it was empty: these are its lists now
                for block, share in zip(partition.current.blocks, shares, strict=True):
                    block.reserve(int(share * count * _RESERVE_SHARE) + _INITIAL_ROWS)

    def load_many(self, vectors: Sequence[tuple[str, int, Quantized]]) -> None:
        """Add stored vectors while loading at start, except those of memories a commit has changed since."""
        by_namespace: dict[str, list[tuple[int, Nibbles]]] = {}
        for namespace, rowid, stored in vectors:
            by_namespace.setdefault(namespace, []).append((rowid, to_nibbles(stored)))
        with self._lock:
            for namespace, items in by_namespace.items():
                fresh = [
                    (rowid, vector) for rowid, vector in items if self._touched is None or rowid not in self._touched
                ]
                for rowid, _ in fresh:
                    self._remove(rowid)
                self._partition(namespace).put_many(fresh)
                self._count += len(fresh)

    def loaded(self) -> None:
        """Loading at start is done: the room its lists grew ahead is given back."""
        with self._lock:
            self._touched = None
            for partition in self._numbered:
                for lists in (partition.current, partition.next):
                    for block in lists.blocks if lists is not None else ():
                        block.trim()

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
            sample = due.current.sample(min(lists * _SAMPLE_PER_LIST, TRAINING_SAMPLE), self._rng)
        centroids = _kmeans(sample, lists, self._rng)
        with self._lock:
            if due.next is None and len(due):
                due.begin_training(centroids, size)
        return True

    def _put(self, namespace: str, rowid: int, stored: Quantized) -> None:
        vector = to_nibbles(stored)
        self._remove(rowid)
        self._partition(namespace).put(rowid, vector)
        self._count += 1

    def _partition(self, namespace: str) -> _Partition:
        """namespace's partition, made if it has none."""
        partition = self._partitions.get(namespace)
        if partition is None:
            partition = _Partition(self.dims, self._slots, len(self._numbered))
            self._partitions[namespace] = partition
            self._numbered.append(partition)
        return partition

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
        nearest = _nearest(points, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, points)
        counts = np.bincount(nearest, minlength=len(centroids))
        empty = counts == 0
        sums[empty] = points[rng.choice(len(points), size=int(empty.sum()))]
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), np.float32(1e-12))
    return centroids.astype(np.float32)


def _nearest(points: Floats, centroids: Floats) -> npt.NDArray[np.intp]:
    """Each point's nearest centroid, by chunks of points (the whole points x centroids matrix would be
    128 MB at a million vectors)."""
    return np.concatenate(
        [np.argmax(points[at : at + _CHUNK] @ centroids.T, axis=1) for at in range(0, len(points), _CHUNK)]
    )
