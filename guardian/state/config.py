"""The guardian's process configuration (``config.yaml``): where its files and
sockets are. Decisions about requests live in the policy, not here.

Relative paths are resolved against the directory holding the config file.
"""

from __future__ import annotations

import grp
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from guardian.files.strict_yaml import Section, load_yaml_mapping
from guardian.recall.model import BUILTIN, ModelFiles
from guardian.store.database import DEFAULT_MIN_FREE_BYTES, Durability
from shared.embedding import MAX_DIMS, TRANSFORMER_DIMS, TRANSFORMER_ID
from shared.errors import ConfigError
from shared.ops_http import parse_listen
from shared.otlp import check_endpoint

__all__ = ["GuardianConfig", "SocketConfig", "load_config", "render_default_config"]

# A Unix socket path must fit sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_SIZE_RE: Final = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB)?")
#: A model id as agent-embedder makes them (embedder/encoder.py), e.g. bert-int8-384-53aa51172d142c89.
_MODEL_ID_RE: Final = re.compile(r"[a-z0-9][a-z0-9.-]{0,63}")
_SIZE_UNITS: Final = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


@dataclass(frozen=True)
class SocketConfig:
    """One listening socket: its path, the group allowed to connect, its mode."""

    path: Path
    group_id: int
    mode: int


@dataclass(frozen=True)
class EmbedderService:
    """agent-embedder, reached on its Unix socket (guardian/recall/remote.py), and the model it must serve."""

    socket: Path
    #: The id and dimensions of the model the guardian accepts vectors of (the shipped one unless set).
    model_id: str = TRANSFORMER_ID
    dims: int = TRANSFORMER_DIMS


@dataclass(frozen=True)
class GuardianConfig:
    """The validated configuration of one guardian."""

    config_path: Path
    state_dir: Path
    database: Path
    keys_dir: Path
    policy: Path
    #: The admins enrolled when the guardian starts with none (guardian/access/admins.py).
    first_admins: Path
    #: The OAuth issuer's public keys, as guardianctl oauth fetch-keys writes them (guardian/access/oauth.py).
    oauth_keys: Path
    #: Where the guardian's OpenTelemetry spans go over OTLP/HTTP (shared/otlp.py); "": not exported.
    otlp_endpoint: str
    #: CPU time per pipeline stage on /metrics (guardian/state/profile.py); for benchmarks.
    profile_stages: bool
    socket_dir: Path
    socket_dir_mode: int
    agent_socket: SocketConfig
    admin_socket: SocketConfig
    log_level: str
    #: Where the main log goes; None: stderr (journald under systemd).
    log_file: Path | None
    #: Where the security log goes; None: stderr, alongside the main log.
    security_log_file: Path | None
    #: Loopback HOST:PORT for /healthz, /readyz and /metrics; None: not served.
    ops_listen: tuple[str, int] | None
    #: How often the audit chain's head is published to the security log.
    audit_head_interval_ms: int
    shutdown_grace_s: float
    #: How often the housekeeping thread runs (retention purges, forgetting idle state).
    housekeeping_interval_ms: int
    #: normal: a commit survives a crash of the guardian; full: a power loss too (guardian/store/database.py).
    durability: Durability
    #: Writes that add data are refused (retryably) while less than this is free on the database's filesystem.
    min_free_bytes: int
    #: Where `guardianctl backup create` (and the backup timer) has the guardian write its backups.
    backup_dir: Path
    #: How many backups the guardian keeps there (the oldest beyond this are deleted).
    backup_keep: int
    #: What embeds: agent-embedder's socket, a static model's files (guardian/recall/model.py), or
    #: None: the static model shipped in the wordllama wheel.
    embedding: EmbedderService | ModelFiles | None = None


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
    first_admins = _resolve(base, top.text("first_admins", "first-admins"))
    sockets = top.section("sockets")
    socket_dir = _resolve(base, sockets.text("dir", "run"))
    socket_dir_mode = _mode(sockets, "dir_mode", "0700", others_may_traverse=True)
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
    log_file = _optional_path(base, logging, "file")
    security_log_file = _optional_path(base, logging, "security_file")
    logging.done()
    ops = top.section("ops")
    ops_text = ops.text("listen", "")
    ops_listen = parse_listen(ops_text, "ops.listen") if ops_text else None
    ops.done()
    audit = top.section("audit")
    audit_head_interval_ms = audit.duration_ms("head_interval", "60s")
    if audit_head_interval_ms < 1000:
        raise ConfigError("audit.head_interval: must be at least 1s")
    audit.done()
    shutdown_grace_s = top.integer("shutdown_grace_seconds", 10, minimum=0, maximum=600)
    housekeeping_interval_ms = top.duration_ms("housekeeping_interval", "5s")
    storage = top.section("storage")
    durability = storage.text("durability", "normal")
    if durability not in ("normal", "full"):
        raise ConfigError(f"storage.durability: expected normal or full, got {durability!r}")
    min_free_bytes = _size(storage, "min_free", f"{DEFAULT_MIN_FREE_BYTES // 1024**2}MiB")
    storage.done()
    backup = top.section("backup")
    backup_dir = _resolve(base, backup.text("dir", str(state_dir / "backups")))
    backup_keep = backup.integer("keep", 7, minimum=1, maximum=1000)
    backup.done()
    embedding = _embedding(base, top.section("embedding"))
    oauth_keys, (otlp_endpoint, profile_stages) = (
        _resolve(base, top.text("oauth_keys", "issuer-keys.json")),
        _tracing(top.section("tracing")),
    )
    top.done()
    return GuardianConfig(
        config_path=path,
        state_dir=state_dir,
        database=database,
        keys_dir=keys_dir,
        policy=policy,
        first_admins=first_admins,
        oauth_keys=oauth_keys,
        otlp_endpoint=otlp_endpoint,
        profile_stages=profile_stages,
        socket_dir=socket_dir,
        socket_dir_mode=socket_dir_mode,
        agent_socket=agent_socket,
        admin_socket=admin_socket,
        log_level=log_level,
        log_file=log_file,
        security_log_file=security_log_file,
        ops_listen=ops_listen,
        audit_head_interval_ms=audit_head_interval_ms,
        shutdown_grace_s=float(shutdown_grace_s),
        housekeeping_interval_ms=housekeeping_interval_ms,
        durability="full" if durability == "full" else "normal",
        min_free_bytes=min_free_bytes,
        backup_dir=backup_dir,
        backup_keep=backup_keep,
        embedding=embedding,
    )


def _embedding(base: Path, section: Section) -> EmbedderService | ModelFiles | None:
    """The ``embedding`` section: ``model: service`` and agent-embedder's socket, ``model: builtin``,
    or ``model: static`` and another static model's two files, each with its sha256."""
    model = section.text("model", BUILTIN)
    if model == BUILTIN:
        section.done()
        return None
    if model == "service":
        model_id = str(section.text("model_id", TRANSFORMER_ID))
        if not _MODEL_ID_RE.fullmatch(model_id):
            raise ConfigError(f"embedding.model_id: expected the id agent-embedder logs at start, got {model_id!r}")
        dims = section.integer("dims", TRANSFORMER_DIMS, minimum=8, maximum=MAX_DIMS)
        if dims % 2:
            raise ConfigError(f"embedding.dims: the index keeps two dimensions a byte, so it must be even, got {dims}")
        service = EmbedderService(socket=_resolve(base, section.text("socket")), model_id=model_id, dims=dims)
        section.done()
        return service
    if model != "static":
        raise ConfigError(f"embedding.model: expected service, builtin or static, got {model!r}")
    files = ModelFiles(
        weights=_resolve(base, section.text("weights")),
        weights_sha256=_sha256_text(section, "weights_sha256"),
        tokenizer=_resolve(base, section.text("tokenizer")),
        tokenizer_sha256=_sha256_text(section, "tokenizer_sha256"),
    )
    section.done()
    return files


def _sha256_text(section: Section, key: str) -> str:
    value = str(section.text(key)).lower()
    if _SHA256_RE.fullmatch(value) is None:
        raise ConfigError(f"embedding.{key}: expected the file's sha256, 64 hex digits")
    return value


def _tracing(tracing: Section) -> tuple[str, bool]:
    """The OTLP endpoint ("": none) and whether stages are profiled."""
    endpoint = str(tracing.text("otlp_endpoint", ""))
    if endpoint:
        check_endpoint(endpoint, "tracing.otlp_endpoint")
    profile_stages = tracing.flag("profile_stages", False)
    tracing.done()
    return endpoint, profile_stages


def render_default_config() -> str:
    """The config.yaml that `guardianctl init` writes into a new state dir."""
    return """\
# agent-guardian configuration: where the guardian keeps its files and sockets.
# Relative paths are relative to this file's directory.
state_dir: .
database: data/memory.db
keys_dir: keys
policy: policy.yaml
# The admins enrolled when the guardian starts with none, one a line: NAME ROLE ssh-ed25519 AAAA...
# (guardianctl init writes one for a key it makes, admin.key); ignored once any admin is enrolled.
first_admins: first-admins
# The OAuth issuer's public keys (the policy's oauth section), written by guardianctl oauth fetch-keys.
oauth_keys: issuer-keys.json
sockets:
  dir: run
  # 0700 when everything runs as one user; 0711 under systemd, where the
  # sockets' own mode and group decide who may connect (others may only traverse).
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
  # Omitted: both logs go to stderr (the journal under systemd). Set to write
  # JSON lines to files instead; systemd/logrotate.conf rotates them safely.
  # file: /var/log/agent-guardian/guardian.log
  # security_file: /var/log/agent-guardian/security.log
ops:
  # /healthz, /readyz and Prometheus /metrics; loopback only; "" turns it off.
  listen: "127.0.0.1:9464"
audit:
  head_interval: 60s          # how often the audit chain head goes to the security log
tracing:
  # OpenTelemetry spans over OTLP/HTTP (one per request, never content); "" turns it off.
  otlp_endpoint: ""           # e.g. http://127.0.0.1:4318/v1/traces
  # CPU time per pipeline stage on /metrics (guardian_stage_cpu_seconds_total); `make profile` turns it
  # on. It costs a few microseconds a request.
  profile_stages: false
shutdown_grace_seconds: 10
housekeeping_interval: 5s     # retention purges and forgetting idle sessions and rate-limit state
storage:
  # normal: an acknowledged write survives a crash of the guardian (SQLite WAL, synchronous=NORMAL);
  # after a power loss the database is intact but may lack the last writes before it.
  # full: the WAL is fsynced at every commit, so acknowledged writes survive a power loss too (slower).
  durability: normal
  # Writes that add data are refused (a retryable error) while less than this is free, so reads
  # and the audit trail keep working on a full disk. Sizes: 512KiB, 64MiB, 1GiB.
  min_free: 64MiB
backup:
  dir: backups                # `guardianctl backup create` writes verified, encrypted copies here
  keep: 7                     # and deletes the oldest beyond this many
embedding:
  # The local model that gives memory_search its meaning (no network, ever).
  # service: the transformer (all-MiniLM-L6-v2) run by agent-embedder, a separate process with
  #   no keys and no database, on this socket (`make run` starts it; under systemd, its own unit).
  #   While it is not answering, writes go on and are embedded when it is back; searches rank
  #   by words and say so.
  # builtin: a static model run inside the guardian: no other process, less recall by meaning.
  # static: another static model (a safetensors matrix of token vectors and its Hugging Face
  #   tokenizer.json), both named with their sha256; the guardian refuses to start if either differs.
  # A change of model embeds every memory again, in the background.
  model: service
  socket: run/embedder.sock
  # Serving another model (agent-embedder --weights ...)? Name the id it logs at start, and its size:
  # model_id: bert-int8-384-53aa51172d142c89
  # dims: 384
  # model: static
  # weights: /path/to/model.safetensors
  # weights_sha256: <64 hex digits>
  # tokenizer: /path/to/tokenizer.json
  # tokenizer_sha256: <64 hex digits>
"""


def _size(section: Section, key: str, default: str) -> int:
    """A size in bytes: a number with an optional unit (B, KiB, MiB, GiB)."""
    value = section.optional(key, (str, int))
    text = default if value is None else str(value)
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f'{section.child_path(key)}: expected a size like "64MiB" or "512KiB", got {text!r}')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _optional_path(base: Path, section: Section, key: str) -> Path | None:
    value = section.text(key, "")
    return _resolve(base, value) if value else None


def _resolve(base: Path, value: str) -> Path:
    return (base / value).resolve() if not os.path.isabs(value) else Path(value)


def _mode(section: Section, key: str, default: str, *, others_may_traverse: bool = False) -> int:
    """An octal mode that grants others nothing (a directory may let them traverse: o+x, never r or w)."""
    value = section.text(key, default)
    try:
        mode = int(value, 8)
    except ValueError:
        raise ConfigError(f'{section.child_path(key)}: expected an octal mode like "0660", got {value!r}') from None
    forbidden = 0o006 if others_may_traverse else 0o007
    if mode & ~0o777 or mode & forbidden:
        allowed = "nothing but traversal (o+x)" if others_may_traverse else "nothing"
        raise ConfigError(f"{section.child_path(key)}: must grant others {allowed} (got {value})")
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
