"""The embedder's one RPC: texts in, unit vectors out, within the limits of shared/embedding.py.

It logs counts and timings, never a text; a request over the limits is refused
whole with INVALID_ARGUMENT saying which limit.
"""

from __future__ import annotations

import logging
import time

import grpc

from embedder.encoder import SentenceEncoder
from shared.embedding import MAX_REQUEST_BYTES, MAX_TEXTS, to_wire
from shared.rpc.embedder.v1 import embedder_pb2 as pb
from shared.rpc.embedder.v1 import embedder_pb2_grpc

__all__ = ["EmbedderServicer"]

log = logging.getLogger("agent_embedder")


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    """Serves Embed with one encoder (ONNX Runtime sessions may run from several threads at once)."""

    def __init__(self, encoder: SentenceEncoder) -> None:
        self._encoder = encoder

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        """Each text's vector, in order."""
        texts = list(request.texts)
        if len(texts) > MAX_TEXTS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"texts: at most {MAX_TEXTS} a request, got {len(texts)}")
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        if size > MAX_REQUEST_BYTES:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"texts: at most {MAX_REQUEST_BYTES} bytes a request, got {size}"
            )
        started = time.perf_counter()
        vectors = self._encoder.embed_many(texts)
        log.debug(
            "embedded",
            extra={"event": "embedded", "texts": len(texts), "ms": round((time.perf_counter() - started) * 1000, 3)},
        )
        return pb.EmbedResponse(
            model=self._encoder.id, dims=self._encoder.dims, vectors=[to_wire(vector) for vector in vectors]
        )
