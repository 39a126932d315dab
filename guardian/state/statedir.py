"""Creating a guardian state directory (``guardianctl init``).

Safe to run twice: it creates what is missing and never overwrites a key,
the database, the config or the policy.
"""

from __future__ import annotations

import fcntl
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from guardian.access.key_file import create_key_file
from guardian.access.signed_request import PublicKey
from guardian.keys.ring import create_keys
from guardian.keys.rotated import load_all_keys
from guardian.policy.compile import load_policy
from guardian.policy.default import render_default_policy
from guardian.state.config import load_config, render_default_config
from guardian.store.database import Database
from shared.errors import ConfigError
from shared.formats import AGENT_NAME_RE

__all__ = [
    "CONFIG_FILE",
    "LOCAL_ADMIN_KEY",
    "LOCK_FILE",
    "FirstAdmin",
    "InitReport",
    "StateDirFiles",
    "init_state_dir",
    "lock_state_dir",
]

#: The config file's name in a state dir made by init_state_dir.
CONFIG_FILE = "config.yaml"


@dataclass
class InitReport:
    """What init did."""

    config: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _write_new(path: Path, text: str, mode: int, report: InitReport) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        report.kept.append(path)
        return
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    report.created.append(path)


class StateDirFiles:
    """Where the files of an initialised state dir are, as its config.yaml says (for tools that drive a guardian)."""

    state_dir: Path

    @property
    def config(self) -> Path:
        """Its config.yaml."""
        return self.state_dir / CONFIG_FILE

    @property
    def agent_socket(self) -> Path:
        """The agent socket's path."""
        return load_config(self.config).agent_socket.path

    @property
    def admin_socket(self) -> Path:
        """The admin socket's path."""
        return load_config(self.config).admin_socket.path

    @property
    def database(self) -> Path:
        """The database file's path."""
        return load_config(self.config).database


#: The admin key init makes for local use when no admin's public key is given (guardian/ctl/signing.py).
LOCAL_ADMIN_KEY = "admin.key"


@dataclass(frozen=True)
class FirstAdmin:
    """The person init enrols (with the security role), when the guardian first starts."""

    name: str
    #: Their OpenSSH public key; None: init makes a key file in the state dir for local use.
    public_key: PublicKey | None = None


def init_state_dir(state_dir: Path, first_admin: FirstAdmin | None = None) -> InitReport:
    """Create (or complete) a working state dir and check it loads.

    The first admin goes into the first-admins file, which the guardian reads when it starts
    with no admin enrolled; without one, init makes a key (admin.key, 0600) for the user
    running it, for local use.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    report = InitReport(config=state_dir / CONFIG_FILE)
    _write_new(report.config, render_default_config(), 0o640, report)
    config = load_config(report.config)
    _write_new(config.policy, render_default_policy(), 0o640, report)
    load_policy(config.policy)
    if config.database.exists() and not (config.keys_dir / "db.key").exists():
        raise ConfigError(
            f"the database {config.database} exists but its key {config.keys_dir / 'db.key'} is missing;"
            " restore the key from its backup (a new key cannot open the existing data)"
        )
    created_keys = create_keys(config.keys_dir)
    report.created += created_keys
    keys = load_all_keys(config.keys_dir, config.state_dir)
    existed = config.database.exists()
    Database(config.database, keys.database_hexes).close()
    (report.kept if existed else report.created).append(config.database)
    if not config.first_admins.exists():
        admin = first_admin or FirstAdmin(_login_name())
        key = admin.public_key
        if key is None:
            local_key = config.state_dir / LOCAL_ADMIN_KEY
            if local_key.exists():
                raise ConfigError(
                    f"{local_key} exists but {config.first_admins} does not: remove one or write the other"
                )
            key = create_key_file(local_key, f"{admin.name}@agent-guardian")
            report.created.append(local_key)
        _write_new(config.first_admins, f"{admin.name} security {key.openssh}\n", 0o640, report)
    else:
        report.kept.append(config.first_admins)
    return report


def _login_name() -> str:
    """The name of the user running init, as an admin name."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = f"uid-{os.getuid()}"
    return name if AGENT_NAME_RE.fullmatch(name) else "admin"


#: The file a running guardian holds locked, so two never share a state dir and a restore can tell.
LOCK_FILE = "guardian.lock"


def lock_state_dir(state_dir: Path) -> int:
    """Hold the state dir's lock (an exclusive flock, released when the process exits); its fd.

    Raises ConfigError when another process holds it: a guardian is already running there.
    """
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another guardian is running on {state_dir} (it holds {LOCK_FILE}); stop it first"
            " (systemctl stop agent-guardian)"
        ) from None
    return fd
