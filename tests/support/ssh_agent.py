"""A real OpenSSH ssh-agent and keys made by ssh-keygen, for the tests of signed admin requests."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from guardian.access.signed_request import PublicKey


@dataclass(frozen=True)
class SshAgent:
    """An ssh-agent listening on socket, started (and stopped) by PID."""

    socket: Path
    process: subprocess.Popen[bytes]

    @property
    def env(self) -> dict[str, str]:
        """The environment a client uses it with."""
        return {"SSH_AUTH_SOCK": str(self.socket)}

    def add(self, key_file: Path) -> None:
        """ssh-add key_file."""
        subprocess.run(
            ["ssh-add", str(key_file)], env={**os.environ, **self.env}, check=True, capture_output=True, timeout=10
        )


def make_key(path: Path, comment: str) -> PublicKey:
    """A new unencrypted ed25519 key made by ssh-keygen at path (and path.pub); its public key."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=10,
    )
    return PublicKey.parse(path.with_name(path.name + ".pub").read_text())


@contextmanager
def running_ssh_agent() -> Iterator[SshAgent]:
    """A foreground ssh-agent on a socket of its own; killed by PID after."""
    directory = Path(tempfile.mkdtemp(prefix="agt-", dir="/tmp"))
    socket = directory / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.02)
        yield SshAgent(socket, process)
    finally:
        process.terminate()
        process.wait(timeout=10)
        socket.unlink(missing_ok=True)
        directory.rmdir()
