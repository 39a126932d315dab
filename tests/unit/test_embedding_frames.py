"""The frames the guardian and agent-embedder exchange (shared/embedding.py), on real Unix socket pairs."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from shared.embedding import (
    MAX_DIMS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_FRAME_BYTES,
    MAX_RESPONSE_FRAME_BYTES,
    MAX_TEXTS,
    FrameError,
    read_frame,
    write_frame,
)
from shared.rpc.embedder.v1 import embedder_pb2


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair of Unix stream sockets, reads on the second given up after 5 s."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader.settimeout(5)
    with writer, reader:
        yield writer, reader


def test_frames_come_back_whole_in_order_and_a_clean_end_is_none(pair: tuple[socket.socket, socket.socket]) -> None:
    writer, reader = pair
    big = bytes(range(256)) * 8192  # 2 MiB: far more than the socket holds, so it arrives in many reads
    payloads = [b"first", b"", big, b"last"]

    def send_all() -> None:
        for payload in payloads:
            write_frame(writer, payload)
        writer.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send_all)
    sender.start()
    got = [read_frame(reader, len(big)) for _ in payloads]
    sender.join()
    assert got == payloads
    assert read_frame(reader, len(big)) is None
    assert read_frame(reader, len(big)) is None  # and stays ended


def test_a_length_over_the_limit_is_refused_before_its_bytes_are_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    write_frame(writer, b"x" * 101)
    with pytest.raises(FrameError, match="a frame of 101 bytes is over the limit of 100"):
        read_frame(reader, 100)
    assert reader.recv(200) == b"x" * 101  # nothing of the frame was read (nor allocated)
    write_frame(writer, b"y" * 100)
    assert read_frame(reader, 100) == b"y" * 100  # exactly the limit is within it


@pytest.mark.parametrize(
    ("sent", "problem"),
    [
        (struct.pack(">I", 10) + b"12345", "ended mid-frame, 5 of 10 bytes read"),
        (struct.pack(">I", 10), "ended mid-frame, 0 of 10 bytes read"),
        (b"\x00\x00", "within a frame's length, 2 of 4 bytes read"),
    ],
)
def test_an_end_within_a_frame_is_an_error_not_a_short_frame(
    pair: tuple[socket.socket, socket.socket], sent: bytes, problem: str
) -> None:
    writer, reader = pair
    writer.sendall(sent)
    writer.shutdown(socket.SHUT_WR)
    with pytest.raises(FrameError, match=problem) as ended:
        read_frame(reader, 100)
    assert isinstance(ended.value, ConnectionError)  # a caller handling socket errors handles it too


def test_the_deadline_bounds_the_whole_frame_however_the_bytes_trickle(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    writer, reader = pair
    stop = threading.Event()

    def trickle() -> None:  # a byte every 50 ms: no single read waits long, the frame never completes
        writer.sendall(struct.pack(">I", 1000))
        while not stop.wait(0.05):
            writer.sendall(b"z")

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            read_frame(reader, 1000, deadline=started + 0.4)
    finally:
        stop.set()
        sender.join()
    assert 0.35 < time.monotonic() - started < 2.0


def test_the_largest_request_and_answer_fit_their_frames() -> None:
    """The limits of a request's texts, and of an answer's vectors, with the protobuf encoding around them."""
    request = embedder_pb2.EmbedRequest(texts=["t" * (MAX_REQUEST_BYTES // MAX_TEXTS)] * MAX_TEXTS)
    assert request.ByteSize() <= MAX_REQUEST_FRAME_BYTES
    answer = embedder_pb2.EmbedResponse(
        model="m" * 200, dims=MAX_DIMS, vectors=[b"\0" * (4 * MAX_DIMS)] * MAX_TEXTS, refused=""
    )
    assert answer.ByteSize() <= MAX_RESPONSE_FRAME_BYTES
    assert len(answer.SerializeToString()) == answer.ByteSize()
