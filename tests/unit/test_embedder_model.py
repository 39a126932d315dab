"""The embedder's model: the ONNX graph we build against a float32 numpy forward of the same weights,
the pinned identity, and the wire format and request chunks both processes rely on."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from embedder.encoder import MAX_TOKENS, SentenceEncoder
from embedder.model_files import shipped_files
from guardian.recall.remote import MAX_TEXT_CHARS, _chunks
from shared.embedding import MAX_REQUEST_BYTES, MAX_TEXTS, TRANSFORMER_DIMS, TRANSFORMER_ID, from_wire, to_wire
from tests.support.harness import ROOT

Array = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(shipped_files())


def _layer_norm(x: Array, weight: Array, bias: Array) -> Array:
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    normed: Array = (x - mean) / np.sqrt(variance + 1e-12) * weight + bias
    return normed


def reference_forward(weights: dict[str, Any], ids: list[int], layers: int = 6, heads: int = 12) -> Array:
    """BERT in float32 numpy, written from the paper's equations: the graph's independent check."""
    w = {name: tensor.astype(np.float32) for name, tensor in weights.items()}
    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    head_dims = x.shape[1] // heads
    erf = np.vectorize(math.erf)
    for index in range(layers):
        p = f"encoder.layer.{index}."

        def dense(h: Array, name: str, p: str = p) -> Array:
            out: Array = h @ w[p + name + ".weight"].T + w[p + name + ".bias"]
            return out

        q, k, v = (
            dense(x, f"attention.self.{name}").reshape(n, heads, head_dims).transpose(1, 0, 2)
            for name in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(head_dims)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        context = (scores @ v).transpose(1, 0, 2).reshape(n, -1)
        norm = "attention.output.LayerNorm"
        x = _layer_norm(x + dense(context, "attention.output.dense"), w[p + norm + ".weight"], w[p + norm + ".bias"])
        inner = dense(x, "intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / np.sqrt(2.0))).astype(np.float32)
        norm = "output.LayerNorm"
        x = _layer_norm(x + dense(inner, "output.dense"), w[p + norm + ".weight"], w[p + norm + ".bias"])
    pooled: Array = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_the_built_graph_computes_the_models_embeddings(encoder: SentenceEncoder) -> None:
    files = shipped_files()
    weights = load_file(str(files.weights))
    tokenizer = Tokenizer.from_file(str(files.tokenizer))
    tokenizer.no_padding()  # the file pads to 128 pieces; the encoder does not either
    notes = [json.loads(line)["content"] for line in (ROOT / "bench/recall_eval/notes.jsonl").open()][:24]
    ours = encoder.embed_many(notes)
    reference = np.stack([reference_forward(weights, tokenizer.encode(note).ids) for note in notes])
    cosines = (ours * reference).sum(1)
    # int8 dense layers against float32: close, never a different direction.
    assert cosines.min() > 0.9 and cosines.mean() > 0.95, cosines
    # ...and close enough that each note's nearest reference vector is its own.
    assert list((ours @ reference.T).argmax(1)) == list(range(len(notes)))


def test_the_encoder_is_the_pinned_model_and_deterministic(encoder: SentenceEncoder) -> None:
    assert (encoder.id, encoder.dims) == (TRANSFORMER_ID, TRANSFORMER_DIMS)
    text = "Dentist appointment moved to the 14th at half past three."
    first, again = encoder.embed_many([text]), encoder.embed_many(["something else", text])
    assert np.array_equal(first[0], again[1])
    long = encoder.embed_many(["word " * 20_000])[0]  # cut at MAX_TOKENS word pieces, not refused
    assert abs(float(long @ long) - 1.0) < 1e-4 and MAX_TOKENS == 256


def test_a_vector_on_the_wire_must_be_finite_unit_and_of_the_dims() -> None:
    vector = np.zeros(TRANSFORMER_DIMS, dtype=np.float32)
    vector[3] = 1.0
    assert np.array_equal(from_wire(to_wire(vector), TRANSFORMER_DIMS), vector)
    with pytest.raises(ValueError, match="384 dimensions is 1536 bytes, not 1532"):
        from_wire(to_wire(vector)[:-4], TRANSFORMER_DIMS)
    for bad in (vector * 2, np.full(TRANSFORMER_DIMS, np.nan, dtype=np.float32)):
        with pytest.raises(ValueError, match="finite and of unit length"):
            from_wire(to_wire(bad), TRANSFORMER_DIMS)


def test_the_guardian_cuts_long_texts_and_splits_requests_within_the_embedders_limits() -> None:
    chunks = list(_chunks(["note"] * (MAX_TEXTS + 44)))
    assert [len(chunk) for chunk in chunks] == [MAX_TEXTS, 44]
    big = "é" * MAX_TEXT_CHARS * 3
    chunks = list(_chunks([big] * 300))
    assert all(len(text) == MAX_TEXT_CHARS for chunk in chunks for text in chunk)
    assert sum(len(chunk) for chunk in chunks) == 300
    assert all(sum(len(text.encode()) for text in chunk) <= MAX_REQUEST_BYTES for chunk in chunks)
