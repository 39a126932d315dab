"""The guardian's process configuration (``config.yaml``): where its files and
sockets are. Decisions about requests live in the policy, not here.

Relative paths are resolved against the directory holding the config file.
"""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass
from pathlib import Path

from guardian.yamlfile import Section, load_yaml_mapping
from shared.errors import ConfigError

__all__ = ["GuardianConfig", "SocketConfig", "load_config", "render_default_config"]

# A Unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class SocketConfig:
    """One listening socket: its path, the group allowed to connect, its mode."""

    path: Path
    group_id: int
    mode: int


@dataclass(frozen=True)
class GuardianConfig:
    """The validated configuration of one guardian."""

    config_path: Path
    state_dir: Path
    database: Path
    keys_dir: Path
    policy: Path
    socket_dir: Path
    socket_dir_mode: int
    agent_socket: SocketConfig
    admin_socket: SocketConfig
    log_level: str
    shutdown_grace_s: float
    #: How often the housekeeping thread runs (retention purges, forgetting idle state).
    housekeeping_interval_ms: int


def load_config(path: Path) -> GuardianConfig:
    """Read and validate config.yaml; raises ConfigError naming the offending key."""
    path = path.resolve()
    data, _ = load_yaml_mapping(path, "config")
    base = path.parent
    top = Section(data, "")
    state_dir = _resolve(base, top.text("state_dir", "."))
    database = _resolve(base, top.text("database", "data/memory.db"))
    keys_dir = _resolve(base, top.text("keys_dir", "keys"))
    policy = _resolve(base, top.text("policy", "policy.yaml"))
    sockets = top.section("sockets")
    socket_dir = _resolve(base, sockets.text("dir", "run"))
    socket_dir_mode = _mode(sockets, "dir_mode", "0700")
    mode = _mode(sockets, "mode", "0660")
    agent_socket = SocketConfig(
        path=_socket_path(sockets, "agent", socket_dir / "agent.sock", base),
        group_id=_group(sockets, "agent_group"),
        mode=mode,
    )
    admin_socket = SocketConfig(
        path=_socket_path(sockets, "admin", socket_dir / "admin.sock", base),
        group_id=_group(sockets, "admin_group"),
        mode=mode,
    )
    sockets.done()
    if agent_socket.path == admin_socket.path:
        raise ConfigError("sockets.admin: must differ from sockets.agent")
    logging = top.section("logging")
    log_level = logging.text("level", "info").lower()
    if log_level not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"logging.level: expected debug, info, warning or error, got {log_level!r}")
    logging.done()
    shutdown_grace_s = top.integer("shutdown_grace_seconds", 10, minimum=0, maximum=600)
    housekeeping_interval_ms = top.duration_ms("housekeeping_interval", "5s")
    top.done()
    return GuardianConfig(
        config_path=path,
        state_dir=state_dir,
        database=database,
        keys_dir=keys_dir,
        policy=policy,
        socket_dir=socket_dir,
        socket_dir_mode=socket_dir_mode,
        agent_socket=agent_socket,
        admin_socket=admin_socket,
        log_level=log_level,
        shutdown_grace_s=float(shutdown_grace_s),
        housekeeping_interval_ms=housekeeping_interval_ms,
    )


def render_default_config() -> str:
    """The config.yaml that `guardianctl init` writes into a new state dir."""
    return """\
# agent-guardian configuration: where the guardian keeps its files and sockets.
# Relative paths are relative to this file's directory.
state_dir: .
database: data/memory.db
keys_dir: keys
policy: policy.yaml
sockets:
  dir: run
  # 0700 when everything runs as one user; 0755 under systemd, where the
  # sockets' own mode and group decide who may connect.
  dir_mode: "0700"
  agent: run/agent.sock
  admin: run/admin.sock
  # Group allowed to connect to each socket (name or number);
  # omitted: the guardian's own primary group.
  # agent_group: agent-gateway
  # admin_group: agent-security
  mode: "0660"
logging:
  level: info
shutdown_grace_seconds: 10
housekeeping_interval: 5s     # retention purges and forgetting idle sessions and rate-limit state
"""


def _resolve(base: Path, value: str) -> Path:
    return (base / value).resolve() if not os.path.isabs(value) else Path(value)


def _mode(section: Section, key: str, default: str) -> int:
    value = section.text(key, default)
    try:
        mode = int(value, 8)
    except ValueError:
        raise ConfigError(f'{section.child_path(key)}: expected an octal mode like "0660", got {value!r}') from None
    if mode & ~0o777 or mode & 0o007:
        raise ConfigError(f"{section.child_path(key)}: must grant nothing to others (got {value})")
    return mode


def _socket_path(section: Section, key: str, default: Path, base: Path) -> Path:
    value = section.text(key, str(default))
    path = _resolve(base, value)
    if len(os.fsencode(str(path))) > _MAX_SOCKET_PATH:
        raise ConfigError(
            f"sockets.{key}: the path is longer than a Unix socket allows ({_MAX_SOCKET_PATH} bytes);"
            " choose a shorter state dir or socket path"
        )
    return path


def _group(section: Section, key: str) -> int:
    section_value = section.optional(key, (str, int))
    if section_value is None:
        return os.getegid()
    if isinstance(section_value, int):
        return section_value
    try:
        return grp.getgrnam(str(section_value)).gr_gid
    except KeyError:
        raise ConfigError(f"{section.child_path(key)}: no such group {section_value!r}") from None
