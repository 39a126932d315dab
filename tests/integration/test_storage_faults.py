"""A full disk and a filesystem gone read-only, on small filesystems the tests mount (root only).

Full disk (tmpfs): below ``storage.min_free`` writes get a retryable UNAVAILABLE that
says so while reads keep working (their audit rows fit in the room kept free); with no
room at all (``min_free: 0`` and a disk filled to the last byte) SQLite's own
"disk is full" is the same retryable error, never an internal one; when space returns,
writes resume, and nothing acknowledged is lost or damaged.

Read-only (ext4 on a loop device, turned read-only by an ext4 error as a failing disk
does): writes get UNAVAILABLE; reads do too, since their audit rows cannot be written
(fail closed); the guardian stays up and stops cleanly; after the operator's fsck and
remount, it starts again with every acknowledged write (``durability: full``) intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from guardian.keys.rotated import load_all_keys
from guardian.state.statedir import init_state_dir
from guardian.store.backup import verify_file
from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, agent_pb2, curl

pb = agent_pb2
HEAVY = {"burst": 100_000, "per_minute": 6_000_000}
WIDE_OPEN = {"session": {"reads": HEAVY, "writes": HEAVY}, "agent": {"reads": HEAVY, "writes": HEAVY}}
NOTE = "x" * 16_000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting the small filesystems these tests fill needs root")


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def guardian_on(mount: Path, **config: Any) -> Iterator[Guardian]:
    """A guardian whose database lives on mount (its state dir, sockets and keys elsewhere)."""
    state_dir = Path(tempfile.mkdtemp(prefix="agf-", dir="/tmp"))
    guardian = Guardian(state_dir)
    guardian.check_audit = False  # calls refused for lack of storage may leave no row: that is the point
    try:
        init_state_dir(state_dir)
        (state_dir / "data" / "memory.db").unlink()
        guardian.set_config(ops={"listen": "127.0.0.1:0"}, database=str(mount / "memory.db"), **config)
        guardian.set_policy(rate_limits=WIDE_OPEN, anomaly=LOG_ONLY_ANOMALIES)
        guardian.start()
        yield guardian
    finally:
        if guardian.process is not None:
            guardian.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def tmpfs(size_mib: int) -> Iterator[Path]:
    mount = Path(tempfile.mkdtemp(prefix="agfull-", dir="/tmp"))
    _run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        mount.rmdir()


def fill(path: Path, leave_bytes: int) -> None:
    """Grow the filler file at path until the filesystem has about leave_bytes free."""
    with path.open("ab") as handle:
        while True:
            info = os.statvfs(path.parent)
            free = info.f_bavail * info.f_frsize
            if free <= leave_bytes:
                return
            try:
                handle.write(b"\0" * min(free - leave_bytes, 1024 * 1024))
                handle.flush()
            except OSError:
                return


class Agent:
    def __init__(self, guardian: Guardian) -> None:
        self.channel, self.stub = guardian.agent_stub()
        self.session = self.stub.OpenSession(pb.OpenSessionRequest(agent_token=guardian.add_agent("filler"))).session_id
        self.acked: dict[str, str] = {}

    def store(self, content: str) -> grpc.StatusCode:
        try:
            memory = self.stub.Store(
                pb.StoreRequest(session_id=self.session, memory=pb.MemoryDraft(content=content)), timeout=20
            ).memory
        except grpc.RpcError as error:
            self.last_error = error
            return error.code()
        self.acked[memory.id] = content
        return grpc.StatusCode.OK

    def reads(self) -> list[grpc.StatusCode]:
        codes = []
        some = next(iter(self.acked))
        for call in (
            lambda: self.stub.Get(pb.GetRequest(session_id=self.session, id=some), timeout=20),
            lambda: self.stub.List(pb.ListRequest(session_id=self.session, page_size=5), timeout=20),
            lambda: self.stub.Search(pb.SearchRequest(session_id=self.session, query="note"), timeout=20),
        ):
            try:
                call()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        return codes


def check_intact(guardian: Guardian, agent: Agent) -> None:
    guardian.stop()
    keys = load_all_keys(guardian.state_dir / "keys", guardian.state_dir)
    database = Path(guardian.config.read_text().split("database: ")[1].split()[0])
    report = verify_file(database, keys)
    assert report.ok, report
    with guardian.keyed_db(database) as db:
        present = dict(db.execute("SELECT id, content FROM memories").fetchall())
    assert all(present.get(memory_id) == content for memory_id, content in agent.acked.items())


def test_a_nearly_full_disk_pauses_writes_keeps_reads_and_writes_resume() -> None:
    with tmpfs(32) as mount, guardian_on(mount, storage={"min_free": "4MiB"}) as guardian:
        agent = Agent(guardian)
        for number in range(40):
            assert agent.store(f"note {number} {NOTE}") == grpc.StatusCode.OK
        filler = mount / "filler"
        fill(filler, leave_bytes=2 * 1024 * 1024)
        assert agent.store(f"refused note {NOTE}") == grpc.StatusCode.UNAVAILABLE
        assert "disk is nearly full" in (agent.last_error.details() or "")
        assert "retry later" in (agent.last_error.details() or "")
        assert agent.reads() == [grpc.StatusCode.OK] * 3
        ready = curl(guardian.ops_url + "/readyz")
        assert ready.status == 503 and "bytes free" in ready.body
        fill(filler, leave_bytes=0)  # to the last byte: reads may now fail closed, but only retryably
        assert set(agent.reads()) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert agent.store(f"refused note {NOTE}") == grpc.StatusCode.UNAVAILABLE
        assert guardian.process is not None and guardian.process.poll() is None
        filler.unlink()
        assert agent.store(f"after the space came back {NOTE}") == grpc.StatusCode.OK
        assert agent.reads() == [grpc.StatusCode.OK] * 3
        agent.channel.close()
        check_intact(guardian, agent)


def test_sqlite_running_out_of_disk_is_a_retryable_error_and_nothing_breaks() -> None:
    with tmpfs(24) as mount, guardian_on(mount, storage={"min_free": "0"}) as guardian:
        agent = Agent(guardian)
        for number in range(20):
            assert agent.store(f"note {number} {NOTE}") == grpc.StatusCode.OK
        filler = mount / "filler"
        fill(filler, leave_bytes=0)
        outcomes = {agent.store(f"does not fit {number} {NOTE * 4}") for number in range(10)}
        assert outcomes <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK} and grpc.StatusCode.UNAVAILABLE in outcomes
        assert "disk is full" in (agent.last_error.details() or "")
        assert "internal" not in (agent.last_error.details() or "")
        assert guardian.process is not None and guardian.process.poll() is None
        filler.unlink()
        assert agent.store(f"after the space came back {NOTE}") == grpc.StatusCode.OK
        agent.channel.close()
        check_intact(guardian, agent)


@contextlib.contextmanager
def ext4(size_mib: int) -> Iterator[tuple[Path, Path]]:
    workdir = Path(tempfile.mkdtemp(prefix="agro-", dir="/tmp"))
    image, mount = workdir / "fs.img", workdir / "mnt"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", str(image))
    _run("mount", "-o", "loop,errors=remount-ro", str(image), str(mount))
    try:
        yield image, mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _loop_device(mount: Path) -> str:
    return subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE", str(mount)], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="mkfs.ext4 (e2fsprogs) is not installed")
def test_a_filesystem_gone_read_only_refuses_retryably_and_recovers_intact() -> None:
    try:
        context = ext4(64)
        image, mount = context.__enter__()
    except subprocess.CalledProcessError as error:
        pytest.skip(f"no loop device here to mount an ext4 image: {error.stderr!r}")
    try:
        with guardian_on(mount, storage={"durability": "full", "min_free": "1MiB"}) as guardian:
            agent = Agent(guardian)
            for number in range(30):
                assert agent.store(f"note {number} {NOTE}") == grpc.StatusCode.OK
            device = Path(_loop_device(mount)).name
            Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("agent-guardian storage fault test\n")
            assert agent.store(f"refused {NOTE}") == grpc.StatusCode.UNAVAILABLE
            assert "read-only" in (agent.last_error.details() or "") or "I/O" in (agent.last_error.details() or "")
            assert set(agent.reads()) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
            assert guardian.process is not None and guardian.process.poll() is None
            agent.channel.close()
            assert guardian.stop() == 0  # a clean stop, though nothing can be checkpointed
            _run("umount", str(mount))
            subprocess.run(["e2fsck", "-fy", str(image)], check=False, capture_output=True, timeout=60)
            _run("mount", "-o", "loop", str(image), str(mount))
            guardian.start()
            agent = _reconnect(guardian, agent)
            assert agent.store(f"after the remount {NOTE}") == grpc.StatusCode.OK
            agent.channel.close()
            check_intact(guardian, agent)
    finally:
        context.__exit__(None, None, None)


def _reconnect(guardian: Guardian, old: Agent) -> Agent:
    token = guardian.ctl("--json", "agents", "rotate-token", "filler").stdout
    agent = Agent.__new__(Agent)
    agent.channel, agent.stub = guardian.agent_stub()
    agent.session = agent.stub.OpenSession(pb.OpenSessionRequest(agent_token=json.loads(token)["token"])).session_id
    agent.acked = old.acked
    return agent
