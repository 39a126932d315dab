"""The gateway's ops endpoint, end to end: a real guardian, a real gateway process (stdio and HTTP)
started with ``--ops-listen 127.0.0.1:0``, the real ``curl`` binary, and the real MCP client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import MCPError
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import OUTCOMES
from gateway.tools import TOOL_NAMES
from tests.support.harness import ROOT, Guardian, HttpAnswer
from tests.support.harness import curl as harness_curl
from tests.support.mcp_harness import call, http_client

pytestmark = pytest.mark.anyio

CURL = "/usr/bin/curl"
MARKER = "okapi-marker-3Vn8 the heron counts lanterns at dawn"
MISSING_ID = "mem_" + "0" * 32
METRIC_NAMES = (
    "agent_gateway_tool_calls_total",
    "agent_gateway_tool_call_duration_seconds",
    "agent_gateway_guardian_errors_total",
    "agent_gateway_guardian_reconnects_total",
    "agent_gateway_sessions_open",
    "agent_gateway_guardian_up",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def agent(guardian: Guardian) -> tuple[str, str]:
    """An agent's name and token on the module's guardian."""
    name = "ops-agent-" + uuid.uuid4().hex[:8]
    return name, guardian.add_agent(name)


# -- curl ---------------------------------------------------------------------------------------


def curl(port: int, path: str) -> HttpAnswer:
    return harness_curl(f"http://127.0.0.1:{port}{path}")


def wait_ready(port: int, *, ready: bool, timeout_s: float = 20.0) -> HttpAnswer:
    """Poll /readyz until it says ``ready`` (200) or not (503)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = curl(port, "/readyz")
        if answer.status == (200 if ready else 503) or time.monotonic() > deadline:
            return answer
        time.sleep(0.1)


def samples(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a text exposition, keyed by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(body: str, name: str, **labels: str) -> float | None:
    return samples(body).get((name, frozenset(labels.items())))


# -- the gateway process -------------------------------------------------------------------------


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    log_path: Path
    ops_port: int = 0
    mcp_url: str = ""

    def log_entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def stop(self) -> int:
        """SIGTERM by PID, then wait (SIGKILL if it does not stop); idempotent."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            code = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        return code


def gateway_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GUARDIAN_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


@contextmanager
def running_gateway(guardian: Guardian, transport: str, token: str) -> Iterator[Gateway]:
    """A gateway process with ``--ops-listen 127.0.0.1:0``; its ports are read from its JSON log."""
    log_path = guardian.state_dir / f"gateway-ops-{transport}-{uuid.uuid4().hex[:8]}.log"
    args = [
        sys.executable,
        "-m",
        "gateway.cli",
        "--transport",
        transport,
        "--socket",
        str(guardian.agent_socket),
        "--ops-listen",
        "127.0.0.1:0",
    ]
    if transport == "http":
        args += ["--port", "0"]
        env = gateway_env()
    else:
        env = gateway_env(AGENT_GUARDIAN_TOKEN=token)
    with log_path.open("ab") as log:
        # stdio: stdin stays open (an idle MCP client) and stdout carries only the protocol.
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if transport == "stdio" else subprocess.DEVNULL,
            stderr=log,
        )
    gateway = Gateway(process, log_path)
    try:
        deadline = time.monotonic() + 20
        while not gateway.ops_port or (transport == "http" and not gateway.mcp_url):
            assert process.poll() is None, f"gateway exited early: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"gateway did not start: {log_path.read_text()}"
            for entry in gateway.log_entries():
                if entry.get("event") == "ops_listening":
                    gateway.ops_port = entry["port"]
                elif entry["message"] == "listening":
                    gateway.mcp_url = entry["url"]
            time.sleep(0.05)
        yield gateway
    finally:
        gateway.stop()


@contextmanager
def restarted_afterwards(guardian: Guardian) -> Iterator[None]:
    """The module's guardian is running again when the block ends, however it ends."""
    try:
        yield
    finally:
        if guardian.process is None or guardian.process.poll() is not None:
            guardian.start()


# -- usage ------------------------------------------------------------------------------------------


def run_gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=gateway_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_help_documents_the_ops_endpoint() -> None:
    result = run_gateway("--help")
    assert result.returncode == 0
    for needle in ("--ops-listen", "HOST:PORT", "/healthz", "/readyz", "/metrics", "loopback", "not served"):
        assert needle in result.stdout, needle


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("192.0.2.1:9465", "not a loopback address"),
        ("0.0.0.0:9465", "not a loopback address"),
        ("localhost:9465", "loopback IP address"),
        ("127.0.0.1:70000", "out of range"),
        ("9465", "expected HOST:PORT"),
        ("127.0.0.1:", "expected HOST:PORT"),
    ],
)
def test_a_bad_ops_address_is_a_usage_error(listen: str, message: str) -> None:
    for transport in ("http", "stdio"):
        result = run_gateway("--transport", transport, "--socket", "/tmp/no-such.sock", "--ops-listen", listen)
        assert result.returncode == 2, result.stderr
        assert "agent-gateway: error: --ops-listen:" in result.stderr
        assert message in result.stderr
        assert result.stdout == ""


def test_an_ops_port_in_use_fails_the_start_with_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_gateway(
            "--transport", "http", "--port", "0", "--socket", "/tmp/no-such.sock", "--ops-listen", f"127.0.0.1:{port}"
        )
    assert result.returncode == 1, result.stderr
    assert "could not start the ops endpoint" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


# -- health and readiness -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_health_and_readiness_follow_the_guardian(guardian: Guardian, agent: tuple[str, str], transport: str) -> None:
    _, token = agent
    with restarted_afterwards(guardian), running_gateway(guardian, transport, token) as gateway:
        port = gateway.ops_port
        healthz = curl(port, "/healthz")
        assert healthz.status == 200 and healthz.content_type.startswith("application/json")
        assert healthz.json() == {"alive": True}

        ready = curl(port, "/readyz")
        assert ready.status == 200, ready.body
        assert ready.json() == {"ready": True, "checks": {"guardian": "ok"}, "warnings": {}}
        metrics = curl(port, "/metrics").body
        assert value(metrics, "agent_gateway_guardian_up") == 1
        # stdio opens its one guardian session at start; HTTP opens one per caller, none yet.
        assert value(metrics, "agent_gateway_sessions_open") == (1 if transport == "stdio" else 0)

        missing = curl(port, "/nope")
        assert missing.status == 404 and "/healthz" in missing.body
        assert curl(port, "/metricsx").status == 404

        guardian.stop()
        down = wait_ready(port, ready=False)
        assert down.status == 503, down.body
        assert down.content_type.startswith("application/json")
        assert down.json()["ready"] is False
        finding = down.json()["checks"]["guardian"]
        assert finding != "ok" and "unreachable" in finding
        assert curl(port, "/healthz").status == 200  # alive, just not ready
        assert value(curl(port, "/metrics").body, "agent_gateway_guardian_up") == 0

        guardian.start()
        back = wait_ready(port, ready=True)
        assert back.status == 200, back.body
        assert back.json() == {"ready": True, "checks": {"guardian": "ok"}, "warnings": {}}
        assert value(curl(port, "/metrics").body, "agent_gateway_guardian_up") == 1

        assert gateway.stop() == 0  # the ops thread does not hold up a clean stop
    listening = [entry for entry in gateway.log_entries() if entry.get("event") == "ops_listening"]
    assert len(listening) == 1
    assert listening[0]["host"] == "127.0.0.1" and listening[0]["port"] == port
    assert token not in gateway.log_path.read_text()
    gone = subprocess.run([CURL, "--silent", f"http://127.0.0.1:{port}/healthz"], timeout=30, check=False)
    assert gone.returncode == 7  # curl: could not connect; the endpoint stopped with the gateway


# -- metrics ------------------------------------------------------------------------------------------


async def test_metrics_count_tool_calls_and_errors_and_hold_no_secret(
    guardian: Guardian, agent: tuple[str, str]
) -> None:
    name, token = agent
    with running_gateway(guardian, "http", token) as gateway:
        before = curl(gateway.ops_port, "/metrics")
        assert before.status == 200 and before.content_type.startswith("text/plain")
        for tool in TOOL_NAMES:  # every tool's series exists, at zero, before the first call
            assert value(before.body, "agent_gateway_tool_calls_total", tool=tool, outcome="ok") == 0

        async with http_client(gateway.mcp_url, token) as client:
            memory_id = (await call(client, "memory_store", content=MARKER, tags=["ops"]))["memory"]["id"]
            assert (await call(client, "memory_get", id=memory_id))["memory"]["content"] == MARKER
            await call(client, "memory_search", query="heron lanterns")
            denied = await client.call_tool("memory_get", {"id": MISSING_ID})
            assert denied.is_error
            assert denied.content[0].text.startswith("not_found")  # type: ignore[union-attr]

            answer = curl(gateway.ops_port, "/metrics")
        assert answer.status == 200 and answer.content_type.startswith("text/plain")
        body = answer.body
        for metric in METRIC_NAMES:
            assert metric in body, metric
        counters = [
            line.split()[2] for line in body.splitlines() if line.startswith("# TYPE") and line.endswith(" counter")
        ]
        assert counters and all(counter.endswith("_total") for counter in counters), counters
        assert "_created" not in body

        assert value(body, "agent_gateway_tool_calls_total", tool="memory_store", outcome="ok") == 1
        assert value(body, "agent_gateway_tool_calls_total", tool="memory_get", outcome="ok") == 1
        assert value(body, "agent_gateway_tool_calls_total", tool="memory_get", outcome="not_found") == 1
        assert value(body, "agent_gateway_tool_calls_total", tool="memory_search", outcome="ok") == 1
        assert value(body, "agent_gateway_tool_call_duration_seconds_count", tool="memory_get") == 2
        duration = value(body, "agent_gateway_tool_call_duration_seconds_sum", tool="memory_get")
        assert duration is not None and 0 < duration < 20
        assert value(body, "agent_gateway_guardian_errors_total", code="NOT_FOUND") == 1
        sessions = value(body, "agent_gateway_sessions_open")
        assert sessions is not None and sessions >= 1

        # Every label value is from a bounded set the code defines.
        for (sample, labels), _ in samples(body).items():
            found = dict(labels)
            if "tool" in found:
                assert found["tool"] in TOOL_NAMES, sample
            if "outcome" in found:
                assert found["outcome"] in OUTCOMES, sample
        for secret in (MARKER, token, token.removeprefix("agt_"), name, memory_id):
            assert secret not in body, secret
        assert gateway.stop() == 0
    log = gateway.log_path.read_text()
    assert MARKER not in log and token not in log
    assert any(entry.get("event") == "ops_listening" for entry in gateway.log_entries())


async def test_guardian_down_and_restart_show_in_the_metrics(guardian: Guardian, agent: tuple[str, str]) -> None:
    _, token = agent
    with restarted_afterwards(guardian), running_gateway(guardian, "http", token) as gateway:
        port = gateway.ops_port
        async with http_client(gateway.mcp_url, token) as client:
            await call(client, "memory_list")
            assert value(curl(port, "/metrics").body, "agent_gateway_guardian_reconnects_total") == 0
            guardian.stop(signal.SIGKILL)  # its sessions die with it
            with pytest.raises(MCPError, match="unavailable"):
                await client.call_tool("memory_store", {"content": "while the guardian is down"})
            down = curl(port, "/metrics").body
            assert value(down, "agent_gateway_tool_calls_total", tool="memory_store", outcome="unavailable") == 1
            assert (value(down, "agent_gateway_guardian_errors_total", code="UNAVAILABLE") or 0) >= 1
            guardian.start()
            assert wait_ready(port, ready=True).status == 200
            await call(client, "memory_list")  # the stale session is refused, re-opened, and the call repeated
            body = curl(port, "/metrics").body
        assert value(body, "agent_gateway_guardian_reconnects_total") == 1
        assert value(body, "agent_gateway_guardian_errors_total", code="UNAUTHENTICATED") == 1
        assert value(body, "agent_gateway_tool_calls_total", tool="memory_list", outcome="ok") == 2
        assert gateway.stop() == 0
    assert token not in gateway.log_path.read_text()
