"""Real processes for the tests: a guardian on a fresh state dir, and its admin calls.

Everything is started by PID and stopped by PID; nothing is left running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import sqlcipher3
import yaml

from guardian.access.key_file import KeyFileSigner
from guardian.access.signed_request import Signer, signed_metadata
from guardian.keys.rotated import load_all_keys
from guardian.service.rules import ADMIN_RULES, AGENT_RULES
from guardian.state.statedir import LOCAL_ADMIN_KEY, StateDirFiles, init_state_dir
from shared.embedding import ask_once
from shared.rpc.embedder.v1 import embedder_pb2
from shared.rpc.guardian.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


#: Outcomes after which the guardian may not have seen the call at all (or answered after the client gave up).
_OUTCOME_UNKNOWN = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)


if TYPE_CHECKING:
    _UnaryUnaryInterceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _UnaryUnaryInterceptor = grpc.UnaryUnaryClientInterceptor


class AdminSigner(_UnaryUnaryInterceptor):
    """Signs every call on a channel as the admin whose key this is (as guardianctl does)."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        data = request if isinstance(request, bytes) else request.SerializeToString()
        signed = signed_metadata(self.signer, details.method, data)
        details = details._replace(metadata=(*(details.metadata or ()), *signed))
        return continuation(details, request)


class _CallRecorder(_UnaryUnaryInterceptor):
    """Notes every call made through the harness's channels, with its outcome, for the audit cross-check."""

    def __init__(self, socket_kind: str, calls: list[tuple[str, str, grpc.StatusCode]]) -> None:
        self._socket_kind = socket_kind
        self._calls = calls

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        self._calls.append((self._socket_kind, details.method, outcome.code()))
        return outcome


def expected_audit(socket_kind: str, method: str, code: grpc.StatusCode) -> tuple[str, str]:
    """The (operation, decision) the audit trail must hold for one call and its outcome."""
    service, _, name = method.strip("/").rpartition("/")
    rules = {"agent": ("guardian.v1.AgentService", AGENT_RULES), "admin": ("guardian.v1.AdminService", ADMIN_RULES)}
    served, table = rules[socket_kind]
    operation = table[name].audit_operation if service == served and name in table else "rpc.unknown"
    decision = "allow" if code == grpc.StatusCode.OK else "error" if code == grpc.StatusCode.INTERNAL else "deny"
    return operation, decision


@dataclass
class Guardian(StateDirFiles):
    """A guardian process on its own state dir."""

    state_dir: Path
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    #: Every call made through :meth:`channel`: (socket, method, status code).
    calls: list[tuple[str, str, grpc.StatusCode]] = field(default_factory=list)
    #: Whether stopping checks that every recorded call has its audit row (off for tests that tamper).
    check_audit: bool = True

    def __post_init__(self) -> None:
        self.log_path = self.state_dir / "guardian-test.log"

    def start(self, timeout_s: float = 20.0, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guardian.daemon.main", "--config", str(self.config)],
            cwd=ROOT,
            stderr=log,
            stdout=log,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"guardian exited {self.process.returncode}: {self.log_path.read_text()}")
            if self.agent_socket.exists() and self.admin_socket.exists():
                with grpc.insecure_channel(f"unix:{self.agent_socket}") as channel:
                    try:
                        grpc.channel_ready_future(channel).result(timeout=1)
                        return
                    except grpc.FutureTimeoutError:
                        pass
            time.sleep(0.05)
        raise RuntimeError("guardian did not start in time")

    @property
    def ops_url(self) -> str:
        """Base URL of the guardian's /healthz, /readyz and /metrics (the port it logged it bound)."""
        for line in reversed(self.log_path.read_text().splitlines()):
            if '"ops_listening"' in line:
                entry = json.loads(line)
                return f"http://{entry['host']}:{entry['port']}"
        raise RuntimeError("the guardian has not logged its ops endpoint")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    @property
    def admin_key(self) -> Path:
        """The key of the first admin (role security), which init made in the state dir."""
        return self.state_dir / LOCAL_ADMIN_KEY

    def channel(self, socket_kind: str = "agent", signer: Signer | None = None) -> grpc.Channel:
        """A channel to the agent or admin socket whose calls are recorded for the audit cross-check.

        Admin calls are signed by signer, by default the first admin's key.
        """
        path = self.agent_socket if socket_kind == "agent" else self.admin_socket
        channel = grpc.intercept_channel(grpc.insecure_channel(f"unix:{path}"), _CallRecorder(socket_kind, self.calls))
        if socket_kind == "admin":
            channel = grpc.intercept_channel(channel, AdminSigner(signer or KeyFileSigner(self.admin_key)))
        return channel

    def add_agent(self, name: str) -> str:
        with self.channel("admin") as channel:
            return admin_pb2_grpc.AdminServiceStub(channel).AddAgent(admin_pb2.AddAgentRequest(name=name)).token

    def revoke_agent(self, name: str) -> int:
        with self.channel("admin") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            return stub.RevokeAgent(admin_pb2.RevokeAgentRequest(name=name)).sessions_ended

    def admin(self, method: str, request: Any, signer: Signer | None = None) -> Any:
        """Call one AdminService method on the admin socket, signed by signer (by default the first admin)."""
        with self.channel("admin", signer) as channel:
            return getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request, timeout=15)

    def ctl(
        self, *args: str, stdin: str | None = None, offline: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run guardianctl against this guardian's admin socket (offline: with its config instead), signing as the
        first admin unless env says otherwise."""
        where = ["--config", str(self.config)] if offline else ["--socket", str(self.admin_socket)]
        base = {key: value for key, value in os.environ.items() if key != "SSH_AUTH_SOCK"}
        return subprocess.run(
            [sys.executable, "-m", "guardian.ctl.main", *where, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=60,
            check=False,
            env={**base, "AGENT_GUARDIAN_ADMIN_KEY": str(self.admin_key), **(env or {})},
        )

    def unaudited_calls(self) -> list[str]:
        """Recorded calls with no matching audit row (operation and decision), each row used once."""
        rows = Counter((row["operation"], row["decision"]) for row in self.audit_rows())
        missing = []
        for socket_kind, method, code in self.calls:
            if code in _OUTCOME_UNKNOWN:
                continue
            expected = expected_audit(socket_kind, method, code)
            if rows[expected] > 0:
                rows[expected] -= 1
            else:
                missing.append(f"{method} -> {code.name}: no {expected} row")
        return missing

    def set_config(self, **changes: Any) -> None:
        """Merge top-level sections into config.yaml (before start); ``embedding`` is replaced whole
        (its keys depend on its model)."""
        config = yaml.safe_load(self.config.read_text())
        for key, value in changes.items():
            merge = isinstance(value, dict) and key != "embedding"
            config[key] = {**config.get(key, {}), **value} if merge else value
        self.config.write_text(yaml.safe_dump(config))

    def set_policy(self, **changes: Any) -> None:
        """Rewrite top-level sections of the policy file (before start)."""
        path = self.state_dir / "policy.yaml"
        policy = yaml.safe_load(path.read_text())
        for key, value in changes.items():
            policy[key] = {**policy.get(key, {}), **value} if isinstance(value, dict) else value
        path.write_text(yaml.safe_dump(policy))

    @contextmanager
    def keyed_db(self, path: Path | None = None) -> Iterator[Any]:
        """A direct connection to the database (or another file under its key), as someone holding the key."""
        key = load_all_keys(self.state_dir / "keys", self.state_dir).database_hex
        connection = sqlcipher3.connect(str(path or self.database), isolation_level=None)
        connection.execute(f"PRAGMA key = \"x'{key}'\"")
        try:
            yield connection
        finally:
            connection.close()

    def audit_rows(self) -> list[dict[str, Any]]:
        with self.keyed_db() as connection:
            cursor = connection.execute("SELECT * FROM audit ORDER BY seq")
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def agent_stub(self) -> tuple[grpc.Channel, agent_pb2_grpc.AgentServiceStub]:
        channel = self.channel("agent")
        return channel, agent_pb2_grpc.AgentServiceStub(channel)


@dataclass(frozen=True)
class HttpAnswer:
    """What an HTTP GET answered."""

    status: int
    content_type: str
    body: str

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


_CURL_TRAILER = "\n--curl-trailer-- "


def curl(url: str) -> HttpAnswer:
    """GET url with the real curl binary (as an operator would)."""
    result = subprocess.run(
        [
            "/usr/bin/curl",
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--write-out",
            _CURL_TRAILER + "%{http_code} %{content_type}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body, separator, trailer = result.stdout.rpartition(_CURL_TRAILER)
    assert separator, result.stdout
    status, _, content_type = trailer.partition(" ")
    return HttpAnswer(int(status), content_type, body)


#: For suites that walk many deny paths on purpose: anomaly detectors that only log.
#: (tests/integration/test_policy_decisions.py tests the locking responses.)
LOG_ONLY_ANOMALIES: dict[str, Any] = {
    kind: {"threshold": 1000, "window": "1m", "response": "log"}
    for kind in ("denials", "filter_hits", "burst", "unknown_ids", "outside_hours")
}


_UNLIMITED_RATE: Final = {"burst": 10_000, "per_minute": 100_000}
#: A profile with every operation and rate limits far above any test's load (for tests of other things).
UNLIMITED_PROFILE: dict[str, Any] = {
    "operations": ["store", "get", "search", "list", "update", "delete"],
    "rate_limits": {scope: {"writes": _UNLIMITED_RATE, "reads": _UNLIMITED_RATE} for scope in ("session", "agent")}
    | {"session_opens": _UNLIMITED_RATE},
}


def embed_request(path: Path, request: bytes, timeout_s: float = 10.0) -> embedder_pb2.EmbedResponse | None:
    """Send one request frame (an EmbedRequest's bytes, or anything) to the embedder at path; its answer.

    None when the embedder closed the connection without one; OSError when it cannot be reached.
    """
    frame = ask_once(str(path), request, timeout_s)
    return None if frame is None else embedder_pb2.EmbedResponse.FromString(frame)


def embed(path: Path, texts: list[str], timeout_s: float = 10.0) -> embedder_pb2.EmbedResponse:
    """The embedder's answer at path to an EmbedRequest of texts (AssertionError if it closed without one)."""
    answer = embed_request(path, embedder_pb2.EmbedRequest(texts=texts).SerializeToString(), timeout_s)
    assert answer is not None, "the embedder closed the connection without an answer"
    return answer


@dataclass
class Embedder:
    """An agent-embedder process serving on socket."""

    socket: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, timeout_s: float = 60.0) -> None:
        """Start it and wait until it answers an Embed (RuntimeError with its log if it exits)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "embedder", "--socket", str(self.socket), *extra],
            cwd=ROOT,
            stderr=log,
            stdout=log,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedder exited {self.process.returncode}: {self.log_path.read_text()}")
            if self.socket.exists():
                try:
                    if embed(self.socket, ["ready?"], timeout_s=2).vectors:
                        return
                except OSError:  # not listening yet (a stale file), or not answering yet
                    pass
            time.sleep(0.1)
        raise RuntimeError("embedder did not start in time")

    def stop(self) -> int:
        """SIGTERM it (by PID) and wait."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@contextmanager
def running_embedder(directory: Path) -> Iterator[Embedder]:
    """A started agent-embedder with its socket in directory; stopped after."""
    embedder = Embedder(directory / "embedder.sock", directory / "embedder-test.log")
    try:
        embedder.start()
        yield embedder
    finally:
        if embedder.process is not None:
            embedder.stop()


@contextmanager
def running_guardian(config: dict[str, Any] | None = None, **policy_changes: Any) -> Iterator[Guardian]:
    """A started guardian on a fresh state dir under /tmp (socket paths must stay short).

    config: top-level sections merged into config.yaml; policy_changes: into policy.yaml.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="ag-", dir="/tmp"))
    guardian = Guardian(state_dir)
    try:
        init_state_dir(state_dir)
        # A free ops port each: no collisions; the static model in the guardian unless a test names
        # agent-embedder (tests/integration/test_embedder.py), so most tests need no second process.
        guardian.set_config(**{"ops": {"listen": "127.0.0.1:0"}, "embedding": {"model": "builtin"}, **(config or {})})
        if policy_changes:
            guardian.set_policy(**policy_changes)
        guardian.start()
        yield guardian
        if guardian.check_audit and guardian.calls:
            missing = guardian.unaudited_calls()
            assert not missing, f"calls without their audit row: {missing}"
    finally:
        if guardian.process is not None:
            guardian.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


__all__ = [
    "LOG_ONLY_ANOMALIES",
    "ROOT",
    "UNLIMITED_PROFILE",
    "Embedder",
    "Guardian",
    "HttpAnswer",
    "agent_pb2",
    "curl",
    "embed",
    "embed_request",
    "running_embedder",
    "running_guardian",
]
