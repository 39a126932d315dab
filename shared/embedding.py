"""What the guardian and agent-embedder agree on: the shipped transformer, the limits of a request, a vector's bytes.

The guardian (guardian/recall/remote.py) sends texts; the embedder (embedder/)
answers each with a unit vector of float32, little-endian, and names the model
that made it. The guardian uses only vectors of the model its config expects.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_TEXTS",
    "TRANSFORMER_DIMS",
    "TRANSFORMER_ID",
    "from_wire",
    "to_wire",
]

#: The shipped transformer (all-MiniLM-L6-v2, int8 dense layers: embedder/bert_graph.py), by the
#: sha256 of its weights; embedder/encoder.py derives the same id from the files it loads.
TRANSFORMER_ID: Final = "bert-int8-384-53aa51172d142c89"
TRANSFORMER_DIMS: Final = 384
#: Texts in one request: a StoreBatch's drafts, or a background batch.
MAX_TEXTS: Final = 256
#: UTF-8 bytes of all the texts of one request (a memory is at most 64 KiB; the model reads its start).
MAX_REQUEST_BYTES: Final = 8 * 1024 * 1024

_WIRE: Final = np.dtype("<f4")


def to_wire(vector: npt.NDArray[np.float32]) -> bytes:
    """A vector's bytes on the wire."""
    return vector.astype(_WIRE, copy=False).tobytes()


def from_wire(data: bytes, dims: int) -> npt.NDArray[np.float32]:
    """The vector of data; ValueError unless it is dims finite float32 values of about unit length."""
    if len(data) != dims * _WIRE.itemsize:
        raise ValueError(f"a vector of {dims} dimensions is {dims * _WIRE.itemsize} bytes, not {len(data)}")
    vector = np.frombuffer(data, dtype=_WIRE).astype(np.float32)
    if not np.isfinite(vector).all() or abs(float(vector @ vector) - 1.0) > 1e-3:
        raise ValueError("a vector must be finite and of unit length")
    return vector
