"""The guardian's side of agent-embedder: texts sent over a Unix socket, vectors checked on their way back.

The embedder is a separate process with no keys, no database and no network
(see the README's security section); the guardian sends it memory texts and the
texts of queries, nothing else. What comes back is checked before it is used: a
vector must be of the model the guardian's config expects, of its dimensions,
finite and of unit length. A vector from a compromised embedder can at worst
misrank, never reach data.

The messages travel as length-prefixed frames (shared/embedding.py), not gRPC,
on one connection a calling thread: a blocking read costs the guardian no CPU
while the embedder works. The whole answer has a deadline, so an embedder that
trickles bytes holds a thread no longer than one that says nothing.

When the embedder does not answer (not started yet, restarting, overloaded),
:class:`RemoteEmbedder` raises :class:`~shared.errors.Unavailable` at once for
a few seconds before it tries again, so writes do not each wait out a timeout:
a store then goes on without its vector (embedded later in the background, by
guardian/daemon/recall.py), a hybrid search ranks by words and says so, and a
semantic search is refused as retryable.
"""

from __future__ import annotations

import contextlib
import logging
import socket as sockets
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError

from guardian.recall.model import Vector
from shared.embedding import (
    MAX_REQUEST_BYTES,
    MAX_RESPONSE_FRAME_BYTES,
    MAX_TEXTS,
    FrameError,
    from_wire,
    read_frame,
    write_frame,
)
from shared.errors import Unavailable
from shared.rpc.embedder.v1 import embedder_pb2 as pb

__all__ = ["RETRY_AFTER_S", "RemoteEmbedder"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

#: A text is cut here before it is sent: the model reads only its first 256 word pieces.
MAX_TEXT_CHARS: Final = 16_384
#: How long an Embed may take: a floor, and a share for each text.
_TIMEOUT_FLOOR_S: Final = 2.0
_TIMEOUT_PER_TEXT_S: Final = 0.05
#: After a failure, how long calls fail at once before the embedder is tried again.
RETRY_AFTER_S: Final = 3.0
_UNAVAILABLE: Final = (
    "recall by meaning is unavailable for a moment (the embedding service is not answering);"
    " retry in a few seconds, or search with mode lexical"
)


def _chunks(texts: list[str]) -> Iterator[list[str]]:
    """texts, cut to MAX_TEXT_CHARS each, in requests within the embedder's limits."""
    chunk: list[str] = []
    size = 0
    for text in texts:
        cut = text[:MAX_TEXT_CHARS]
        length = len(cut.encode("utf-8", "surrogatepass"))
        if chunk and (len(chunk) == MAX_TEXTS or size + length > MAX_REQUEST_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(cut)
        size += length
    if chunk:
        yield chunk


class RemoteEmbedder:
    """Embeds through agent-embedder on socket; id and dims are the model the guardian expects of it.

    Each calling thread has its own connection (made at its first call, or
    its first after a failure), on which it sends a request frame and reads
    the answer's: a blocking read, so waiting costs no CPU, and no lock is
    held while it waits.
    """

    def __init__(self, socket: Path, model_id: str, dims: int) -> None:
        self.id = model_id
        self.dims = dims
        self._socket = socket
        self._local = threading.local()
        self._lock = threading.Lock()
        #: Every thread's open connection, so close() can reach them all (weak: a thread's ends with it).
        self._connections: weakref.WeakSet[sockets.socket] = weakref.WeakSet()
        self._down_until = 0.0
        self._down_logged = False

    def embed(self, text: str) -> Vector:
        """text's vector; Unavailable if the embedder does not answer."""
        return self.embed_many([text])[0]

    def embed_many(self, texts: list[str]) -> list[Vector]:
        """Each text's vector; Unavailable (for all of them) if the embedder does not answer well."""
        if time.monotonic() < self._down_until:
            raise Unavailable(_UNAVAILABLE)
        vectors: list[Vector] = []
        for chunk in _chunks(texts):
            vectors.extend(self._embed_chunk(chunk))
        if self._down_logged:
            with self._lock:
                self._down_logged = False
            log.info("the embedding service answers again", extra={"event": "embedder_available"})
        return vectors

    def _embed_chunk(self, texts: list[str]) -> list[Vector]:
        timeout = _TIMEOUT_FLOOR_S + _TIMEOUT_PER_TEXT_S * len(texts)
        deadline = time.monotonic() + timeout
        try:
            connection = self._connection(timeout)
            connection.settimeout(timeout)
            write_frame(connection, pb.EmbedRequest(texts=texts).SerializeToString())
            frame = read_frame(connection, MAX_RESPONSE_FRAME_BYTES, deadline=deadline)
            if frame is None:
                raise FrameError("the embedding service closed the connection")
            response = pb.EmbedResponse.FromString(frame)
        except (OSError, DecodeError) as error:  # FrameError and timeouts are OSErrors
            self._disconnect()
            self._went_down(f"{type(error).__name__}: {error}")
            raise Unavailable(_UNAVAILABLE) from None
        if response.refused:
            # Never for a request of the guardian's (_chunks keeps to the limits): an embedder of another
            # version, or one that failed. Not a security event: it sends nothing the guardian would use.
            log.error(
                "the embedding service refused a request",
                extra={"event": "embedder_request_refused", "reason": response.refused[:200]},
            )
            self._went_down(f"refused: {response.refused}")
            raise Unavailable(_UNAVAILABLE)
        problem = self._refusal(response, len(texts))
        if problem is None:
            try:
                return [from_wire(data, self.dims) for data in response.vectors]
            except ValueError as error:
                problem = str(error)
        security_log.error(
            "the embedding service answered with vectors the guardian refuses",
            extra={"event": "embedder_answer_refused", "reason": problem},
        )
        self._went_down(problem)
        raise Unavailable(_UNAVAILABLE)

    def _connection(self, timeout: float) -> sockets.socket:
        """This thread's connection to the embedder, connected now if it has none."""
        connection: sockets.socket | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        connection = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        try:
            connection.settimeout(timeout)
            connection.connect(str(self._socket))
        except OSError:
            connection.close()
            raise
        with self._lock:
            self._connections.add(connection)
        self._local.connection = connection
        return connection

    def _disconnect(self) -> None:
        """Close this thread's connection (after a failure the stream may be out of step); the next call connects."""
        connection: sockets.socket | None = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            with self._lock:
                self._connections.discard(connection)
            connection.close()

    def _refusal(self, response: pb.EmbedResponse, count: int) -> str | None:
        """Why response is not what was asked of the expected model, or None."""
        if response.model != self.id or response.dims != self.dims:
            return f"model {response.model!r} of {response.dims} dimensions, not {self.id!r} of {self.dims}"
        if len(response.vectors) != count:
            return f"{len(response.vectors)} vectors for {count} texts"
        return None

    def _went_down(self, reason: str) -> None:
        """Fail at once for a while, and say so once per outage."""
        with self._lock:
            self._down_until = time.monotonic() + RETRY_AFTER_S
            first = not self._down_logged
            self._down_logged = True
        if first:
            log.warning(
                "the embedding service does not answer; writes go on without vectors (embedded later),"
                " searches rank by words",
                extra={"event": "embedder_unavailable", "socket": str(self._socket), "reason": reason[:200]},
            )

    def close(self) -> None:
        """Close every thread's connection (a call waiting on one ends Unavailable); once, when the guardian stops."""
        with self._lock:
            connections, self._connections = list(self._connections), weakref.WeakSet()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(sockets.SHUT_RDWR)  # wakes a read under way, which close() alone would not
            connection.close()
