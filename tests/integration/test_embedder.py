"""agent-embedder: the transformer in its own process, the guardian's use of it, and what happens when it is away.

Real processes throughout: an agent-embedder on a Unix socket running the pinned
all-MiniLM-L6-v2, and a guardian configured with ``embedding: {model: service}``.
The one stand-in is a hostile embedder at the socket (the seam: the same frames,
shared/embedding.py), to show that the guardian checks what comes back.
"""

from __future__ import annotations

import re
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from embedder.model_files import shipped_files
from guardian.state.config import load_config
from guardian.state.statedir import init_state_dir
from shared.embedding import (
    MAX_REQUEST_BYTES,
    MAX_REQUEST_FRAME_BYTES,
    MAX_TEXTS,
    TRANSFORMER_DIMS,
    TRANSFORMER_ID,
    read_frame,
    to_wire,
    write_frame,
)
from shared.errors import ConfigError
from shared.rpc.embedder.v1 import embedder_pb2
from shared.rpc.guardian.v1 import admin_pb2
from tests.integration.test_recall import NOTES, POLICY, QUESTIONS, search, session, store
from tests.support.harness import (
    ROOT,
    Embedder,
    Guardian,
    agent_pb2,
    embed,
    embed_request,
    running_embedder,
    running_guardian,
)

pb = agent_pb2


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp for sockets (a Unix socket's path must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="ag-emb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def service_config(socket_path: Path) -> dict[str, Any]:
    return {"embedding": {"model": "service", "socket": str(socket_path)}}


def wait_for(predicate: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def request_on(connection: socket.socket, texts: list[str]) -> embedder_pb2.EmbedResponse:
    """One request and its answer on an open connection (which stays open)."""
    write_frame(connection, embedder_pb2.EmbedRequest(texts=texts).SerializeToString())
    frame = read_frame(connection, MAX_REQUEST_FRAME_BYTES)
    assert frame is not None, "the embedder closed the connection without an answer"
    return embedder_pb2.EmbedResponse.FromString(frame)


def test_the_embedder_serves_unit_vectors_of_the_pinned_model_and_refuses_oversized_requests(short_dir: Path) -> None:
    with running_embedder(short_dir) as embedder:
        assert oct(embedder.socket.stat().st_mode & 0o777) == "0o660"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(10)
            connection.connect(str(embedder.socket))
            texts = ["the walrus hums at midnight", "a sea mammal singing late at night", "quarterly tax filing"]
            answer = request_on(connection, texts)
            assert (answer.model, answer.dims, len(answer.vectors), answer.refused) == (
                TRANSFORMER_ID,
                TRANSFORMER_DIMS,
                3,
                "",
            )
            vectors = np.stack([np.frombuffer(data, dtype="<f4") for data in answer.vectors])
            assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
            assert vectors[0] @ vectors[1] > 0.4 > vectors[0] @ vectors[2]
            again = request_on(connection, texts[:1])
            assert again.vectors[0] == answer.vectors[0]  # alone or beside others: the same vector
            for request, limit in (
                (["x"] * (MAX_TEXTS + 1), f"texts: at most {MAX_TEXTS} a request, got {MAX_TEXTS + 1}"),
                (
                    ["y" * (MAX_REQUEST_BYTES // 2 + 1)] * 2,
                    f"texts: at most {MAX_REQUEST_BYTES} bytes a request, got {MAX_REQUEST_BYTES + 2}",
                ),
            ):
                refused = request_on(connection, request)
                assert (refused.refused, refused.model, list(refused.vectors)) == (limit, "", [])
            # Refused whole, and the connection still serves.
            assert request_on(connection, texts[:1]).vectors[0] == answer.vectors[0]
    log = embedder.log_path.read_text()
    assert '"event": "embedder_ready"' in log and "walrus" not in log and not embedder.socket.exists()
    assert log.count('"event": "embed_request_refused"') == 2


def test_a_frame_that_is_not_a_request_is_refused_and_the_embedder_serves_on(short_dir: Path) -> None:
    # A connection open meanwhile, which the refusals on the others leave serving.
    with running_embedder(short_dir) as embedder, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.settimeout(10)
        other.connect(str(embedder.socket))
        assert len(request_on(other, ["a narwhal, before"]).vectors) == 1
        garbage = embed_request(embedder.socket, b"\xff\xff\xff\xff not protobuf")
        assert garbage is not None and garbage.refused.startswith("not an EmbedRequest: ") and not garbage.vectors
        unknown = embed_request(embedder.socket, b"\x12\x03abc")  # field 2: parses, but is not ours
        assert unknown is not None and "fields this embedder does not know" in unknown.refused
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as huge:  # over the limit: refused unread
            huge.settimeout(10)
            huge.connect(str(embedder.socket))
            huge.sendall(struct.pack(">I", MAX_REQUEST_FRAME_BYTES + 1))
            frame = read_frame(huge, MAX_REQUEST_FRAME_BYTES)
            assert frame is not None and "over the limit" in embedder_pb2.EmbedResponse.FromString(frame).refused
            assert read_frame(huge, MAX_REQUEST_FRAME_BYTES) is None  # then closed
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as cut:  # a frame cut short: no harm done
            cut.connect(str(embedder.socket))
            cut.sendall(struct.pack(">I", 100) + b"\x0a\x05")
        assert len(request_on(other, ["after"]).vectors) == 1
        assert len(embed(embedder.socket, ["and on a new connection"]).vectors) == 1
    log = embedder.log_path.read_text()
    assert log.count('"event": "embed_request_refused"') == 4 and "narwhal" not in log


def test_a_model_file_that_is_not_the_pinned_one_stops_the_embedder_with_the_reason(short_dir: Path) -> None:
    shipped = shipped_files()
    weights = short_dir / "model.safetensors"
    weights.write_bytes(shipped.weights.read_bytes()[:-1] + b"\0")
    result = subprocess.run(
        [sys.executable, "-m", "embedder", "--socket", str(short_dir / "e.sock"), "--weights", str(weights),
         "--weights-sha256", shipped.weights_sha256, "--tokenizer", str(shipped.tokenizer), "--tokenizer-sha256",
         shipped.tokenizer_sha256, "--config", str(shipped.config), "--config-sha256", shipped.config_sha256],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"the weights file {weights} has sha256 " in result.stderr and f"not the {shipped.weights_sha256}" in (
        result.stderr
    )
    assert not (short_dir / "e.sock").exists()
    partial = subprocess.run(
        [sys.executable, "-m", "embedder", "--socket", str(short_dir / "e.sock"), "--weights", str(weights)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert partial.returncode == 2 and "needs all of --weights" in partial.stderr


def test_the_guardian_recalls_by_meaning_through_the_embedder(short_dir: Path) -> None:
    with running_embedder(short_dir) as embedder, running_guardian(service_config(embedder.socket), **POLICY) as g:
        token = g.add_agent("alice")
        channel, stub, sid = session(g, token)
        with channel:
            ids = {name: store(stub, sid, text) for name, text in NOTES.items()}
            for name, question in QUESTIONS.items():
                found = search(stub, sid, question, pb.SEARCH_MODE_SEMANTIC)
                assert found.hits[0].memory.id == ids[name] and not found.semantic_pending
        status = g.admin("Status", admin_pb2.StatusRequest())
        assert status.embedding_model == TRANSFORMER_ID and status.vectors_indexed == len(NOTES)
        with g.keyed_db() as db:
            sizes = {row[0] for row in db.execute("SELECT length(vector) FROM memory_vectors")}
        assert sizes == {4 + TRANSFORMER_DIMS}


def test_without_the_embedder_writes_go_on_searches_say_so_and_it_catches_up_when_back(short_dir: Path) -> None:
    socket_path = short_dir / "embedder.sock"
    with running_guardian(service_config(socket_path), **POLICY) as guardian:
        token = guardian.add_agent("bob")
        channel, stub, sid = session(guardian, token)
        with channel:
            stored = store(stub, sid, NOTES["dentist"])  # no embedder yet: stored, not embedded
            by_words = search(stub, sid, "dentist appointment")
            assert by_words.hits[0].memory.id == stored and by_words.semantic_pending
            with pytest.raises(grpc.RpcError) as refused:
                search(stub, sid, QUESTIONS["dentist"], pb.SEARCH_MODE_SEMANTIC)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            details = str(refused.value.details())
            assert "search with mode lexical" in details and str(socket_path) not in details
            status = guardian.admin("Status", admin_pb2.StatusRequest())
            assert status.memories_to_embed == 1 and status.vectors_indexed == 0

            embedder = Embedder(socket_path, short_dir / "embedder-test.log")
            embedder.start()
            try:
                wait_for(
                    lambda: guardian.admin("Status", admin_pb2.StatusRequest()).memories_to_embed == 0,
                    "the memory stored while the embedder was away is embedded",
                )
                found = search(stub, sid, QUESTIONS["dentist"], pb.SEARCH_MODE_SEMANTIC)
                assert found.hits[0].memory.id == stored
            finally:
                embedder.stop()
        searches = [row for row in guardian.audit_rows() if row["operation"] == "memory.search"]
        assert [row["decision"] for row in searches] == ["allow", "error", "allow"]  # unavailable: not a denial
        log = guardian.log_path.read_text()
        assert '"event": "embedder_unavailable"' in log and '"event": "embedder_available"' in log


def hostile_answer(answer: str, count: int) -> embedder_pb2.EmbedResponse:
    """What a compromised embedder might send for a request of count texts."""
    unit = np.zeros(TRANSFORMER_DIMS, dtype=np.float32)
    unit[0] = 1.0
    if answer == "another model":
        return embedder_pb2.EmbedResponse(model="evil-384", dims=TRANSFORMER_DIMS, vectors=[to_wire(unit)] * count)
    if answer == "not unit vectors":
        return embedder_pb2.EmbedResponse(
            model=TRANSFORMER_ID, dims=TRANSFORMER_DIMS, vectors=[to_wire(unit * 40)] * count
        )
    return embedder_pb2.EmbedResponse(model=TRANSFORMER_ID, dims=TRANSFORMER_DIMS, vectors=[])  # too few


class _HostileConnection(socketserver.BaseRequestHandler):
    """Answers every request on a connection with the server's hostile answer."""

    server: _HostileEmbedder

    def handle(self) -> None:
        while (frame := read_frame(self.request, MAX_REQUEST_FRAME_BYTES)) is not None:
            count = len(embedder_pb2.EmbedRequest.FromString(frame).texts)
            write_frame(self.request, hostile_answer(self.server.answer, count).SerializeToString())


class _HostileEmbedder(socketserver.ThreadingUnixStreamServer):
    """A stand-in for agent-embedder, on the same frames, that answers as a compromised one might."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, answer: str) -> None:
        self.answer = answer
        super().__init__(str(path), _HostileConnection)


@pytest.mark.parametrize("answer", ["another model", "not unit vectors", "too few vectors"])
def test_the_guardian_refuses_what_a_hostile_embedder_answers(short_dir: Path, answer: str) -> None:
    socket_path = short_dir / "embedder.sock"
    server = _HostileEmbedder(socket_path, answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with running_guardian(service_config(socket_path), **POLICY) as guardian:
            token = guardian.add_agent("carol")
            channel, stub, sid = session(guardian, token)
            with channel:
                stored = store(stub, sid, NOTES["flight"])
                assert search(stub, sid, "Lisbon trip").hits[0].memory.id == stored
                with pytest.raises(grpc.RpcError) as refused:
                    search(stub, sid, QUESTIONS["flight"], pb.SEARCH_MODE_SEMANTIC)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            with guardian.keyed_db() as db:
                assert db.execute("SELECT count(*) FROM memory_vectors").fetchone()[0] == 0
            check_security_log(guardian)
    finally:
        server.shutdown()
        server.server_close()


def check_security_log(guardian: Guardian) -> None:
    log = guardian.log_path.read_text()
    assert '"event": "embedder_answer_refused"' in log
    assert "Lisbon" not in log  # the texts sent are never logged


def test_moving_from_the_static_model_to_the_embedder_embeds_every_memory_again(short_dir: Path) -> None:
    with running_guardian(**POLICY) as guardian:  # the static model in the guardian
        token = guardian.add_agent("dave")
        channel, stub, sid = session(guardian, token)
        with channel:
            ids = {name: store(stub, sid, text) for name, text in NOTES.items()}
        assert guardian.admin("Status", admin_pb2.StatusRequest()).embedding_model.startswith("static-256-")
        assert guardian.stop() == 0
        with running_embedder(short_dir) as embedder:
            guardian.set_config(**service_config(embedder.socket))
            guardian.start()

            def caught_up() -> bool:
                status = guardian.admin("Status", admin_pb2.StatusRequest())
                return bool(status.recall_index_ready and status.memories_to_embed == 0 and status.vectors_indexed == 4)

            wait_for(caught_up, "every memory embedded again by the new model")
            assert guardian.admin("Status", admin_pb2.StatusRequest()).embedding_model == TRANSFORMER_ID
            channel, stub, sid = session(guardian, token)
            with channel:
                for name, question in QUESTIONS.items():
                    assert search(stub, sid, question, pb.SEARCH_MODE_SEMANTIC).hits[0].memory.id == ids[name]
            with guardian.keyed_db() as db:
                rows = db.execute("SELECT DISTINCT model, length(vector) FROM memory_vectors").fetchall()
            assert rows == [(TRANSFORMER_ID, 4 + TRANSFORMER_DIMS)]
            assert '"event": "embedding_done"' in guardian.log_path.read_text()
            assert guardian.stop() == 0
            guardian.process = None


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"model": "service"}, "embedding.socket"),
        ({"model": "service", "socket": "run/e.sock", "dims": 385}, "must be even, got 385"),
        ({"model": "service", "socket": "run/e.sock", "model_id": "Bad Id!"}, "embedding.model_id"),
        ({"model": "onnx"}, "expected service, builtin or static, got 'onnx'"),
    ],
)
def test_a_bad_embedding_section_is_refused_naming_the_key(
    tmp_path: Path, section: dict[str, Any], problem: str
) -> None:
    config_path = init_state_dir(tmp_path / "state").config
    config = yaml.safe_load(config_path.read_text())
    config["embedding"] = section
    config_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(config_path)
