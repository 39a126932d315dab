"""The static embedding model, run in the guardian itself: a text's meaning as a unit vector, never over a network.

Two kinds of model make the guardian's vectors (:class:`Embedder`): the
transformer that agent-embedder runs in its own sandboxed process (the shipped
deployments' choice: guardian/recall/remote.py), or this static model in the
guardian's own process (config ``embedding: {model: builtin}``, the default of a
bare config: it needs no other process, and recalls less by meaning).

The static model is the one bundled in the ``wordllama`` wheel from PyPI
(code MIT; weights distilled from Llama 2's token embeddings, under the Llama 2
Community License: see the README): a table of one vector per token of its
tokenizer. A text's vector is the mean of its tokens' rows, L2-normalised. Nothing
of ``wordllama`` is imported or run: its two data files are read from the installed
wheel, each checked against the sha256 pinned here before it is used, the weights
with ``safetensors`` (a format that holds tensors only, never code) and the
tokenizer with Hugging Face ``tokenizers`` (Rust). An operator may name other
files of the same kind, each with its sha256 (config ``embedding``); a file whose
sha256 differs stops the guardian at start with the reason.

Why the transformer runs in a separate process and this may run here: see the README's security section.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError
from shared.pinned_file import installed_files, read_pinned

__all__ = ["BUILTIN", "Embedder", "EmbeddingModel", "ModelFiles", "Vector", "builtin_files"]

#: A unit vector of float32.
Vector: TypeAlias = npt.NDArray[np.float32]


class Embedder(Protocol):
    """What makes vectors for the guardian: this static model, or agent-embedder (guardian/recall/remote.py)."""

    #: Names the model in every stored vector: a vector of another model is embedded again.
    id: str

    @property
    def dims(self) -> int:
        """The length of a vector."""
        ...

    def embed(self, text: str) -> Vector:
        """text's unit vector; Unavailable if it cannot be made now."""
        ...

    def embed_many(self, texts: list[str]) -> list[Vector]:
        """Each text's unit vector; Unavailable if they cannot be made now."""
        ...

    def close(self) -> None:
        """Let go of what it holds (connections); called once, when the guardian stops."""
        ...


#: The distribution whose files the shipped model is, and the files, pinned.
_BUILTIN_DISTRIBUTION: Final = "wordllama"
_BUILTIN_WEIGHTS: Final = (
    "wordllama/weights/l2_supercat_256.safetensors",
    "64b47a2dc493cb8e85944076601189739852d7b64e0e1eedcb1937a251cd9fd5",
)
_BUILTIN_TOKENIZER: Final = (
    "wordllama/tokenizers/l2_supercat_tokenizer_config.json",
    "93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68",
)
#: The config's name for the shipped model.
BUILTIN: Final = "builtin"
#: Tokens of a text that count toward its vector (a longer text is cut here: its start decides).
MAX_TOKENS: Final = 2048


@dataclass(frozen=True)
class ModelFiles:
    """A static embedding model's two files, each with the sha256 it must have."""

    weights: Path
    weights_sha256: str
    tokenizer: Path
    tokenizer_sha256: str


def builtin_files() -> ModelFiles:
    """The shipped model's files, where the installed wheel put them (no import of the package)."""
    weights, tokenizer = installed_files(
        _BUILTIN_DISTRIBUTION, (_BUILTIN_WEIGHTS[0], _BUILTIN_TOKENIZER[0]), "reinstall agent-guardian"
    )
    return ModelFiles(weights, _BUILTIN_WEIGHTS[1], tokenizer, _BUILTIN_TOKENIZER[1])


def _without_word_cache(tokenizer: Any, config: dict[str, Any]) -> None:
    """The same BPE model, without its cache of results by word.

    A Llama-style tokenizer splits no text into words: its cache keeps every whole text it
    saw, up to 10,000 of them (measured: 84 MB after 10,000 notes), and no memory is embedded
    twice. Same vocabulary, merges and options, so the same tokens.
    """
    from tokenizers.models import BPE  # noqa: PLC0415 - with the rest of tokenizers (see __init__)

    if not isinstance(tokenizer.model, BPE):
        return
    model = config["model"]
    pairs = [merge.split(" ", 1) if isinstance(merge, str) else merge for merge in model["merges"]]
    merges = [(str(left), str(right)) for left, right in pairs]
    options = {
        name: model[name]
        for name in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk")
        if model.get(name) is not None
    }
    tokenizer.model = BPE(
        model["vocab"],
        merges,
        cache_capacity=0,
        byte_fallback=bool(model.get("byte_fallback")),
        ignore_merges=bool(model.get("ignore_merges")),
        **options,
    )


class EmbeddingModel:
    """A static embedding model, loaded from files whose sha256 was checked."""

    def __init__(self, files: ModelFiles) -> None:
        """Check both files' sha256, then load them; ConfigError saying which file and why, otherwise."""
        weights = read_pinned(files.weights, files.weights_sha256, "weights")
        tokenizer_bytes = read_pinned(files.tokenizer, files.tokenizer_sha256, "tokenizer")
        # Imported here, not by whoever only needs the Vector type (guardianctl); the environment
        # first: encode() of one text never needs tokenizers' thread pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        from safetensors.numpy import load  # noqa: PLC0415
        from tokenizers import Tokenizer  # noqa: PLC0415

        tensors = load(weights)
        if len(tensors) != 1:
            raise ConfigError(f"embedding: the weights file {files.weights} must hold exactly one tensor")
        [table] = tensors.values()
        if table.ndim != 2 or table.shape[0] < 2 or table.shape[1] < 8 or table.shape[1] % 2:
            raise ConfigError(
                f"embedding: the weights file {files.weights} must hold one matrix of token vectors"
                " (an even number of dimensions)"
            )
        # Kept as stored (fp16: 16 MiB for the shipped model); a text's rows are summed in float32.
        self._table: npt.NDArray[np.floating[Any]] = np.ascontiguousarray(table)
        try:
            config = tokenizer_bytes.decode("utf-8")
            tokenizer = Tokenizer.from_str(config)
        except Exception as error:  # tokenizers raises a bare Exception; a non-UTF-8 file a UnicodeDecodeError
            raise ConfigError(f"embedding: the tokenizer {files.tokenizer} is not a tokenizer.json: {error}") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        _without_word_cache(tokenizer, json.loads(config))
        if tokenizer.get_vocab_size() > self._table.shape[0]:
            raise ConfigError(f"embedding: the tokenizer {files.tokenizer} has more tokens than the weights have rows")
        self._tokenizer: Any = tokenizer
        #: Names the model in every stored vector: a vector of another model is embedded again.
        self.id = f"static-{self._table.shape[1]}-{files.weights_sha256[:16]}"

    @property
    def dims(self) -> int:
        """The length of a vector."""
        return int(self._table.shape[1])

    def embed_many(self, texts: list[str]) -> list[Vector]:
        """Each text's unit vector."""
        return [self.embed(text) for text in texts]

    def close(self) -> None:
        """Nothing to let go of: the table is freed with the model."""

    def embed(self, text: str) -> Vector:
        """text's unit vector (the zero vector for a text with no token)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids[:MAX_TOKENS]
        if not ids:
            return np.zeros(self.dims, dtype=np.float32)
        mean: Vector = self._table[ids].astype(np.float32).mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return mean / np.float32(norm) if norm > 0 else np.zeros(self.dims, dtype=np.float32)
