"""The guardian's listening sockets: filesystem Unix sockets whose mode,
owner and group are the access control (grpcio cannot tell who the peer is).

Before binding: the socket directory exists with the configured mode, owned
by this user, and no one else can write to it; a stale socket file from a
crash is removed, a live one means another guardian is running. After
binding: mode and group are set explicitly and then checked. (The stale-socket
removal is shared with the embedder: shared/unix_socket.py.)
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from guardian.state.config import SocketConfig
from shared.errors import ConfigError

__all__ = ["prepare_socket_dir", "secure_socket"]


def prepare_socket_dir(directory: Path, mode: int) -> None:
    """Create the socket directory if needed and make sure only its owner can write to it."""
    directory.mkdir(mode=mode, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the socket directory {directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"the socket directory {directory} must be owned by the guardian's user")
    os.chmod(directory, mode)
    if stat.S_IMODE(directory.stat().st_mode) != mode:
        raise ConfigError(f"could not set mode {mode:04o} on the socket directory {directory}")


def secure_socket(config: SocketConfig) -> None:
    """Set the bound socket's group and mode, then verify them."""
    path = config.path
    os.chown(path, -1, config.group_id, follow_symlinks=False)
    os.chmod(path, config.mode)
    info = path.lstat()
    problems = []
    if not stat.S_ISSOCK(info.st_mode):
        problems.append("is not a socket")
    if stat.S_IMODE(info.st_mode) != config.mode:
        problems.append(f"has mode {stat.S_IMODE(info.st_mode):04o}, not {config.mode:04o}")
    if info.st_uid != os.geteuid():
        problems.append("is not owned by the guardian's user")
    if info.st_gid != config.group_id:
        problems.append(f"has group {info.st_gid}, not {config.group_id}")
    if problems:
        raise ConfigError(f"the socket {path} " + ", ".join(problems))
