"""Real processes for the tests: a guardian on a fresh state dir, and its admin calls.

Everything is started by PID and stopped by PID; nothing is left running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlcipher3
import yaml

from guardian.keys import load_keys
from guardian.statedir import init_state_dir
from shared.rpc.guardian.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Guardian:
    """A guardian process on its own state dir."""

    state_dir: Path
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.state_dir / "guardian-test.log"

    @property
    def config(self) -> Path:
        return self.state_dir / "config.yaml"

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / "run" / "agent.sock"

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "run" / "admin.sock"

    @property
    def database(self) -> Path:
        return self.state_dir / "data" / "memory.db"

    def start(self, timeout_s: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "guardian.cli", "--config", str(self.config)], cwd=ROOT, stderr=log, stdout=log
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

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def add_agent(self, name: str) -> str:
        with grpc.insecure_channel(f"unix:{self.admin_socket}") as channel:
            return admin_pb2_grpc.AdminServiceStub(channel).AddAgent(admin_pb2.AddAgentRequest(name=name)).token

    def revoke_agent(self, name: str) -> int:
        with grpc.insecure_channel(f"unix:{self.admin_socket}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            return stub.RevokeAgent(admin_pb2.RevokeAgentRequest(name=name)).sessions_ended

    def admin(self, method: str, request: Any, operator: str = "") -> Any:
        """Call one AdminService method on the admin socket (optionally naming an operator)."""
        metadata = (("x-guardian-operator", operator),) if operator else None
        with grpc.insecure_channel(f"unix:{self.admin_socket}") as channel:
            return getattr(admin_pb2_grpc.AdminServiceStub(channel), method)(request, timeout=15, metadata=metadata)

    def set_policy(self, **changes: Any) -> None:
        """Rewrite top-level sections of the policy file (before start)."""
        path = self.state_dir / "policy.yaml"
        policy = yaml.safe_load(path.read_text())
        for key, value in changes.items():
            policy[key] = {**policy.get(key, {}), **value} if isinstance(value, dict) else value
        path.write_text(yaml.safe_dump(policy))

    @contextmanager
    def keyed_db(self) -> Iterator[Any]:
        """A direct connection to the database with its key, as an attacker holding the key would have."""
        key = load_keys(self.state_dir / "keys").database_hex
        connection = sqlcipher3.connect(str(self.database), isolation_level=None)
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
        channel = grpc.insecure_channel(f"unix:{self.agent_socket}")
        return channel, agent_pb2_grpc.AgentServiceStub(channel)


#: For suites that walk many deny paths on purpose: anomaly detectors that only log.
#: (tests/test_policy_decisions.py tests the locking responses.)
LOG_ONLY_ANOMALIES: dict[str, Any] = {
    kind: {"threshold": 1000, "window": "1m", "response": "log"}
    for kind in ("denials", "filter_hits", "burst", "unknown_ids", "outside_hours")
}


@contextmanager
def running_guardian(**policy_changes: Any) -> Iterator[Guardian]:
    """A started guardian on a fresh state dir under /tmp (socket paths must stay short)."""
    state_dir = Path(tempfile.mkdtemp(prefix="ag-", dir="/tmp"))
    guardian = Guardian(state_dir)
    try:
        init_state_dir(state_dir)
        if policy_changes:
            guardian.set_policy(**policy_changes)
        guardian.start()
        yield guardian
    finally:
        if guardian.process is not None:
            guardian.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


__all__ = ["LOG_ONLY_ANOMALIES", "ROOT", "Guardian", "agent_pb2", "running_guardian"]
