"""`make run` (tools/run_local.py) on a fresh state dir: all three processes start, the local agent is registered
through the signed admin socket, an MCP client stores and reads through the printed config, and Ctrl-C stops
everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.harness import ROOT
from tests.support.mcp_harness import call, http_client

pytestmark = pytest.mark.anyio

_BANNER = "agent-guardian is running."


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _printed_config(output: Path, process: subprocess.Popen[bytes], timeout_s: float) -> dict[str, object]:
    """The MCP client config run_local prints once everything is up (it follows the banner line)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = output.read_text()
        if _BANNER in text and "State:" in text:
            start = text.index("{", text.index(_BANNER))
            block: dict[str, object] = json.JSONDecoder().raw_decode(text[start:])[0]
            return block
        assert process.poll() is None, f"run_local exited with {process.returncode}:\n{text[-3000:]}"
        time.sleep(0.2)
    pytest.fail(f"run_local printed no config within {timeout_s} s:\n{output.read_text()[-3000:]}")


async def test_make_run_serves_an_agent_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    port, ops_port = _free_port(), _free_port()
    output = tmp_path / "run.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tools" / "run_local.py"),
                "--state-dir",
                str(tmp_path / "var"),
                "--port",
                str(port),
                "--gateway-ops-port",
                str(ops_port),
            ],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the test stops exactly what it started
        )
    try:
        config = _printed_config(output, process, timeout_s=120)
        server = config["mcpServers"]["agent-guardian"]  # type: ignore[index]
        token = server["headers"]["Authorization"].removeprefix("Bearer ")
        token_file = tmp_path / "var" / "local-agent.token"
        assert token_file.read_text().strip() == token and (token_file.stat().st_mode & 0o777) == 0o600
        async with http_client(server["url"], token) as client:
            stored = await call(client, "memory_store", content="make run works end to end")
            got = await call(client, "memory_get", id=stored["memory"]["id"])
            assert got["memory"]["content"] == "make run works end to end"
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal
        assert process.wait(timeout=60) == 0, output.read_text()[-3000:]
        assert "stopped." in output.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
