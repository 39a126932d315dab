"""What the guardian and agent-embedder agree on: the shipped transformer, the limits, a vector's bytes, the frames.

The guardian (guardian/recall/remote.py) sends texts; the embedder (embedder/)
answers each with a unit vector of float32, little-endian, and names the model
that made it. The guardian uses only vectors of the model its config expects.

The messages (proto/embedder/v1/embedder.proto) travel as frames on a Unix
stream socket, not as gRPC calls: a blocking read costs the guardian no CPU
while it waits, where the gRPC client spent some for every millisecond. A
frame is a 4-byte big-endian unsigned length, then that many bytes. Each side
reads at most a limit, checked before anything is allocated: the embedder
MAX_REQUEST_FRAME_BYTES, the guardian MAX_RESPONSE_FRAME_BYTES. A frame that
is longer, or cut short, is a :class:`FrameError`: the stream can no longer
be trusted to be in step, so the connection is closed.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_DIMS",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_FRAME_BYTES",
    "MAX_RESPONSE_FRAME_BYTES",
    "MAX_TEXTS",
    "TRANSFORMER_DIMS",
    "TRANSFORMER_ID",
    "FrameError",
    "ask_once",
    "from_wire",
    "read_frame",
    "to_wire",
    "write_frame",
]

#: The shipped transformer (all-MiniLM-L6-v2, int8 dense layers: embedder/bert_graph.py), by the
#: sha256 of its weights; embedder/encoder.py derives the same id from the files it loads.
TRANSFORMER_ID: Final = "bert-int8-384-53aa51172d142c89"
TRANSFORMER_DIMS: Final = 384
#: Texts in one request: a StoreBatch's drafts, or a background batch.
MAX_TEXTS: Final = 256
#: UTF-8 bytes of all the texts of one request (a memory is at most 64 KiB; the model reads its start).
MAX_REQUEST_BYTES: Final = 8 * 1024 * 1024
#: The most dimensions a model's vectors may have (the guardian's config refuses more).
MAX_DIMS: Final = 4096

_WIRE: Final = np.dtype("<f4")
#: Room in a frame for the protobuf encoding around its texts or vectors (tags, lengths, the model id).
_FRAMING_ROOM: Final = 1024 * 1024
#: The longest request frame the embedder reads: MAX_REQUEST_BYTES of texts and their encoding.
MAX_REQUEST_FRAME_BYTES: Final = MAX_REQUEST_BYTES + _FRAMING_ROOM
#: The longest response frame the guardian reads: MAX_TEXTS vectors of MAX_DIMS, and their encoding.
MAX_RESPONSE_FRAME_BYTES: Final = MAX_TEXTS * MAX_DIMS * _WIRE.itemsize + _FRAMING_ROOM

_LENGTH: Final = struct.Struct(">I")


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


class FrameError(ConnectionError):
    """A frame over the reader's limit, or cut short by the peer: close the connection.

    A ConnectionError (so an OSError), because it ends the connection as a
    reset would: a caller that handles socket errors handles this too.
    """


def write_frame(sock: socket.socket, payload: bytes) -> None:
    """Send payload as one frame (its length, then it); OSError as sock.sendall raises it."""
    if len(payload) > 0xFFFF_FFFF:
        raise ValueError(f"a frame holds at most {0xFFFF_FFFF} bytes, not {len(payload)}")
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def read_frame(sock: socket.socket, limit: int, *, deadline: float | None = None) -> bytes | None:
    """The payload of the next frame on sock; None if the peer closed the connection before one began.

    FrameError if its length is over limit (nothing more is read) or the peer
    closes mid-frame; OSError as sock's reads raise it (TimeoutError included).
    deadline: a time.monotonic() by which the whole frame must have come; each
    read waits only what is left of it (the socket's timeout is changed). None:
    the socket's own timeout applies to each read.
    """
    header = bytearray(_LENGTH.size)
    got = _fill(sock, memoryview(header), deadline)
    if got == 0:
        return None
    if got < len(header):
        raise FrameError(f"the connection ended within a frame's length, {got} of {len(header)} bytes read")
    (length,) = _LENGTH.unpack(header)
    if length > limit:
        raise FrameError(f"a frame of {length} bytes is over the limit of {limit}")
    body = bytearray(length)
    got = _fill(sock, memoryview(body), deadline)
    if got < length:
        raise FrameError(f"the connection ended mid-frame, {got} of {length} bytes read")
    return bytes(body)


def _fill(sock: socket.socket, view: memoryview, deadline: float | None) -> int:
    """Read into view until it is full or the peer ends the connection; how many bytes came."""
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the frame did not come in time")
            sock.settimeout(left)
        count = sock.recv_into(view[got:])
        if count == 0:
            break
        got += count
    return got


def ask_once(path: str, request: bytes, timeout_s: float) -> bytes | None:
    """One request frame to the embedder at path on a fresh connection, and its answer's payload (None: it
    closed the connection without one); OSError (FrameError included) as the socket raises it.

    For the tools that look at an embedder from outside (readiness, probes); the guardian keeps its
    connections (guardian/recall/remote.py)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout_s)
        connection.connect(path)
        write_frame(connection, request)
        return read_frame(connection, MAX_RESPONSE_FRAME_BYTES)
