"""The guardian's client of agent-embedder (guardian/recall/remote.py) over its transport.

The stand-in at the seam is an embedder on a real Unix socket that speaks the
same frames, answers as each test says, and counts connections and requests.
(The real embedder and guardian together: tests/integration/test_embedder.py.)
"""

from __future__ import annotations

import logging
import shutil
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from guardian.recall.remote import RemoteEmbedder
from shared.embedding import MAX_REQUEST_FRAME_BYTES, read_frame, to_wire, write_frame
from shared.errors import Unavailable
from shared.rpc.embedder.v1 import embedder_pb2

MODEL = "test-model-8"
DIMS = 8
Answer = Callable[[embedder_pb2.EmbedRequest], embedder_pb2.EmbedResponse | None]


def unit_vectors(request: embedder_pb2.EmbedRequest) -> embedder_pb2.EmbedResponse:
    """A good answer: a unit vector a text, of MODEL."""
    unit = np.zeros(DIMS, dtype=np.float32)
    unit[0] = 1.0
    return embedder_pb2.EmbedResponse(model=MODEL, dims=DIMS, vectors=[to_wire(unit)] * len(request.texts))


class _Connection(socketserver.BaseRequestHandler):
    server: _StandIn

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections += 1
        while (frame := read_frame(self.request, MAX_REQUEST_FRAME_BYTES)) is not None:
            with self.server.lock:
                self.server.requests += 1
            answer = self.server.answer(embedder_pb2.EmbedRequest.FromString(frame))
            if answer is None:  # say nothing until the guardian gives up
                self.server.hold.wait(10)
                return
            write_frame(self.request, answer.SerializeToString())


class _StandIn(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, answer: Answer) -> None:
        self.path = path
        self.answer = answer
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.connections = 0
        self.requests = 0
        super().__init__(str(path), _Connection)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ag-emc-", dir="/tmp"))  # a Unix socket's path must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stand_in(socket_dir: Path) -> Iterator[Callable[[Answer], _StandIn]]:
    """Starts a stand-in embedder that answers so; each is stopped after the test."""
    started: list[_StandIn] = []

    def start(answer: Answer) -> _StandIn:
        server = _StandIn(socket_dir / "e.sock", answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.hold.set()
        server.shutdown()
        server.server_close()


def test_each_calling_thread_keeps_one_connection(stand_in: Callable[[Answer], _StandIn]) -> None:
    server = stand_in(unit_vectors)
    client = RemoteEmbedder(server.path, MODEL, DIMS)
    try:
        for _ in range(3):
            assert len(client.embed_many(["a", "b"])) == 2
        others = [threading.Thread(target=client.embed_many, args=(["c"],)) for _ in range(2)]
        for thread in others:
            thread.start()
        for thread in others:
            thread.join()
        assert (server.connections, server.requests) == (3, 5)
    finally:
        client.close()


def test_a_refused_request_is_unavailable_logged_and_not_a_security_event(
    stand_in: Callable[[Answer], _StandIn], caplog: pytest.LogCaptureFixture
) -> None:
    server = stand_in(lambda request: embedder_pb2.EmbedResponse(refused="texts: at most 256 a request, got 300"))
    client = RemoteEmbedder(server.path, MODEL, DIMS)
    try:
        with caplog.at_level(logging.INFO), pytest.raises(Unavailable, match="search with mode lexical"):
            client.embed("a walrus")
        events = [(record.name, getattr(record, "event", "")) for record in caplog.records]
        assert ("agent_guardian", "embedder_request_refused") in events
        assert ("agent_guardian", "embedder_unavailable") in events
        assert not [name for name, _ in events if name == "agent_guardian.security"]
        assert "walrus" not in caplog.text
        with pytest.raises(Unavailable):
            client.embed("again")  # fails at once for a while: the embedder is not asked
        assert server.requests == 1
    finally:
        client.close()


def test_an_embedder_that_does_not_answer_is_given_up_on_at_the_timeout(
    stand_in: Callable[[Answer], _StandIn],
) -> None:
    server = stand_in(lambda request: None)
    client = RemoteEmbedder(server.path, MODEL, DIMS)
    started = time.monotonic()
    try:
        with pytest.raises(Unavailable):
            client.embed("a")
    finally:
        client.close()
    assert 2.0 <= time.monotonic() - started < 4.0  # the floor, 2 s, and 0.05 s a text


def test_close_ends_a_call_waiting_in_another_thread(stand_in: Callable[[Answer], _StandIn]) -> None:
    server = stand_in(lambda request: None)
    client = RemoteEmbedder(server.path, MODEL, DIMS)
    outcome: list[BaseException] = []

    def wait() -> None:
        try:
            client.embed("a")
        except Unavailable as error:
            outcome.append(error)

    waiting = threading.Thread(target=wait)
    waiting.start()
    deadline = time.monotonic() + 5
    while server.requests == 0:
        assert time.monotonic() < deadline, "the request never reached the stand-in"
        time.sleep(0.01)
    started = time.monotonic()
    client.close()
    waiting.join(5)
    assert not waiting.is_alive() and len(outcome) == 1
    assert time.monotonic() - started < 1.0  # woken by close, not by its 2 s timeout
