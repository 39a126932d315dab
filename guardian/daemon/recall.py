"""Recall by meaning in the background: the vector index loaded at start, then every memory embedded.

At start the guardian serves at once; this thread loads the vector index from the
stored vectors (checking each one's HMAC: one that fails is dropped, said in the
security log, and embedded again), then marks the index ready. Until then a
hybrid search ranks by words alone and says so (``semantic_pending``), and a
semantic-only search is refused as retryable (UNAVAILABLE): never a silent
partial answer.

Then it embeds, in small batches, the active memories that have no vector of
the model in use: after an upgrade from a guardian without vectors, or after a
change of model. Each batch is read on a reader, embedded with no lock held, and
written in a short transaction that skips any memory changed meanwhile (a write
embeds its memory itself). Nothing of this is recorded but the vectors, so it is
resumable after a kill: the next start looks again for what has no vector.
Progress is logged and shown by ``guardianctl status``.

Then, until the guardian stops, it embeds what writes queued (guardian/store/vectors.py:
a write stores its memory first and its vector follows, milliseconds later, in
batches of up to :data:`_EMBED_BATCH`), scans for what was left without a vector
(agent-embedder was not answering), and keeps the index's large partitions
trained as inverted files (guardian/recall/index.py), one short step at a time.
While the embedder does not answer, the queue goes to the scan, a pass stops and
a later one resumes (the embedder's client fails fast for 3 s after a failure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from guardian.daemon.background import Background
from guardian.daemon.heap import give_back_freed_memory
from guardian.recall.remote import RETRY_AFTER_S
from guardian.state.core import GuardianCore
from shared.errors import Unavailable

__all__ = ["RecallIndexer"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

_EMBED_BATCH: Final = 64
#: The longest the queue of what writes left to embed is let fill before its batch is embedded (a waiting search
#: cuts it short).
_LINGER_S: Final = 0.01
#: At a graceful stop, the longest the recall thread goes on embedding what is queued.
_DRAIN_S: Final = 10.0
_LOG_EVERY: Final = 10_000
#: How often it looks for a partition that has grown enough to be trained (again).
_TRAIN_CHECK_S: Final = 5.0
#: How often it looks for memories stored without a vector (after a release, or while the embedder was away).
_BEHIND_CHECK_S: Final = 0.2


class RecallIndexer(Background):
    """Loads the vector index, then embeds what lacks a vector; on a daemon thread, once per start."""

    def __init__(self, core: GuardianCore) -> None:
        super().__init__("guardian-recall")
        self._core = core

    def run(self) -> None:
        """Load, then embed, then keep large partitions trained; a failure is logged, a restart resumes."""
        try:
            self.load()
            self.embed_missing()
            self.keep_trained()
        except Exception:
            log.exception("recall indexing stopped; searches rank by what is indexed, and a restart resumes it")

    def load(self) -> int:
        """Fill the index from the stored vectors; how many were loaded."""
        vectors = self._core.memories.vectors
        if vectors is None:
            return 0
        started = time.monotonic()
        log.info("loading the vector index", extra={"event": "vector_index_loading", "model": vectors.model.id})
        report = self._log_progress("vector_index_loading", "loaded")

        def progress(loaded: int) -> None:
            report(loaded)
            give_back_freed_memory()  # after each batch: its temporaries would otherwise pile up in the heap

        with self._core.database.read() as reader:
            loaded, failed = vectors.load(reader, progress)
            # Its page cache holds the pages of the load's scan of every vector: let them go (some 4 MB at 1M).
            reader.execute("PRAGMA shrink_memory")
        if failed:
            security_log.error(
                "stored vectors fail their HMAC; they are dropped and embedded again from their memories",
                extra={"event": "vector_integrity_failure", "count": len(failed)},
            )
            with self._core.database.write() as connection:
                vectors.drop(connection, failed)
        vectors.index.loaded()
        give_back_freed_memory()  # what the load's reads and the trim of every list's last chunk let go
        log.info(
            "vector index ready",
            extra={"event": "vector_index_ready", "vectors": loaded, "seconds": round(time.monotonic() - started, 3)},
        )
        return loaded

    def embed_missing(self) -> int:
        """Embed every active memory that has no vector of the model in use; how many were embedded."""
        memories, database = self._core.memories, self._core.database
        vectors = memories.vectors
        if vectors is None:
            return 0
        vectors.behind.clear()
        embedded, after, started = 0, -1, time.monotonic()
        report = self._log_progress("embedding_progress", "embedded")
        while not self._stop.is_set():
            with database.read() as reader:
                batch, after = memories.unembedded(reader, after, _EMBED_BATCH)
            if after < 0:
                break
            try:
                embedded_now = vectors.embed_many([memory.content for _, memory in batch])
            except Unavailable:
                # agent-embedder is not answering: look again once its client would try it again, not at
                # every turn of keep_trained (each look scans for what lacks a vector and reads a batch).
                vectors.fell_behind()
                self._stop.wait(RETRY_AFTER_S)
                break
            made = [(rowid, memory, vector) for (rowid, memory), vector in zip(batch, embedded_now, strict=True)]
            with database.write() as connection:
                embedded += memories.attach_vectors(connection, made)
            report(embedded)
        if embedded:
            log.info(
                "memories embedded",
                extra={
                    "event": "embedding_done",
                    "embedded": embedded,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
        return embedded

    def keep_trained(self) -> None:
        """Until stopped: embed what was stored without a vector, and train the partitions that grew large
        enough (guardian/recall/index.py), step by step."""
        vectors = self._core.memories.vectors
        if vectors is None:
            return
        next_training = 0.0
        vectors.serve_queue(True)
        try:
            while not self._stop.is_set():
                vectors.wake.clear()
                if self.embed_queued():
                    continue  # more may be queued already
                if vectors.behind.is_set():
                    self.embed_missing()
                    if not vectors.behind.is_set():  # caught up: the embedder answers again
                        vectors.serve_queue(True)
                if time.monotonic() >= next_training:
                    if vectors.index.train_step():
                        continue  # more of it at once: each step holds the index's lock only briefly
                    next_training = time.monotonic() + _TRAIN_CHECK_S
                vectors.wake.wait(_BEHIND_CHECK_S)
        finally:
            # A graceful stop (the servers have stopped: nothing more is queued) embeds what is left, so a restart
            # finds every vector; a kill leaves it to the start-up scan.
            drain_until = time.monotonic() + _DRAIN_S
            while time.monotonic() < drain_until and self.embed_queued(linger_s=0.0):
                pass
            vectors.serve_queue(False)

    def embed_queued(self, linger_s: float = _LINGER_S) -> int:
        """Embed one batch of what writes queued, or wait (at most linger_s) for it to fill; 0 when nothing is
        queued.

        The embedder not answering sends the queue to the scan (embed_missing, when it is back).
        """
        memories, database = self._core.memories, self._core.database
        vectors = memories.vectors
        if vectors is None:
            return 0
        linger_s = vectors.batch_wait_s(_EMBED_BATCH, linger_s)
        if linger_s > 0:  # let the queue fill: one request to the embedder and one transaction for the batch
            vectors.wake.wait(linger_s)  # a write or a waiting search wakes it; batch_wait_s decides again
            return 1
        rowids = vectors.queued(_EMBED_BATCH)
        if not rowids:
            return 0
        started_ns = time.thread_time_ns()
        try:
            with database.read() as reader:
                batch = memories.embeddable(reader, rowids)  # gone, changed to held, or failing: not embedded
            made = vectors.embed_many([memory.content for _, memory in batch]) if batch else []
            if batch:
                with database.write() as connection:
                    memories.attach_vectors(
                        connection,
                        [(rowid, memory, vector) for (rowid, memory), vector in zip(batch, made, strict=True)],
                    )
        except Unavailable:
            vectors.serve_queue(False)  # queued -> behind: the scan finds them once the embedder is back
            self._stop.wait(RETRY_AFTER_S)
            return 0
        finally:
            vectors.embedded(rowids)
            self._core.profile.background("embed", time.thread_time_ns() - started_ns)
        return len(rowids)

    @staticmethod
    def _log_progress(event: str, field: str) -> Callable[[int], None]:
        """A progress callback that logs every _LOG_EVERY."""
        logged = 0

        def report(done: int) -> None:
            nonlocal logged
            if done - logged >= _LOG_EVERY:
                logged = done
                log.info("recall indexing in progress", extra={"event": event, field: done})

        return report
