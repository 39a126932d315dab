"""Backups with guardianctl against a real guardian: online during writes, encrypted, verified, restored.

`backup create` runs while clients write; the copy holds every write acknowledged before
it began, is not readable as SQLite, and verifies (integrity, cipher integrity, HMACs,
audit chain). A copy damaged at the page level or at the HMAC level fails `backup verify`
and `backup restore` refuses it without changing anything. A restore (offline) puts a
verified backup in place, keeps the database it replaced, and records itself in the trail.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from guardian.keys.rotated import load_all_keys
from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, running_guardian

pb = agent_pb2
HEAVY = {"burst": 100_000, "per_minute": 6_000_000}
WIDE_OPEN = {"session": {"reads": HEAVY, "writes": HEAVY}, "agent": {"reads": HEAVY, "writes": HEAVY}}


class Writer:
    """A client storing memories as fast as it can, noting each acknowledged id and when."""

    def __init__(self, guardian: Guardian, token: str) -> None:
        self.channel, self.stub = guardian.agent_stub()
        self.session = self.stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        self.acked: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            content = f"backup load note {number}"
            memory = self.stub.Store(
                pb.StoreRequest(session_id=self.session, memory=pb.MemoryDraft(content=content)), timeout=20
            ).memory
            self.acked.append((time.monotonic(), memory.id, content))
            number += 1

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.channel.close()


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[tuple[Guardian, str]]:
    with running_guardian(
        config={"backup": {"keep": 2}}, rate_limits=WIDE_OPEN, anomaly=LOG_ONLY_ANOMALIES
    ) as guardian:
        token = guardian.add_agent("writer")
        yield guardian, token


def ids_in(path: Path, guardian: Guardian) -> set[str]:
    import sqlcipher3

    key = load_all_keys(guardian.state_dir / "keys", guardian.state_dir).database_hex
    connection = sqlcipher3.connect(str(path))
    connection.execute(f"PRAGMA key = \"x'{key}'\"")
    try:
        return {row[0] for row in connection.execute("SELECT id FROM memories").fetchall()}
    finally:
        connection.close()


def test_an_online_backup_during_writes_is_encrypted_verified_and_complete(
    loaded: tuple[Guardian, str], tmp_path: Path
) -> None:
    guardian, token = loaded
    copy = tmp_path / "copy.db"
    with Writer(guardian, token) as writer:
        time.sleep(0.5)
        started = time.monotonic()
        made = guardian.ctl("--json", "backup", "create", str(copy))
        finished = time.monotonic()
        time.sleep(0.3)
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["ok"] and info["copied_to"] == str(copy)
    assert info["integrity"] == "ok" and info["cipher_integrity"] == "ok" and info["audit"] == "ok"
    assert info["memories_checked"] == info["memories"] > 0 and info["memories_failed"] == []
    assert copy.read_bytes()[:16] != b"SQLite format 3\x00" and copy.stat().st_mode & 0o777 == 0o600
    in_copy = ids_in(copy, guardian)
    before = {memory_id for at, memory_id, _ in writer.acked if at < started}
    during = [memory_id for at, memory_id, _ in writer.acked if started <= at <= finished]
    assert before and before <= in_copy, "a write acknowledged before the backup began is missing from it"
    assert during, "no write was acknowledged while the backup ran: it was not online"
    assert (guardian.state_dir / "backups" / info["name"]).read_bytes() == copy.read_bytes()
    offline = guardian.ctl("--json", "backup", "verify", str(copy), offline=True)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["ok"]
    again = guardian.ctl("backup", "verify", info["name"])
    assert again.returncode == 0 and "verified" in again.stdout
    rows = [row for row in guardian.audit_rows() if row["operation"].startswith("admin.backup.")]
    assert [row["operation"] for row in rows][:1] == ["admin.backup.create"]
    assert {row["decision"] for row in rows} == {"allow"}
    assert any(row["operation"] == "admin.backup.read" for row in rows)


def test_the_guardian_keeps_only_the_newest_generations(loaded: tuple[Guardian, str]) -> None:
    guardian, _ = loaded
    names = []
    for _ in range(3):
        made = guardian.ctl("--json", "backup", "create")
        assert made.returncode == 0, made.stderr
        names.append(json.loads(made.stdout)["name"])
        time.sleep(0.01)
    listed = json.loads(guardian.ctl("--json", "backup", "list").stdout)
    assert [row["name"] for row in listed] == names[:0:-1]  # keep: 2, newest first
    assert sorted(path.name for path in (guardian.state_dir / "backups").iterdir()) == sorted(names[1:])


def _damage_a_page(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage_a_memory(path: Path, guardian: Guardian) -> None:
    import sqlcipher3

    key = load_all_keys(guardian.state_dir / "keys", guardian.state_dir).database_hex
    connection = sqlcipher3.connect(str(path), isolation_level=None)
    connection.execute(f"PRAGMA key = \"x'{key}'\"")
    connection.execute("UPDATE memories SET content = content || ' (altered)' WHERE rowid = 1")
    connection.close()


@pytest.mark.parametrize("damage", ["page", "memory"])
def test_a_damaged_backup_fails_verify_and_restore_changes_nothing(
    loaded: tuple[Guardian, str], tmp_path: Path, damage: str
) -> None:
    guardian, token = loaded
    with Writer(guardian, token):
        time.sleep(0.3)
    copy = tmp_path / "copy.db"
    assert guardian.ctl("backup", "create", str(copy)).returncode == 0
    if damage == "page":
        _damage_a_page(copy)
    else:
        _damage_a_memory(copy, guardian)
    checked = guardian.ctl("--json", "backup", "verify", str(copy), offline=True)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert not report["ok"]
    if damage == "memory":
        assert len(report["memories_failed"]) == 1 and report["integrity"] == "ok"
    guardian.stop()
    before = guardian.database.read_bytes()
    refused = guardian.ctl("backup", "restore", str(copy), offline=True)
    assert refused.returncode == 2 and "failed its verification" in refused.stderr, refused.stderr
    assert guardian.database.read_bytes() == before
    assert not list(guardian.database.parent.glob("*.replaced-*"))
    guardian.start()


def test_restore_puts_a_backup_in_place_and_records_it(loaded: tuple[Guardian, str], tmp_path: Path) -> None:
    guardian, token = loaded
    with Writer(guardian, token) as writer:
        time.sleep(0.3)
    kept = {memory_id for _, memory_id, _ in writer.acked}
    copy = tmp_path / "copy.db"
    assert guardian.ctl("backup", "create", str(copy)).returncode == 0
    with Writer(guardian, token) as later:
        time.sleep(0.2)
    lost = {memory_id for _, memory_id, _ in later.acked}
    running = guardian.ctl("backup", "restore", str(copy), offline=True)
    assert running.returncode == 2 and "another guardian is running" in running.stderr
    guardian.stop()
    restored = guardian.ctl("--json", "backup", "restore", str(copy), offline=True)
    assert restored.returncode == 0, restored.stderr
    report = json.loads(restored.stdout)
    assert Path(report["replaced"]).exists() and report["replaced_head_seq"] > 0
    guardian.start()
    channel, stub = guardian.agent_stub()
    with channel:
        session = stub.OpenSession(pb.OpenSessionRequest(agent_token=token)).session_id
        for memory_id in sorted(kept)[:20]:
            assert stub.Get(pb.GetRequest(session_id=session, id=memory_id)).memory.id == memory_id
        with pytest.raises(grpc.RpcError) as caught:
            stub.Get(pb.GetRequest(session_id=session, id=sorted(lost)[0]))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    verify = guardian.ctl("audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    [row] = [row for row in guardian.audit_rows() if row["operation"] == "admin.backup.restore"]
    assert row["agent"] == "@restore" and f"seq {report['replaced_head_seq']} mac" in row["reason"]
    guardian.check_audit = False  # calls before the restore were rolled back with the database


def test_verifying_a_file_needs_the_keys_and_says_so(loaded: tuple[Guardian, str], tmp_path: Path) -> None:
    guardian, _ = loaded
    copy = tmp_path / "copy.db"
    assert guardian.ctl("backup", "create", str(copy)).returncode == 0
    shutil.copytree(guardian.state_dir / "keys", tmp_path / "keys-copy")
    (guardian.state_dir / "keys").chmod(0o755)  # as a key dir anyone could read: refused
    try:
        refused = guardian.ctl("backup", "verify", str(copy), offline=True)
    finally:
        (guardian.state_dir / "keys").chmod(0o700)
    assert refused.returncode == 2 and "needs the guardian's keys" in refused.stderr, refused.stderr
