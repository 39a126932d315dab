"""A listening Unix socket's path made free for a new server: a stale file from a crash goes, a live one stops us."""

from __future__ import annotations

import contextlib
import errno
import socket
import stat
from pathlib import Path

from shared.errors import ConfigError

__all__ = ["remove_stale_socket"]


def remove_stale_socket(path: Path, server: str) -> None:
    """Remove a socket file left by a server that died; refuse if one is still serving (server names it)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"cannot tell whether {path} is in use: {exc.strerror}") from exc
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise ConfigError(f"another {server} is already serving on {path}")
