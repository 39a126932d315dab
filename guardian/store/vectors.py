"""The vectors of memories: stored in the encrypted database beside their memory, mirrored in the index.

Table ``memory_vectors`` holds one row per active memory that has been embedded:
the model that made it, the packed vector (guardian/recall/vectors.py) and an
HMAC over the memory's id, the model and the vector, with a key derived from the
memory key ring (key id kept, so a rotation leaves older vectors verifiable). A
row is dropped in the same transaction as its memory's change, and written either
there (when the write's review needed the vector first) or in a transaction of its
own that re-reads and verifies the memory (see below); the in-memory
:class:`~guardian.recall.index.VectorIndex` follows once a transaction has
committed (:meth:`Database.after_commit`), so it never holds what was not
committed. A quarantined memory has no vector until it is released.

A write stores its memory without the vector unless the review of its write needs
it first (guardian/service/pipeline.py): once the write has committed, the memory is
*queued* (:meth:`MemoryVectors.queue`), and the recall thread (guardian/daemon/recall.py)
embeds what is queued in batches, a few milliseconds later, writing each vector in a
transaction that checks its memory is still as it was read. So the embedder's time is
not on the write's path, and its client's work is shared by a batch. A search waits
(:meth:`MemoryVectors.wait_embedded`, at most :data:`FRESH_WAIT_S`) until nothing in
the namespaces its caller reads is still queued, so an agent finds by meaning what it
has just stored; writes to namespaces it cannot read never delay it. The queue is in memory only: a
crash loses it, and the start-up scan embeds what has no vector.

A memory whose vector is missing, of another model, or fails its HMAC (dropped
when the index is loaded) is embedded again from its verified content in the
background (guardian/daemon/recall.py), in small batches: the upgrade of an existing state dir, a change
of model, and a tampered vector all end the same way, resumably, without holding
the writer for long.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from guardian.keys.ring import KeyRing
from guardian.recall.index import IVF_MIN, TRAINING_SAMPLE, VectorIndex
from guardian.recall.model import Embedder, Vector
from guardian.recall.vectors import Quantized, pack, unpack
from guardian.store.database import Connection

__all__ = ["FRESH_WAIT_S", "EmbeddingProgress", "MemoryVectors", "vector_keys", "vector_mac", "verify_stored"]

security_log = logging.getLogger("agent_guardian.security")

_KEY_LABEL: Final = b"agent-guardian/vector-key/v1"
#: Stored vectors read per step of the load at start (its rows and their copies are a load's passing memory).
_LOAD_BATCH: Final = 1000
#: The longest a search waits for its own namespaces' queued memories to be embedded.
FRESH_WAIT_S: Final = 2.0


@dataclass(frozen=True)
class EmbeddingProgress:
    """How many active memories have a vector of the model in use."""

    embedded: int
    active: int


def vector_keys(ring: KeyRing) -> dict[str, bytes]:
    """The vector MAC keys, by the id of the memory key each is derived from."""
    return {key_id: hmac.new(key, _KEY_LABEL, hashlib.sha256).digest() for key_id, key in ring.keys.items()}


def vector_mac(key: bytes, memory_id: str, model: str, blob: bytes) -> str:
    """The HMAC of a stored vector: over its memory's id, the model that made it, and the packed vector."""
    message = memory_id.encode() + b"\0" + model.encode() + b"\0" + blob
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify_stored(connection: Connection, ring: KeyRing) -> tuple[int, list[str]]:
    """Check every stored vector's HMAC (no model needed): (how many were checked, the memory ids that fail)."""
    keys = vector_keys(ring)
    checked, after = 0, -1
    failed: list[str] = []
    if connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'memory_vectors'").fetchone() is None:
        return checked, failed  # a file from before vectors (schema 5): nothing to check
    while True:
        rows = connection.execute(
            "SELECT v.rowid, m.id, v.model, v.vector, v.key_id, v.mac FROM memory_vectors AS v"
            " LEFT JOIN memories AS m ON m.rowid = v.rowid WHERE v.rowid > ? ORDER BY v.rowid LIMIT ?",
            (after, _LOAD_BATCH),
        ).fetchall()
        if not rows:
            return checked, failed
        for _, memory_id, model, blob, key_id, mac in rows:
            checked += 1
            key = keys.get(key_id)
            if (
                memory_id is None
                or key is None
                or not hmac.compare_digest(vector_mac(key, memory_id, model, blob), mac)
            ):
                failed.append(str(memory_id or "(a vector of no memory)"))
        after = int(rows[-1][0])


class MemoryVectors:
    """Writes, verifies and loads memories' vectors; keeps the index in step after each commit."""

    def __init__(self, model: Embedder, ring: KeyRing, after_commit: Callable[[Callable[[], None]], None]) -> None:
        self.model = model
        self.index = VectorIndex(model.dims)
        #: Set when a memory was left without its vector and not queued; the recall thread scans for what lacks one.
        self.behind = threading.Event()
        #: Set when a memory is queued (or behind is set): wakes the recall thread.
        self.wake = threading.Event()
        #: Committed memories waiting for their vector, by namespace (rowids); guarded by _queue_changed.
        self._queued: dict[str, set[int]] = {}
        self._queue_changed = threading.Condition()
        #: Whether the recall thread is embedding the queue now (else searches do not wait for it).
        self._queue_served = False
        #: When the oldest memory still queued was queued (monotonic seconds); searches waiting for the queue now.
        self._queued_since = 0.0
        self._searches_waiting = 0
        #: Rowids handed out by :meth:`queued` and not yet :meth:`embedded`, and those of them queued again meanwhile
        #: (an update while its older content was being embedded: the new content must still be).
        self._taken: set[int] = set()
        self._queued_again: set[int] = set()
        self._after_commit = after_commit
        self.use_ring(ring)

    def use_ring(self, ring: KeyRing) -> None:
        """MAC with ring's primary and verify with any of its keys from now on."""
        self._primary_id = ring.primary_id
        self._keys = vector_keys(ring)

    def fell_behind(self) -> None:
        """Say that an active memory was left without a vector (the recall thread looks for it)."""
        self.behind.set()
        self.wake.set()

    # -- the write-behind queue ------------------------------------------------------------------

    def queue(self, namespace: str, rowid: int) -> None:
        """From a write's transaction: once it commits, memory rowid of namespace waits to be embedded."""

        def enqueue() -> None:
            with self._queue_changed:
                if not self._queued:
                    self._queued_since = time.monotonic()
                self._queued.setdefault(namespace, set()).add(rowid)
                if rowid in self._taken:
                    self._queued_again.add(rowid)
            self.wake.set()

        self._after_commit(enqueue)

    def serve_queue(self, serving: bool) -> None:
        """The recall thread starts (True) or stops (False) embedding the queue; stopping moves what is
        queued to the scan (behind) and lets every waiting search go."""
        with self._queue_changed:
            self._queue_served = serving
            if not serving and self._queued:
                self._queued.clear()
                self._queued_again.clear()
                self.behind.set()
            self._queue_changed.notify_all()

    def batch_wait_s(self, limit: int, linger_s: float) -> float:
        """How much longer to let the queue fill before embedding it: 0 once limit are queued, a search waits
        for it, or its oldest memory has waited linger_s."""
        with self._queue_changed:
            if not self._queued or self._searches_waiting:
                return 0.0
            if sum(len(rowids) for rowids in self._queued.values()) >= limit:
                return 0.0
            return max(0.0, self._queued_since + linger_s - time.monotonic())

    def queued(self, limit: int) -> list[int]:
        """Up to limit queued rowids (still queued until :meth:`embedded`)."""
        with self._queue_changed:
            found: list[int] = []
            for rowids in self._queued.values():
                found += list(rowids)[: limit - len(found)]
                if len(found) >= limit:
                    break
            self._taken.update(found)
            return found

    def embedded(self, rowids: Sequence[int]) -> None:
        """These rowids are no longer queued (embedded, or gone), but for those queued again since :meth:`queued`
        handed them out; wake the searches waiting for them."""
        with self._queue_changed:
            done = set(rowids) - self._queued_again
            self._queued_again -= set(rowids)
            self._taken -= set(rowids)
            for namespace in list(self._queued):
                self._queued[namespace] -= done
                if not self._queued[namespace]:
                    del self._queued[namespace]
            if self._queued:  # what is left waits from now: it was not in the batch the linger was for
                self._queued_since = time.monotonic()
            self._queue_changed.notify_all()

    def wait_embedded(self, namespaces: Sequence[str], timeout_s: float = FRESH_WAIT_S) -> bool:
        """Wait until no memory of namespaces is queued (or timeout_s passes); whether none is.

        Returns at once while the recall thread is not embedding the queue (loading, catching
        up, or the embedder away): a search then ranks what is embedded.
        """

        def ready() -> bool:
            return not self._queue_served or not any(namespace in self._queued for namespace in namespaces)

        with self._queue_changed:
            if ready():
                return True
            self._searches_waiting += 1
            self.wake.set()  # the recall thread stops letting the queue fill: a search is waiting
            try:
                return self._queue_changed.wait_for(ready, timeout_s)
            finally:
                self._searches_waiting -= 1

    def embed(self, text: str) -> Vector:
        """text's vector, by the model in use."""
        return self.model.embed(text)

    def embed_many(self, texts: list[str]) -> list[Vector]:
        """Each text's vector, by the model in use."""
        return self.model.embed_many(texts)

    # -- in a memory's transaction -------------------------------------------------------------

    def put(self, connection: Connection, rowid: int, memory_id: str, namespace: str, vector: Vector) -> None:
        """Store memory rowid's vector (replacing any) and, once committed, index it."""
        blob = pack(vector)
        connection.execute(
            "INSERT OR REPLACE INTO memory_vectors (rowid, model, vector, key_id, mac) VALUES (?, ?, ?, ?, ?)",
            (rowid, self.model.id, blob, self._primary_id, self._mac(self._primary_id, memory_id, blob)),
        )
        quantized = unpack(blob, self.model.dims)
        self._after_commit(lambda: self.index.put(namespace, rowid, quantized))

    def drop(self, connection: Connection, rowids: Sequence[int]) -> None:
        """Delete these memories' vectors and, once committed, take them out of the index."""
        connection.executemany("DELETE FROM memory_vectors WHERE rowid = ?", [(rowid,) for rowid in rowids])
        dropped = list(rowids)
        self._after_commit(lambda: self.index.remove(dropped))

    # -- at start and in the background -----------------------------------------------------------

    def load(
        self, connection: Connection, progress: Callable[[int], None] = lambda loaded: None
    ) -> tuple[int, list[int]]:
        """Fill the index from the stored vectors of the model in use: (how many, the rowids that fail their HMAC).

        progress: told how many are loaded so far, after each batch.
        """
        self._train_large_namespaces(connection)
        loaded, after = 0, -1
        failed: list[int] = []
        while True:
            rows = connection.execute(
                "SELECT v.rowid, m.id, m.namespace, v.vector, v.key_id, v.mac FROM memory_vectors AS v"
                " JOIN memories AS m ON m.rowid = v.rowid"
                " WHERE v.rowid > ? AND v.model = ? AND m.status = 'active' ORDER BY v.rowid LIMIT ?",
                (after, self.model.id, _LOAD_BATCH),
            ).fetchall()
            if not rows:
                return loaded, failed
            batch: list[tuple[str, int, Quantized]] = []
            for rowid, memory_id, namespace, blob, key_id, mac in rows:
                if self._verifies(memory_id, blob, key_id, mac):
                    batch.append((namespace, int(rowid), unpack(blob, self.model.dims)))
                else:
                    failed.append(int(rowid))
            self.index.load_many(batch)
            loaded += len(batch)
            after = int(rows[-1][0])
            progress(loaded)

    def _train_large_namespaces(self, connection: Connection) -> None:
        """Learn the lists of each namespace large enough to be an inverted file from a sample of its
        (verified) stored vectors, before any is loaded: loaded straight into those lists, a million
        vectors never sit in one list first and are moved after (the memory that took twice)."""
        large = connection.execute(
            "SELECT m.namespace, count(*) FROM memory_vectors AS v JOIN memories AS m ON m.rowid = v.rowid"
            " WHERE v.model = ? AND m.status = 'active' GROUP BY m.namespace HAVING count(*) >= ?",
            (self.model.id, IVF_MIN),
        ).fetchall()
        for namespace, count in large:
            rows = connection.execute(
                "SELECT m.id, v.vector, v.key_id, v.mac FROM memory_vectors AS v JOIN memories AS m"
                " ON m.rowid = v.rowid WHERE m.namespace = ? AND v.model = ? AND m.status = 'active'"
                " ORDER BY random() LIMIT ?",
                (namespace, self.model.id, TRAINING_SAMPLE),
            ).fetchall()
            sample = [
                unpack(blob, self.model.dims)
                for memory_id, blob, key_id, mac in rows
                if self._verifies(memory_id, blob, key_id, mac)
            ]
            if sample:
                floats = np.stack([values.astype(np.float32) * np.float32(scale) for values, scale in sample])
                self.index.train_for_load(namespace, floats, int(count))

    def resign_batch(self, connection: Connection, after_rowid: int, limit: int) -> tuple[int, int, int]:
        """MAC again with the primary key up to limit vectors after after_rowid that another key MACed.

        Returns (how many were, how many failed their HMAC and were dropped to be embedded
        again at the next start, the last rowid looked at or -1 when none was left).
        """
        rows = connection.execute(
            "SELECT v.rowid, m.id, v.model, v.vector, v.key_id, v.mac FROM memory_vectors AS v"
            " JOIN memories AS m ON m.rowid = v.rowid WHERE v.rowid > ? AND v.key_id <> ? ORDER BY v.rowid LIMIT ?",
            (after_rowid, self._primary_id, limit),
        ).fetchall()
        if not rows:
            return 0, 0, -1
        resigned, bad = 0, []
        for rowid, memory_id, model, blob, key_id, mac in rows:
            key = self._keys.get(key_id)
            if key is None or not hmac.compare_digest(vector_mac(key, memory_id, model, blob), mac):
                bad.append(int(rowid))
                continue
            connection.execute(
                "UPDATE memory_vectors SET key_id = ?, mac = ? WHERE rowid = ?",
                (self._primary_id, vector_mac(self._keys[self._primary_id], memory_id, model, blob), rowid),
            )
            resigned += 1
        if bad:
            self.drop(connection, bad)
        return resigned, len(bad), int(rows[-1][0])

    def signed_with(self, connection: Connection, key_id: str) -> int:
        """How many stored vectors carry an HMAC made with key_id."""
        return int(connection.execute("SELECT count(*) FROM memory_vectors WHERE key_id = ?", (key_id,)).fetchone()[0])

    def missing(self, connection: Connection, after_rowid: int, limit: int) -> list[int]:
        """Up to limit active memories after after_rowid with no vector of the model in use, by rowid."""
        rows = connection.execute(
            "SELECT m.rowid FROM memories AS m LEFT JOIN memory_vectors AS v ON v.rowid = m.rowid AND v.model = ?"
            " WHERE m.rowid > ? AND m.status = 'active' AND v.rowid IS NULL ORDER BY m.rowid LIMIT ?",
            (self.model.id, after_rowid, limit),
        ).fetchall()
        return [int(row[0]) for row in rows]

    def has(self, connection: Connection, rowid: int) -> bool:
        """Whether memory rowid has a vector of the model in use."""
        row = connection.execute(
            "SELECT 1 FROM memory_vectors WHERE rowid = ? AND model = ?", (rowid, self.model.id)
        ).fetchone()
        return row is not None

    def progress(self, connection: Connection) -> EmbeddingProgress:
        """Active memories, and those with a vector of the model in use."""
        active = connection.execute("SELECT count(*) FROM memories WHERE status = 'active'").fetchone()[0]
        embedded = connection.execute(
            "SELECT count(*) FROM memory_vectors AS v JOIN memories AS m ON m.rowid = v.rowid"
            " WHERE v.model = ? AND m.status = 'active'",
            (self.model.id,),
        ).fetchone()[0]
        return EmbeddingProgress(int(embedded), int(active))

    def _mac(self, key_id: str, memory_id: str, blob: bytes) -> str:
        return vector_mac(self._keys[key_id], memory_id, self.model.id, blob)

    def _verifies(self, memory_id: str, blob: bytes, key_id: str, mac: str) -> bool:
        if key_id not in self._keys or len(blob) != 4 + self.model.dims:
            return False
        return hmac.compare_digest(self._mac(key_id, memory_id, blob), mac)
