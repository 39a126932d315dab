"""`make run`: the embedder, the guardian and the gateway on a local state dir, as the current user.

Creates the state dir on first run (keys, encrypted DB, default policy),
starts agent-embedder on the socket the config names (when it names one) and
the guardian, registers a local agent once (its token is kept in
STATE_DIR/local-agent.token, mode 0600, since a token is shown only once),
starts the gateway on streamable HTTP at 127.0.0.1, prints a ready-to-paste
MCP client config, and on Ctrl-C stops them all (gateway first, embedder last).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from guardian.access.key_file import KeyFileSigner  # noqa: E402
from guardian.ctl.connection import call_signed  # noqa: E402
from guardian.ctl.signing import LOCAL_KEY_FILE  # noqa: E402
from guardian.state.config import EmbedderService, load_config  # noqa: E402
from guardian.state.statedir import init_state_dir  # noqa: E402
from shared.rpc.guardian.v1 import admin_pb2  # noqa: E402


def _wait_for(check: object, what: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {what} exited with code {process.returncode}; see its log above")
        if callable(check) and check():
            return
        time.sleep(0.1)
    raise SystemExit(f"the {what} did not become ready within {timeout_s:.0f} s")


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _local_token(state_dir: Path, admin_socket: Path) -> str:
    token_file = state_dir / "local-agent.token"
    if token_file.exists():
        return token_file.read_text().strip()
    # Signed, as every admin request must be, by the state dir's own admin key (made and enrolled by init).
    signer = KeyFileSigner(state_dir / LOCAL_KEY_FILE)
    listed = call_signed(str(admin_socket), signer, "ListAgents", admin_pb2.ListAgentsRequest())
    names = {agent.name for agent in listed.agents}
    name = "local" if "local" not in names else f"local-{int(time.time())}"
    token = str(call_signed(str(admin_socket), signer, "AddAgent", admin_pb2.AddAgentRequest(name=name)).token)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def _start_embedder(socket_path: Path) -> subprocess.Popen[bytes]:
    """agent-embedder on socket_path (its directory made private first, as the guardian makes it)."""
    socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "embedder", "--socket", str(socket_path)], cwd=ROOT)


def main() -> None:
    """Run the processes until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default="var", type=Path)
    parser.add_argument("--port", default=8765, type=int, help="gateway HTTP port on 127.0.0.1")
    parser.add_argument(
        "--gateway-ops-port", default=9465, type=int, help="gateway /healthz, /readyz, /metrics on 127.0.0.1"
    )
    args = parser.parse_args()
    state_dir = args.state_dir.resolve()
    report = init_state_dir(state_dir)
    config = load_config(report.config)
    python = sys.executable
    embedder_socket = config.embedding.socket if isinstance(config.embedding, EmbedderService) else None
    embedder = _start_embedder(embedder_socket) if embedder_socket is not None else None
    guardian = subprocess.Popen([python, "-m", "guardian.daemon.main", "--config", str(report.config)], cwd=ROOT)
    gateway: subprocess.Popen[bytes] | None = None
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        _wait_for(config.admin_socket.path.exists, "guardian", 30, guardian)
        token = _local_token(state_dir, config.admin_socket.path)
        socket_path = config.agent_socket.path
        gateway = subprocess.Popen(
            [
                python,
                "-m",
                "gateway.cli",
                "--transport",
                "http",
                "--port",
                str(args.port),
                "--socket",
                str(socket_path),
                "--ops-listen",
                f"127.0.0.1:{args.gateway_ops_port}",
            ],
            cwd=ROOT,
        )
        _wait_for(lambda: _port_open(args.port), "gateway", 30, gateway)
        client_config = {
            "mcpServers": {
                "agent-guardian": {
                    "type": "http",
                    "url": f"http://127.0.0.1:{args.port}/mcp",
                    "headers": {"Authorization": f"Bearer {token}"},
                },
                "agent-guardian-stdio": {
                    "command": str(Path(python).parent / "agent-gateway"),
                    "args": ["--transport", "stdio", "--socket", str(config.agent_socket.path)],
                    "env": {"AGENT_GUARDIAN_TOKEN": token},
                },
            }
        }
        print("\nagent-guardian is running. MCP client config (pick one server entry):\n", flush=True)
        print(json.dumps(client_config, indent=2), flush=True)
        print(f"\nState: {state_dir}   Admin: guardianctl --config {report.config} agents list")
        guardian_ops = f"http://{config.ops_listen[0]}:{config.ops_listen[1]}" if config.ops_listen else "off"
        print(
            f"Health and metrics: guardian {guardian_ops}/readyz, gateway http://127.0.0.1:{args.gateway_ops_port}/metrics"
        )
        if embedder_socket is not None:
            print(f"Recall by meaning: agent-embedder on {embedder_socket}")
        print("Press Ctrl-C to stop them all.\n", flush=True)
        running = [process for process in (embedder, guardian, gateway) if process is not None]
        while not stopping and all(process.poll() is None for process in running):
            time.sleep(0.2)
    finally:
        for process in (gateway, guardian, embedder):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        print("stopped.", flush=True)


if __name__ == "__main__":
    main()
