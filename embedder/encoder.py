"""The sentence encoder the embedder runs: tokenizer, the ONNX graph of the weights, ONNX Runtime on one thread.

Loaded once at start from files whose sha256 was checked (the bytes checked are
the bytes loaded). A text is cut at the model's 256 word pieces (its start
decides, as sentence-transformers does) and run alone: a batch would quantise
its activations over every text in it, so a memory's vector would depend on
what it was embedded beside.
"""

from __future__ import annotations

import json
import os
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from embedder.bert_graph import BertShape, build_encoder
from embedder.model_files import ModelFiles
from shared.errors import ConfigError
from shared.pinned_file import read_pinned

__all__ = ["MAX_TOKENS", "SentenceEncoder"]

#: Word pieces a text is cut to (all-MiniLM-L6-v2 was trained on at most 256).
MAX_TOKENS: Final = 256


def _bert_shape(config_bytes: bytes, where: object) -> BertShape:
    """The layers, heads and layer-norm epsilon from a BERT config.json."""
    try:
        config = json.loads(config_bytes)
        return BertShape(
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"embedding: {where} is not a BERT config.json: {error}") from None


class SentenceEncoder:
    """Texts to unit vectors with a BERT sentence encoder; ConfigError at start if its files are not right."""

    def __init__(self, files: ModelFiles) -> None:
        weights_bytes = read_pinned(files.weights, files.weights_sha256, "weights")
        tokenizer_bytes = read_pinned(files.tokenizer, files.tokenizer_sha256, "tokenizer")
        shape = _bert_shape(read_pinned(files.config, files.config_sha256, "config"), files.config)
        # One thread each: the embedder's parallelism is its request workers (embedder/main.py).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        import onnxruntime  # noqa: PLC0415 - heavy, and only the embedder's process loads it
        from safetensors.numpy import load  # noqa: PLC0415
        from tokenizers import Tokenizer  # noqa: PLC0415

        try:
            weights = load(weights_bytes)
            del weights_bytes
            graph = build_encoder(weights, shape)
        except (ValueError, KeyError) as error:
            raise ConfigError(
                f"embedding: the weights file {files.weights} is not a BERT checkpoint: {error}"
            ) from None
        self.dims = int(weights["embeddings.word_embeddings.weight"].shape[1])
        del weights
        try:
            tokenizer = Tokenizer.from_str(tokenizer_bytes.decode("utf-8"))
        except Exception as error:  # tokenizers raises a bare Exception; a non-UTF-8 file a UnicodeDecodeError
            raise ConfigError(f"embedding: the tokenizer {files.tokenizer} is not a tokenizer.json: {error}") from None
        tokenizer.no_padding()
        tokenizer.enable_truncation(MAX_TOKENS)
        self._tokenizer: Any = tokenizer
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its shape-merge warnings say nothing to an operator
        self._session: Any = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        del graph
        #: Names the model in every vector: the guardian embeds again what another model made.
        self.id = f"bert-int8-{self.dims}-{files.weights_sha256[:16]}"

    def embed_many(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """Each text's unit vector, one row each."""
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        for row, text in enumerate(texts):
            ids = np.array([self._tokenizer.encode(text).ids], dtype=np.int64)
            out[row] = self._session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        return out
