"""The guardian's side of agent-embedder: texts sent over a Unix socket, vectors checked on their way back.

The embedder is a separate process with no keys, no database and no network
(see the README's security section); the guardian sends it memory texts and the
texts of queries, nothing else. What comes back is checked before it is used: a
vector must be of the model the guardian's config expects, of its dimensions,
finite and of unit length. A vector from a compromised embedder can at worst
misrank, never reach data.

When the embedder does not answer (not started yet, restarting, overloaded),
:class:`RemoteEmbedder` raises :class:`~shared.errors.Unavailable` at once for
a few seconds before it tries again, so writes do not each wait out a timeout:
a store then goes on without its vector (embedded later in the background, by
guardian/daemon/recall.py), a hybrid search ranks by words and says so, and a
semantic search is refused as retryable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import grpc

from guardian.recall.model import Vector
from shared.embedding import MAX_REQUEST_BYTES, MAX_TEXTS, from_wire
from shared.errors import Unavailable
from shared.rpc.embedder.v1 import embedder_pb2 as pb
from shared.rpc.embedder.v1 import embedder_pb2_grpc

__all__ = ["RemoteEmbedder"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

#: A text is cut here before it is sent: the model reads only its first 256 word pieces.
MAX_TEXT_CHARS: Final = 16_384
#: How long an Embed may take: a floor, and a share for each text.
_TIMEOUT_FLOOR_S: Final = 2.0
_TIMEOUT_PER_TEXT_S: Final = 0.05
#: After a failure, how long calls fail at once before the embedder is tried again.
_RETRY_AFTER_S: Final = 3.0
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
    """Embeds through agent-embedder on socket; id and dims are the model the guardian expects of it."""

    def __init__(self, socket: Path, model_id: str, dims: int) -> None:
        self.id = model_id
        self.dims = dims
        self._socket = socket
        self._channel = grpc.insecure_channel(
            f"unix:{socket}", options=[("grpc.max_send_message_length", MAX_REQUEST_BYTES + 1024 * 1024)]
        )
        self._stub = embedder_pb2_grpc.EmbedderServiceStub(self._channel)
        self._lock = threading.Lock()
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
        try:
            response = self._stub.Embed(pb.EmbedRequest(texts=texts), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            self._went_down(
                f"{code.name if code else 'error'}: {error.details() if isinstance(error, grpc.Call) else ''}"
            )
            raise Unavailable(_UNAVAILABLE) from None
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
            self._down_until = time.monotonic() + _RETRY_AFTER_S
            first = not self._down_logged
            self._down_logged = True
        if first:
            log.warning(
                "the embedding service does not answer; writes go on without vectors (embedded later),"
                " searches rank by words",
                extra={"event": "embedder_unavailable", "socket": str(self._socket), "reason": reason[:200]},
            )

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
