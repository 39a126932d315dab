"""Processes the bench starts: each started by PID, stopped by PID, its peak RSS read from /proc.

Every process the bench starts (and every process those start) inherits
:data:`RUN_ENV`, set to this run's id, so a caller can check afterwards that
none is left (``tests/integration/test_bench_smoke.py`` does). The stdio gateways are
started by the MCP client library with an environment of its own, so
:func:`stdio_gateway` passes the variable on explicitly.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc
import sqlcipher3
import yaml
from google.protobuf.message import Message

from guardian.access.key_file import KeyFileSigner
from guardian.ctl.connection import call_signed
from guardian.keys.rotated import load_all_keys
from guardian.policy.default import render_default_policy
from guardian.state.config import EmbedderService, load_config
from guardian.state.statedir import LOCAL_ADMIN_KEY, StateDirFiles, init_state_dir
from shared.embedding import ask_once
from shared.rpc.embedder.v1 import embedder_pb2
from shared.rpc.guardian.v1 import admin_pb2

__all__ = [
    "ROOT",
    "RUN_ENV",
    "BenchGuardian",
    "CpuMeter",
    "Spawned",
    "cpu_ticks",
    "free_port",
    "peak_rss_kib",
    "run_id",
    "spawn",
    "wait_for_embedder",
    "wait_for_port",
    "wait_for_socket",
    "wait_idle",
]

ROOT: Final = Path(__file__).resolve().parent.parent
#: Names this run; every process the bench starts inherits it.
RUN_ENV: Final = "AGENT_GUARDIAN_BENCH_RUN"
_STOP_GRACE_S: Final = 15.0


def run_id() -> str:
    """This run's id (set in the environment, so every child inherits it)."""
    value = os.environ.get(RUN_ENV, "")
    if not value:
        value = os.environ[RUN_ENV] = secrets.token_hex(8)
    return value


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process in KiB, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def cpu_ticks(pid: int) -> int | None:
    """User plus system CPU time of a live process, in clock ticks; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


class CpuMeter:
    """CPU time (user + system) that processes spend between start() and stop(), in ms per operation.

    ``pids`` names groups of processes (e.g. the guardian, the gateways, a floor server);
    the group ``client`` is always this process, the bench, whose clients drive the load.
    A process that exits in between counts what it had used when last seen.
    """

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self._pids = pids
        self._start: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self._client_start = 0.0
        self._client_used = 0.0
        self._tick_ms = 1000 / os.sysconf("SC_CLK_TCK")

    def _ticks(self) -> dict[str, int]:
        return {name: sum(cpu_ticks(pid) or 0 for pid in pids) for name, pids in self._pids.items()}

    def start(self) -> None:
        """Note the CPU used so far."""
        self._start = self._ticks()
        times = os.times()
        self._client_start = times.user + times.system

    def stop(self) -> None:
        """Note the CPU used since start()."""
        now = self._ticks()
        self._used = {name: now[name] - self._start.get(name, 0) for name in now}
        times = os.times()
        self._client_used = times.user + times.system - self._client_start

    def per_op_ms(self, ops: int) -> dict[str, float]:
        """CPU ms per operation of each group (and of the client), over ops operations."""
        if ops <= 0:
            return {}
        result = {name: round(ticks * self._tick_ms / ops, 4) for name, ticks in self._used.items()}
        result["client"] = round(self._client_used * 1000 / ops, 4)
        return result


def wait_idle(pid: int, timeout_s: float = 900.0, interval_s: float = 0.1) -> float:
    """Wait until pid uses (almost) no CPU over interval_s; the seconds waited.

    A client that gave up on a call (a deadline) leaves the guardian still working
    on it; the next measurement must not start on top of that backlog.
    """
    started = time.monotonic()
    before = cpu_ticks(pid)
    while before is not None and time.monotonic() - started < timeout_s:
        time.sleep(interval_s)
        after = cpu_ticks(pid)
        if after is None or after - before <= 1:
            break
        before = after
    return time.monotonic() - started


def free_port() -> int:
    """A TCP port on 127.0.0.1 free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Spawned:
    """A process the bench started; :meth:`stop` ends it by its PID."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def peak_rss_kib(self) -> int | None:
        """Its VmHWM now (None once it has exited)."""
        return peak_rss_kib(self.pid) if self.alive() else None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal it, wait for it (SIGKILL after a grace period); its exit status."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        try:
            return self.process.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def spawn(name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> Spawned:
    """Start argv with stdout and stderr appended to log_path (stdin closed)."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - argv is built by the bench, never from input
            list(argv), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env
        )
    return Spawned(name, process, log_path)


def wait_for_port(spawned: Spawned, port: int, timeout_s: float = 30.0) -> None:
    """Wait until spawned accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not spawned.alive():
            raise RuntimeError(f"{spawned.name} exited early: {_tail(spawned.log_path)}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{spawned.name} did not listen on port {port} within {timeout_s} s")


def wait_for_socket(spawned: Spawned, path: Path, timeout_s: float = 30.0) -> None:
    """Wait until spawned serves gRPC on the Unix socket at path."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not spawned.alive():
            raise RuntimeError(f"{spawned.name} exited early: {_tail(spawned.log_path)}")
        if path.exists():
            with grpc.insecure_channel(f"unix:{path}") as channel:
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    return
                except grpc.FutureTimeoutError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"{spawned.name} did not serve {path} within {timeout_s} s")


def wait_for_embedder(spawned: Spawned, path: Path, timeout_s: float = 60.0) -> None:
    """Wait until spawned (agent-embedder) answers a request on the Unix socket at path (its frames, not gRPC)."""
    request = embedder_pb2.EmbedRequest(texts=["ready?"]).SerializeToString()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not spawned.alive():
            raise RuntimeError(f"{spawned.name} exited early: {_tail(spawned.log_path)}")
        if path.exists():
            with contextlib.suppress(OSError):
                frame = ask_once(str(path), request, timeout_s=2)
                if frame is not None and embedder_pb2.EmbedResponse.FromString(frame).vectors:
                    return
        time.sleep(0.05)
    raise RuntimeError(f"{spawned.name} did not answer on {path} within {timeout_s} s")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def bench_policy() -> dict[str, Any]:
    """The shipped policy with the limits that would throttle a benchmark lifted.

    Rate limits and the anomaly detectors are what an operator tunes to their
    agents; at their shipped values (a 60-call burst, 600 calls in 10 s locks a
    session) they would measure the limiter, not the guardian. Everything else,
    the content filters included, stays as shipped. The read window is long
    (ten years), so a search pays for the window check but sees every memory.
    """
    policy: dict[str, Any] = yaml.safe_load(render_default_policy())
    bucket = {"burst": 1_000_000, "per_minute": 60_000_000}
    policy["sessions"]["max_per_agent"] = 128
    policy["limits"]["max_batch"] = 500  # the prefill's batches; measured batches hold corpus.BATCH_SIZE
    policy["rate_limits"] = {
        "session": {"reads": bucket, "writes": bucket},
        "agent": {"reads": bucket, "writes": bucket},
        "session_opens": {"burst": 10_000, "per_minute": 600_000},
        "cooldown": "1s",
    }
    policy["read_window"] = "3650d"
    # Log-only detectors, with windows short enough that their deques stay small.
    policy["anomaly"] = {
        "denials": {"threshold": 1000, "window": "1m", "response": "log"},
        "filter_hits": {"threshold": 1000, "window": "1m", "response": "log"},
        "burst": {"threshold": 100_000, "window": "1s", "response": "log"},
        "unknown_ids": {"threshold": 1000, "window": "1m", "response": "log"},
        "outside_hours": {"threshold": 1000, "window": "1m", "response": "log"},
    }
    return policy


@dataclass
class BenchGuardian(StateDirFiles):
    """A guardian on its own state dir, with the bench policy."""

    state_dir: Path
    spawned: Spawned | None = None
    #: agent-embedder, when the config names it (the shipped default), started before the guardian.
    embedder: Spawned | None = None
    #: The highest VmHWM seen of the guardian process(es) on this state dir, in KiB.
    peak_kib: int = 0
    #: The same of its embedder process(es).
    embedder_peak_kib: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    #: Time the pipeline's stages (tracing.profile_stages), served on /metrics at ops_port.
    profile: bool = False
    ops_port: int = 0

    def prepare(self) -> None:
        """Create the state dir (keys, DB, config) and write the bench policy."""
        init_state_dir(self.state_dir)
        config = yaml.safe_load(self.config.read_text())
        if self.profile:  # /metrics on a port the bench knows, for the stage sums (bench/stage_profile.py)
            self.ops_port = free_port()
            config["tracing"] = {**(config.get("tracing") or {}), "profile_stages": True}
        config["ops"] = {"listen": f"127.0.0.1:{self.ops_port}"}  # served as shipped; 0: a free port
        self.config.write_text(yaml.safe_dump(config))
        (self.state_dir / "policy.yaml").write_text(yaml.safe_dump(bench_policy(), sort_keys=False))

    @property
    def embedder_socket(self) -> Path | None:
        """agent-embedder's socket, when the config names one."""
        embedding = load_config(self.config).embedding
        return embedding.socket if isinstance(embedding, EmbedderService) else None

    def start(self) -> None:
        """Start the embedder (if configured and not running) and the daemon; wait until both answer."""
        socket_path = self.embedder_socket
        if socket_path is not None and self.embedder is None:
            socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "embedder", "--socket", str(socket_path)]
            self.embedder = spawn("embedder", argv, self.state_dir / "embedder.log")
            wait_for_embedder(self.embedder, socket_path, timeout_s=60.0)
        argv = [sys.executable, "-m", "guardian.daemon.main", "--config", str(self.config)]
        self.spawned = spawn("guardian", argv, self.state_dir / "guardian.log")
        wait_for_socket(self.spawned, self.agent_socket)
        wait_for_socket(self.spawned, self.admin_socket)

    def sample_rss(self) -> int:
        """Read the running guardian's (and embedder's) VmHWM into peak_kib (embedder_peak_kib); returns peak_kib."""
        if self.spawned is not None:
            self.peak_kib = max(self.peak_kib, self.spawned.peak_rss_kib() or 0)
        if self.embedder is not None:
            self.embedder_peak_kib = max(self.embedder_peak_kib, self.embedder.peak_rss_kib() or 0)
        return self.peak_kib

    def stop(self) -> None:
        """Stop the daemon, then its embedder (after noting their peak RSS)."""
        self.sample_rss()
        for attribute in ("spawned", "embedder"):
            spawned: Spawned | None = getattr(self, attribute)
            if spawned is not None:
                spawned.stop()
                setattr(self, attribute, None)

    def wait_recall_ready(self, timeout_s: float = 1800.0) -> float:
        """Wait until the vector index is loaded and organised and no memory waits to be embedded; seconds waited."""
        started = time.monotonic()
        while True:
            status = self.admin("Status", admin_pb2.StatusRequest(), timeout_s=30)
            if status.recall_index_ready and status.memories_to_embed == 0 and not status.recall_index_training:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"the vector index was not ready in {timeout_s:.0f} s")
            time.sleep(0.5)

    def admin(self, method: str, request: Message, timeout_s: float = 15.0) -> Any:
        """One admin call, signed with the key init made in the state dir (the first admin)."""
        signer = KeyFileSigner(self.state_dir / LOCAL_ADMIN_KEY)
        return call_signed(str(self.admin_socket), signer, method, request, timeout_s)

    def add_agent(self, name: str) -> str:
        """Register an agent on the admin socket; its token."""
        token: str = self.admin("AddAgent", admin_pb2.AddAgentRequest(name=name)).token
        self.tokens[name] = token
        return token

    @contextlib.contextmanager
    def keyed_db(self) -> Iterator[Any]:
        """A direct connection to the guardian's database with its key (bench bookkeeping only)."""
        key = load_all_keys(self.state_dir / "keys", self.state_dir).database_hex
        connection = sqlcipher3.connect(str(self.database), isolation_level=None, timeout=30.0)
        connection.execute(f"PRAGMA key = \"x'{key}'\"")
        connection.execute("PRAGMA busy_timeout = 30000")
        try:
            yield connection
        finally:
            connection.close()
