"""systemd's notification protocol, spoken by the real daemons to a real datagram socket.

The socket stands in for systemd's (``NOTIFY_SOCKET``); the daemons must say
READY once they serve, ping the watchdog at half of ``WATCHDOG_USEC``, say
RELOADING then READY around a SIGHUP reload, and STOPPING when they stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import sdnotify
from tests.support.harness import ROOT, running_guardian


class NotifySocket:
    """A bound AF_UNIX datagram socket collecting what daemons send."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def collect(self, until: str, timeout_s: float = 15.0) -> list[str]:
        """Receive until a message containing `until` arrives; everything received so far."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            if until in self.messages[-1]:
                return self.messages
        raise AssertionError(f"no {until!r} within {timeout_s} s; got {self.messages}")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(Path("/tmp") / f"ag-notify-{os.getpid()}-{time.monotonic_ns()}.sock")
    try:
        yield listener
    finally:
        listener.sock.close()
        listener.path.unlink(missing_ok=True)


def test_outside_systemd_notify_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.Watchdog().interval_s is None


def test_a_watchdog_meant_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.Watchdog().interval_s is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.Watchdog().interval_s == 2.0


def test_the_guardian_reports_ready_watchdog_reloading_and_stopping(notify_socket: NotifySocket) -> None:
    with running_guardian() as guardian:
        guardian.stop()
        guardian.start(env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
        assert guardian.process is not None
        notify_socket.collect("READY=1")
        started = time.monotonic()
        notify_socket.collect("WATCHDOG=1")
        notify_socket.collect("WATCHDOG=1")
        assert time.monotonic() - started < 3, "pings come at half the 1 s watchdog timeout"
        os.kill(guardian.process.pid, signal.SIGHUP)
        reloading = notify_socket.collect("RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading[-1]
        assert "READY=1" in notify_socket.collect("READY=1")[-1]
        guardian.stop()
        assert "STOPPING=1" in notify_socket.collect("STOPPING=1")[-1]


def test_the_gateway_reports_ready_watchdog_and_stopping(notify_socket: NotifySocket) -> None:
    with running_guardian() as guardian:
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.cli",
                "--transport",
                "http",
                "--port",
                "0",
                "--socket",
                str(guardian.agent_socket),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"},
        )
        try:
            assert "serving MCP on http://127.0.0.1:" in notify_socket.collect("READY=1")[-1]
            notify_socket.collect("WATCHDOG=1")
            notify_socket.collect("WATCHDOG=1")
            gateway.send_signal(signal.SIGTERM)
            notify_socket.collect("STOPPING=1")
            assert gateway.wait(timeout=15) == 0
        finally:
            if gateway.poll() is None:
                gateway.kill()
                gateway.wait()
