"""agent-embedder's server: EmbedRequest frames on a Unix socket in, EmbedResponse frames out.

The standard library's ``socketserver`` (one thread a connection), not gRPC:
the guardian holds a connection a thread and sends plain length-prefixed
frames (shared/embedding.py), whose blocking reads cost it no CPU while it
waits. Each connection is a loop: read a request frame, answer it, until the
guardian closes it.

What is refused, whole, with ``refused`` saying why (proto/embedder/v1):

- a request over the limits of shared/embedding.py (texts, bytes), with the
  same words as ever ("texts: at most 256 a request, got 300"); the
  connection stays open;
- a frame that is not an EmbedRequest (it does not parse, or it has fields
  this embedder does not know): the connection is then closed, since
  nothing about the peer is guessed at;
- a frame longer than MAX_REQUEST_FRAME_BYTES: refused unread, then closed.

At most ``workers`` requests are embedded at once (a semaphore); the other
connections wait their turn. It logs counts and timings, never a text.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from embedder.encoder import SentenceEncoder
from shared.embedding import (
    MAX_REQUEST_BYTES,
    MAX_REQUEST_FRAME_BYTES,
    MAX_TEXTS,
    FrameError,
    read_frame,
    to_wire,
    write_frame,
)
from shared.rpc.embedder.v1 import embedder_pb2 as pb

__all__ = ["EmbedderServer"]

log = logging.getLogger("agent_embedder")

#: Connections waiting to be accepted: the guardian opens one a thread, possibly many at once
#: (a full backlog would fail its connect at once, as EAGAIN, not make it wait).
_BACKLOG: Final = 128


class _Connection(socketserver.BaseRequestHandler):
    """One guardian connection, served by EmbedderServer.serve_connection in its own thread."""

    server: EmbedderServer

    def handle(self) -> None:
        """Answer the connection's requests until it ends."""
        self.server.serve_connection(self.request)


class EmbedderServer(socketserver.ThreadingUnixStreamServer):
    """Serves one encoder on a Unix socket (ONNX Runtime sessions may run from several threads at once).

    Listening once built; answers once serve_forever runs (in a thread of its
    own, since stop() must be called from another); stop() ends it.
    """

    # A connection never holds the process: stop() waits, a grace at most, for the answers under way.
    daemon_threads = True
    block_on_close = False
    request_queue_size = _BACKLOG

    def __init__(self, path: Path, encoder: SentenceEncoder, workers: int) -> None:
        self.encoder = encoder
        self._embedding = threading.BoundedSemaphore(max(1, workers))
        self._lock = threading.Lock()
        self._all_answered = threading.Condition(self._lock)
        self._connections: set[socket.socket] = set()
        self._answering = 0
        super().__init__(str(path), _Connection)

    def serve_connection(self, connection: socket.socket) -> None:
        """Read request frames from connection and answer each, until it ends or must be closed."""
        with self._lock:
            self._connections.add(connection)
        try:
            while self._serve_one(connection):
                pass
        finally:
            with self._lock:
                self._connections.discard(connection)

    def _serve_one(self, connection: socket.socket) -> bool:
        """Read one request and answer it; whether to read another."""
        try:
            frame = read_frame(connection, MAX_REQUEST_FRAME_BYTES)
        except FrameError as error:  # over the limit (unread) or cut short: out of step for good
            self._refuse_and_close(connection, f"not a request: {error}")
            return False
        except OSError:  # the guardian went away, or stop() shut the connection
            return False
        if frame is None:
            return False
        with self._answering_one():
            request = pb.EmbedRequest()
            try:
                request.ParseFromString(frame)
            except DecodeError as error:
                self._refuse_and_close(connection, f"not an EmbedRequest: {error}")
                return False
            if len(UnknownFieldSet(request)):
                self._refuse_and_close(connection, "not an EmbedRequest: it has fields this embedder does not know")
                return False
            try:
                write_frame(connection, self.answer(list(request.texts)).SerializeToString())
            except OSError:
                return False
        return True

    def answer(self, texts: list[str]) -> pb.EmbedResponse:
        """Each text's vector, in order; or refused, naming the limit a request over one breaks."""
        if len(texts) > MAX_TEXTS:
            return _refused(f"texts: at most {MAX_TEXTS} a request, got {len(texts)}")
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        if size > MAX_REQUEST_BYTES:
            return _refused(f"texts: at most {MAX_REQUEST_BYTES} bytes a request, got {size}")
        started = time.perf_counter()
        with self._embedding:
            vectors = self.encoder.embed_many(texts)
        log.debug(
            "embedded",
            extra={"event": "embedded", "texts": len(texts), "ms": round((time.perf_counter() - started) * 1000, 3)},
        )
        return pb.EmbedResponse(
            model=self.encoder.id, dims=self.encoder.dims, vectors=[to_wire(vector) for vector in vectors]
        )

    def _refuse_and_close(self, connection: socket.socket, reason: str) -> None:
        """Tell the peer why, if it still listens; the caller then ends the connection."""
        with contextlib.suppress(OSError):
            write_frame(connection, _refused(reason).SerializeToString())

    @contextlib.contextmanager
    def _answering_one(self) -> Iterator[None]:
        """Count a request as under way until its answer is written (stop() waits for them)."""
        with self._lock:
            self._answering += 1
        try:
            yield
        finally:
            with self._lock:
                self._answering -= 1
                if not self._answering:
                    self._all_answered.notify_all()

    def handle_error(self, request: object, client_address: object) -> None:
        """Log a fault in serving a connection by its kind and place, never its message (it could quote a text).

        socketserver calls it from the except clause around a connection's
        thread, which then closes the connection: the guardian sees it end.
        """
        error = sys.exc_info()[1]
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        log.error(
            "serving a connection failed; it is closed",
            extra={
                "event": "embed_failed",
                "error": type(error).__name__,
                "where": f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "",
            },
        )

    def stop(self, grace_s: float) -> None:
        """Accept no more connections, read no more requests, and wait up to grace_s for the answers under way."""
        self.shutdown()
        self.server_close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # its reads end; an answer under way is still written
                    connection.shutdown(socket.SHUT_RD)
            self._all_answered.wait_for(lambda: not self._answering, timeout=grace_s)


def _refused(reason: str) -> pb.EmbedResponse:
    """The answer to a request refused whole, for reason (logged: the guardian never sends one)."""
    log.warning("a request was refused", extra={"event": "embed_request_refused", "reason": reason[:200]})
    return pb.EmbedResponse(refused=reason)
