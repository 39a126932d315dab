"""Key rotation on a running guardian under load: no request fails for good, nothing stops verifying.

Each ring (memory, audit and token HMAC keys, the database key) is rotated with guardianctl
while clients store and read; calls during a rotation wait (or, at worst, get a retryable
error), old data still verifies, the keys survive a restart, and re-signing then retiring
an old memory key leaves every memory verifying under the new one.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import sqlcipher3

from guardian.keys.ring import load_keys
from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, running_guardian

pb = agent_pb2
HEAVY = {"burst": 100_000, "per_minute": 6_000_000}
WIDE_OPEN = {"session": {"reads": HEAVY, "writes": HEAVY}, "agent": {"reads": HEAVY, "writes": HEAVY}}


class Traffic:
    """Clients storing and reading until stopped; each call retried only on UNAVAILABLE."""

    def __init__(self, guardian: Guardian, token: str, clients: int = 3) -> None:
        self._guardian, self._token = guardian, token
        self.acked: list[tuple[str, str]] = []
        self.errors: Counter[str] = Counter()
        self.retried = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]

    def _call(self, call: Any) -> Any:
        for _ in range(50):
            try:
                return call()
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    self.errors[f"{error.code().name}: {error.details()}"] += 1
                    return None
                self.retried += 1
                time.sleep(0.1)
        self.errors["UNAVAILABLE for 5 s"] += 1
        return None

    def _run(self, number: int) -> None:
        channel, stub = self._guardian.agent_stub()
        with channel:
            session = stub.OpenSession(pb.OpenSessionRequest(agent_token=self._token)).session_id
            count = 0
            while not self._stop.is_set():
                content = f"rotation note {number}-{count}"
                key = f"rotation-{number}-{count:08d}"
                stored = self._call(
                    lambda c=content, k=key: stub.Store(
                        pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=c), idempotency_key=k),
                        timeout=30,
                    )
                )
                if stored is not None:
                    self.acked.append((stored.memory.id, content))
                if self.acked:
                    memory_id, expected = random.choice(self.acked)
                    got = self._call(lambda m=memory_id: stub.Get(pb.GetRequest(session_id=session, id=m), timeout=30))
                    if got is not None and got.memory.content != expected:
                        self.errors["a read returned other content"] += 1
                count += 1

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


@pytest.fixture
def busy() -> Iterator[tuple[Guardian, str]]:
    with running_guardian(rate_limits=WIDE_OPEN, anomaly=LOG_ONLY_ANOMALIES) as guardian:
        yield guardian, guardian.add_agent("rotator")


def keys_listed(guardian: Guardian) -> list[dict[str, Any]]:
    listed = guardian.ctl("--json", "keys", "list")
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    return rows


def primary(guardian: Guardian, ring: str) -> str:
    key_id: str = next(row["key_id"] for row in keys_listed(guardian) if row["ring"] == ring and row["primary"])
    return key_id


def read_all(guardian: Guardian, token: str, acked: list[tuple[str, str]]) -> None:
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        for memory_id, content in acked:
            assert stub.Get(pb.GetRequest(session_id=session, id=memory_id)).memory.content == content


def test_every_ring_rotates_under_load_and_nothing_fails(busy: tuple[Guardian, str]) -> None:
    guardian, token = busy
    with Traffic(guardian, token) as traffic:
        time.sleep(0.5)
        for ring in ("memory", "audit", "token", "database"):
            rotated = guardian.ctl("--json", "keys", "rotate", ring)
            assert rotated.returncode == 0, rotated.stderr
            assert json.loads(rotated.stdout) == {
                "ring": ring,
                "key_id": "r1",
                "previous": "base" if ring == "database" else "k1",
            }
            time.sleep(0.4)
    print(
        f"\n  [key rotation] {len(traffic.acked)} writes acknowledged, {traffic.retried} retried calls during rotations"
    )
    assert not traffic.errors, traffic.errors
    assert len(traffic.acked) > 20
    assert {ring: primary(guardian, ring) for ring in ("memory", "audit", "token", "database")} == dict.fromkeys(
        ("memory", "audit", "token", "database"), "r1"
    )
    read_all(guardian, token, traffic.acked)  # memories signed with k1 and with r1 both verify
    assert guardian.ctl("audit", "verify").returncode == 0  # rows sealed with k1, then with r1
    base_key = load_keys(guardian.state_dir / "keys").database_hex
    with pytest.raises(sqlcipher3.DatabaseError):  # the file is no longer under the base key
        connection = sqlcipher3.connect(str(guardian.database))
        connection.execute(f"PRAGMA key = \"x'{base_key}'\"")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
    rows = [row for row in guardian.audit_rows() if row["operation"] == "admin.keys.rotate"]
    assert [row["object_id"] for row in rows] == ["memory:r1", "audit:r1", "token:r1", "database:r1"]
    assert {row["key_id"] for row in guardian.audit_rows()} == {"k1", "r1"}
    guardian.stop()
    guardian.start()  # the rotated keys were kept: everything still opens and verifies
    read_all(guardian, token, traffic.acked[:50])
    assert guardian.ctl("audit", "verify").returncode == 0
    assert (guardian.state_dir / "rotated-keys.json").stat().st_mode & 0o777 == 0o600
    assert token not in (guardian.state_dir / "rotated-keys.json").read_text()


def test_resign_then_retire_an_old_memory_key(busy: tuple[Guardian, str]) -> None:
    guardian, token = busy
    with Traffic(guardian, token, clients=1) as traffic:
        time.sleep(0.3)
        assert guardian.ctl("keys", "rotate", "memory").returncode == 0
        time.sleep(0.3)
        assert guardian.ctl("keys", "rotate", "memory").returncode == 0
        time.sleep(0.3)
    in_use = {row["key_id"]: row["in_use"] for row in keys_listed(guardian) if row["ring"] == "memory"}
    assert in_use["k1"] > 0 and in_use["r1"] > 0 and in_use["r2"] > 0
    refused = guardian.ctl("keys", "retire", "memory", "r1")
    assert refused.returncode == 1 and "still signed with r1" in refused.stderr
    resigned = guardian.ctl("--json", "keys", "resign")
    assert resigned.returncode == 0, resigned.stderr
    assert json.loads(resigned.stdout)["resigned"] == in_use["k1"] + in_use["r1"]
    assert guardian.ctl("keys", "retire", "memory", "r1").returncode == 0
    listed = {row["key_id"]: row for row in keys_listed(guardian) if row["ring"] == "memory"}
    assert listed["r1"]["retired"] and listed["r2"]["primary"] and listed["r2"]["in_use"] == len(traffic.acked)
    read_all(guardian, token, traffic.acked)
    for ring, key_id, message in (
        ("memory", "r2", "signs new memory data"),
        ("memory", "k1", "not a key the guardian rotated in"),
        ("audit", "k1", "k1 signs new audit data"),  # audit and database keys: test_key_retirement.py
    ):
        result = guardian.ctl("keys", "retire", ring, key_id)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    signing = guardian.ctl("keys", "retire", "audit-signing", "r1")
    assert signing.returncode == 2  # argparse: audit-signing keys are never retired (their public keys verify)


def test_a_list_cursor_from_before_a_memory_key_rotation_still_opens(busy: tuple[Guardian, str]) -> None:
    guardian, token = busy
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        for number in range(5):
            stub.Store(pb.StoreRequest(session_id=session, memory=pb.MemoryDraft(content=f"page {number}")))
        page = stub.List(pb.ListRequest(session_id=session, page_size=2))
        assert guardian.ctl("keys", "rotate", "memory").returncode == 0
        following = stub.List(pb.ListRequest(session_id=session, page_size=2, cursor=page.next_cursor))
        assert len(following.memories) == 2


def test_agent_token_rotation_with_and_without_a_grace_period(busy: tuple[Guardian, str]) -> None:
    guardian, old = busy
    channel, stub = guardian.agent_stub()
    with channel:
        open_before = stub.OpenSession(pb.OpenSessionRequest(agent_token=old)).session_id
        rotated = guardian.ctl("--json", "agents", "rotate-token", "rotator", "--grace", "2s")
        assert rotated.returncode == 0, rotated.stderr
        new = json.loads(rotated.stdout)["token"]
        assert new != old and new.startswith("agt_")
        stub.OpenSession(pb.OpenSessionRequest(agent_token=old))  # within its grace period
        stub.OpenSession(pb.OpenSessionRequest(agent_token=new))
        time.sleep(2.2)
        with pytest.raises(grpc.RpcError) as caught:
            stub.OpenSession(pb.OpenSessionRequest(agent_token=old))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.List(pb.ListRequest(session_id=open_before))  # sessions already open stay open
        again = json.loads(guardian.ctl("--json", "agents", "rotate-token", "rotator").stdout)["token"]
        with pytest.raises(grpc.RpcError) as caught:
            stub.OpenSession(pb.OpenSessionRequest(agent_token=new))  # no grace: the old one ends now
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub.OpenSession(pb.OpenSessionRequest(agent_token=again))
    output = guardian.log_path.read_text()
    assert new not in output and again not in output
    rows = [row for row in guardian.audit_rows() if row["operation"] == "admin.agent.rotate_token"]
    assert len(rows) == 2 and all(new not in json.dumps(row) for row in rows)
