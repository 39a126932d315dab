"""Thousands of connections, and clients that stall part-way through a request.

Nothing here reaches the request pipeline, so there is no request to audit; what
must hold is that a legitimate client on the same socket keeps being served within
its deadline while the attack is in progress, that the stalled requests leave no
trace (no row, no memory), and that the guardian lets go of the connections once
the attacker does.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

import grpc
import pytest

from tests.security.hostile import Agent, Attack, AuditWatch, cases, enrol, hostile_guardian
from tests.security.wire import DATA, END_HEADERS, HEADERS, PREFACE, frame, grpc_request_headers, open_http2
from tests.support.harness import Guardian, agent_pb2

pb = agent_pb2
CONNECTIONS: Final = 2000
#: Stalled requests: four times the 8 worker threads that serve each of the guardian's sockets.
STALLED_STREAMS: Final = 32
#: What the legitimate client allows each call (generous: the machine is shared and noisy).
DEADLINE_S: Final = 5.0
STORE_PATH: Final = "/guardian.v1.AgentService/Store"

ATTACKS: Final = (
    Attack("flood.idle-connections", f"{CONNECTIONS} connections held open, half of them mid-preface", audited_as=""),
    Attack("slow.partial-preface", "64 connections that send half the HTTP/2 preface and stall", audited_as=""),
    Attack("slow.preface-only", "64 connections that finish the HTTP/2 handshake and send nothing more", audited_as=""),
    Attack("slow.partial-frame", "64 connections that stall in the middle of a frame header", audited_as=""),
    Attack("slow.headers-no-body", f"{STALLED_STREAMS} requests whose headers arrive and body never", audited_as=""),
    Attack(
        "slow.partial-message", f"{STALLED_STREAMS} requests whose message stops short of its length", audited_as=""
    ),
)


@pytest.fixture(scope="module")
def guardian() -> Iterator[Guardian]:
    """A guardian started with room for the flood's file descriptors (the limit is inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * CONNECTIONS + 1024
    assert hard == resource.RLIM_INFINITY or hard >= wanted, f"RLIMIT_NOFILE hard limit {hard} < {wanted}"
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        with hostile_guardian() as started:
            yield started
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@dataclass
class Legit:
    """The well-behaved client that must keep being served, and a memory of its own."""

    agent: Agent
    memory_id: str


@pytest.fixture(scope="module")
def legit(guardian: Guardian) -> Iterator[Legit]:
    """An enrolled client with one memory, connected before any attack starts."""
    with enrol(guardian, "legit") as agent:
        yield Legit(agent, agent.store("still served").id)


def serve_legit(legit: Legit, rounds: int = 1) -> list[float]:
    """Rounds of Store, Get, Search and List, each within DEADLINE_S (the first failure raises); the latencies."""
    stub, session = legit.agent.stub, legit.agent.session
    calls: list[Callable[[], object]] = [
        lambda: stub.Store(
            pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content="more")), timeout=DEADLINE_S
        ),
        lambda: stub.Get(pb.GetRequest(session_id=session, id=legit.memory_id), timeout=DEADLINE_S),
        lambda: stub.Search(pb.SearchRequest(session_id=session, query="still served"), timeout=DEADLINE_S),
        lambda: stub.List(pb.ListRequest(session_id=session, page_size=5), timeout=DEADLINE_S),
    ]
    latencies = []
    for call in calls * rounds:
        started = time.monotonic()
        try:
            call()
        except grpc.RpcError as error:
            pytest.fail(f"the legitimate client was not served ({error.code().name}) while the attack held on")
        latencies.append(time.monotonic() - started)
    return latencies


def open_fds(guardian: Guardian) -> int:
    """How many file descriptors the guardian process holds."""
    assert guardian.process is not None
    return len(os.listdir(f"/proc/{guardian.process.pid}/fd"))


def _connect(path: str, first: bytes) -> socket.socket:
    """A raw Unix-socket connection that has sent first (perhaps nothing) and stays open."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if first:
        sock.sendall(first)
    return sock


def _stalled_requests(path: str, partial_message: bool) -> list[socket.socket]:
    """STALLED_STREAMS requests over 4 connections: headers sent, then (optionally) a message cut short."""
    socks = []
    per_connection = STALLED_STREAMS // 4
    for _ in range(4):
        sock = open_http2(path)
        for index in range(per_connection):
            stream = 1 + 2 * index
            sock.sendall(frame(HEADERS, END_HEADERS, stream, grpc_request_headers(STORE_PATH)))
            if partial_message:  # a 5-byte gRPC prefix promising 100 bytes, then 4 of them
                sock.sendall(frame(DATA, 0, stream, b"\x00" + struct.pack(">I", 100) + b"\x0a\x02ab"))
        socks.append(sock)
    return socks


ATTACKERS: Final[dict[str, Callable[[str], list[socket.socket]]]] = {
    "flood.idle-connections": lambda path: [
        _connect(path, b"PRI * HTTP/2.0\r\n" if index % 2 else b"") for index in range(CONNECTIONS)
    ],
    "slow.partial-preface": lambda path: [_connect(path, PREFACE[:12]) for _ in range(64)],
    "slow.preface-only": lambda path: [open_http2(path, settle_s=0.05) for _ in range(64)],
    "slow.partial-frame": lambda path: [_partial_frame(path) for _ in range(64)],
    "slow.headers-no-body": lambda path: _stalled_requests(path, partial_message=False),
    "slow.partial-message": lambda path: _stalled_requests(path, partial_message=True),
}


def _partial_frame(path: str) -> socket.socket:
    """A connection past the handshake that stops five bytes into a frame header."""
    sock = open_http2(path, settle_s=0.05)
    sock.sendall(frame(HEADERS, END_HEADERS, 1, grpc_request_headers(STORE_PATH))[:5])
    return sock


@pytest.mark.parametrize("attack", cases(ATTACKS))
def test_a_legitimate_client_is_served_during_the_attack(guardian: Guardian, legit: Legit, attack: Attack) -> None:
    serve_legit(legit)  # warm: the legitimate channel is connected before the attack
    fds_before = open_fds(guardian)
    watch = AuditWatch(guardian)
    attackers = ATTACKERS[attack.id](str(guardian.agent_socket))
    try:
        time.sleep(0.3)  # let the guardian accept and read what the attackers sent
        latencies = serve_legit(legit, rounds=2)
        assert max(latencies) < DEADLINE_S
    finally:
        for sock in attackers:
            with contextlib.suppress(OSError):
                sock.close()
        recover(legit.agent)
    rows = watch.rows()
    legit_rows = [row for row in rows if row["agent"] == legit.agent.name]
    assert legit_rows and all(row["decision"] == "allow" for row in legit_rows), legit_rows
    # A stalled request that its client abandons (or that runs out of time) never reached an agent,
    # but it is still audited: a refused store with no caller, nothing stored.
    stalled = [row for row in rows if row["agent"] != legit.agent.name]
    assert len(stalled) <= (STALLED_STREAMS if attack.id.startswith("slow.") else 0), stalled
    for row in stalled:
        assert (row["operation"], row["decision"], row["agent"]) == ("memory.store", "deny", ""), row
        assert row["reason"].startswith("invalid_argument: "), row
    with guardian.keyed_db() as db:
        planted = db.execute("SELECT count(*) FROM memories WHERE agent != ?", (legit.agent.name,)).fetchone()[0]
    assert planted == 0, "a stalled request stored something"
    deadline = time.monotonic() + 10
    while open_fds(guardian) > fds_before + 16 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_fds(guardian) <= fds_before + 16, "the guardian keeps the attacker's connections after they closed"


def recover(agent: Agent) -> None:
    """After the attacker lets go, the guardian serves again (and has drained what queued meanwhile)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            agent.stub.List(pb.ListRequest(session_id=agent.session, page_size=1), timeout=DEADLINE_S)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
