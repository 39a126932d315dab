"""Issues 6, 15 and 17: deployed as three users under a real systemd, installed in one command, restarted unit by unit.

systemd boots as PID 1 in a throwaway Debian 12 root (tests/system/throwaway_root.py
says how, and why it never touches the host's own root); the working tree is
copied to /usr/src/agent-guardian there and ``systemd/install.sh`` runs twice.
Then, as real users of that system: who may reach which socket and read which
file; who may sign admin requests (root with the key install.sh made for it, the
security team's "sec" with a key made by ssh-keygen and enrolled by root, the
backup timer's unit with its own key as a credential) and how the audit names
them; what agent-embedder can do from inside its own unit's sandbox (run again
with ``systemd-run`` and the installed unit's settings); the exposure scores of
the units; recall by meaning through the gateway; four MCP clients writing
through the gateway while the guardian is restarted, the gateway is restarted,
the policy is reloaded and the embedder is restarted; and uninstall (keeping
data, then purging).

It needs root, namespaces, a cgroup2 hierarchy and debootstrap (installed with
apt-get when missing); otherwise it skips and says why.
AGENT_GUARDIAN_SYSTEM_TEST=off skips it; =require turns every skip into a failure (for CI).
The figures (exposure scores, restart figures, timings) are printed as it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_recall import NOTES, QUESTIONS
from tests.system.test_unit_exposure import LIMITS as MAX_EXPOSURE
from tests.system.throwaway_root import (
    BootedSystem,
    Unavailable,
    booted,
    check_host,
    fresh_copy,
    pristine_root,
    remove_copy,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SRC = "/usr/src/agent-guardian"
INSTALL = f"{SRC}/systemd/install.sh"
VENV_PYTHON = "/opt/agent-guardian/venv/bin/python"
CLIENTS = f"{SRC}/tests/system/mcp_clients.py"
PROBE = f"{SRC}/tests/system/access_probe.py"
#: Inside the root, on its disk (so the host sees it too): token files and load records.
WORK = "/var/tmp/agent-guardian-systest"
ETC = "/etc/agent-guardian"
AGENT_SOCKET = "/run/agent-guardian/agent.sock"
ADMIN_SOCKET = "/run/agent-guardian/admin.sock"
EMBEDDER_SOCKET = "/run/agent-embedder/embedder.sock"
#: The long-running units install.sh enables and starts, in its order.
SERVICES = ("agent-embedder.service", "agent-guardian.service", "agent-gateway.service")
DATABASE = "/var/lib/agent-guardian/data/memory.db"
KEY_FILES = ("db.key", "memory.keys", "audit.keys", "token.keys")
GUARDIAN_LOG = "/var/log/agent-guardian/guardian.log"
#: The admins install.sh provisions: root's own key, the backup timer's key, and the file naming both.
ROOT_KEY = "/root/.config/agent-guardian/admin.key"
BACKUP_KEY = f"{ETC}/credentials/backup-admin.key"
FIRST_ADMINS = f"{ETC}/first-admins"
#: Where a person's admin key is made (guardian/ctl/signing.py finds it there), under their home.
USER_KEY = ".config/agent-guardian/admin.key"
SECURITY_LOG = "/var/log/agent-guardian/security.log"

LOAD_CLIENTS = 4
MAX_CALL_LATENCY_S = 15.0
MAX_RECOVERY_S = 2.0
#: After the embedder is back, every memory written while it was away is embedded within this.
MAX_EMBED_CATCH_UP_S = 30.0
#: The shipped sentence encoder's id begins so (guardian/recall: BERT, int8 weights, 384 dimensions).
EMBEDDING_MODEL_PREFIX = "bert-int8-384-"
#: Install runs under this umask the first time: the venv must still be readable by the gateway's user.
STRICT_UMASK = "077"
#: Environment for install.sh: pip verifies PyPI against the (host's) CA bundle copied into the root.
INSTALL_ENV = (
    "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
    "PIP_DISABLE_PIP_VERSION_CHECK=1",
    "PIP_DEFAULT_TIMEOUT=120",
)


def report(capsys: pytest.CaptureFixture[str], *lines: str) -> None:
    """Print to the terminal even under capture, so `make test` shows the figures."""
    with capsys.disabled():
        print()
        for line in lines:
            print(f"  [systemd system test] {line}")


@dataclass
class Deployment:
    """The booted system after two installs, and what was observed around them."""

    system: BootedSystem
    run: Path
    timings: dict[str, float] = field(default_factory=dict)
    cold_cache: bool = False
    first_install_output: str = ""
    second_install_output: str = ""
    keys_before: dict[str, str] = field(default_factory=dict)
    keys_after: dict[str, str] = field(default_factory=dict)
    edited_policy: str = ""
    edited_config: str = ""
    kept_memory_id: str = ""
    kept_memory_content: str = ""
    #: sec's key (made by ssh-keygen as sec), as `ssh-keygen -l` prints its fingerprint.
    sec_fingerprint: str = ""
    #: guardianctl as sec with that key before root enrolled it: refused by the guardian.
    sec_unenrolled: subprocess.CompletedProcess[str] | None = None

    @property
    def root(self) -> Path:
        return self.system.root

    def host_path(self, inside: str) -> Path:
        """Where a file of the root's disk is on the host (not for /run or /tmp: those are tmpfs inside)."""
        return self.root / inside.lstrip("/")

    def ctl(self, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.system.run(["guardianctl", *args], user=user, check=check)

    def add_agent(self, name: str, owner: str = "root") -> str:
        """Register an agent; its token goes to a 0600 file in owner's 0700 dir in WORK; returns its path inside."""
        token = json.loads(self.ctl("--json", "agents", "add", name).stdout)["token"]
        path = f"{self.work(owner)}/{name}.token"
        self.host_path(path).write_text(token + "\n")
        self.system.run(["chown", f"{owner}:", path])
        self.system.run(["chmod", "0600", path])
        return path

    def work(self, owner: str) -> str:
        """owner's own 0700 directory in WORK (created on first use); its path inside."""
        path = f"{WORK}/{owner}"
        if not self.host_path(path).exists():
            self.host_path(path).mkdir()
            self.system.run(["chown", f"{owner}:", path])
            self.system.run(["chmod", "0700", path])
        return path

    def mcp(self, *args: str, user: str | None = None) -> dict[str, Any]:
        result = self.system.run([VENV_PYTHON, CLIENTS, *args], user=user, timeout=120)
        return dict(json.loads(result.stdout))


def _copy_source(target: Path) -> None:
    """The working tree as `git archive` would see it if it were committed: tracked and untracked, not ignored."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if listing.returncode == 0:
        for name in listing.stdout.decode().split("\0"):
            source = REPO / name
            if name and source.is_file():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    else:  # not a git checkout
        ignored = shutil.ignore_patterns(".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache")
        shutil.copytree(REPO, target, ignore=ignored, dirs_exist_ok=True)
    subprocess.run(["chmod", "-R", "u=rwX,go=rX", str(target)], check=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _install(system: BootedSystem, *args: str, umask: str = "022") -> str:
    """systemd/install.sh inside the root; its output. Runs in the host's network namespace, for PyPI."""
    result = system.run(
        ["/bin/sh", "-c", f'umask {umask} && exec "$@"', "install", INSTALL, *args],
        net=False,
        timeout=900,
        extra_env=INSTALL_ENV,
    )
    return result.stdout + result.stderr


def _edit_yaml(path: Path, edit: Any) -> str:
    """Rewrite a YAML file in place (keeping its owner and mode), as an administrator would; the new text."""
    data = yaml.safe_load(path.read_text())
    edit(data)
    text = "# edited by the system test\n" + yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return text


def _open_rate_limits(policy: dict[str, Any]) -> None:
    """Four clients writing flat out must not be rate limited or locked: the test is about restarts."""
    fast = {"burst": 10000, "per_minute": 600000}
    policy["rate_limits"] = {
        "session": {"reads": fast, "writes": fast},
        "agent": {"reads": fast, "writes": fast},
        "session_opens": {"burst": 1000, "per_minute": 10000},
        "cooldown": "10s",
    }
    policy["anomaly"]["burst"] = {"threshold": 1000000, "window": "10s", "response": "log"}


def _file_logs(config: dict[str, Any]) -> None:
    config["logging"] = {"level": "info", "file": GUARDIAN_LOG, "security_file": SECURITY_LOG}


def _make_user_key(system: BootedSystem, user: str) -> str:
    """user makes an admin key with ssh-keygen where guardianctl finds it (~/.config); its fingerprint."""
    made = (
        'mkdir -p -m 0700 "$HOME/.config/agent-guardian"'
        f' && ssh-keygen -q -t ed25519 -N "" -C "$(id -un)@systest" -f "$HOME/{USER_KEY}"'
        f' && ssh-keygen -l -f "$HOME/{USER_KEY}.pub"'
    )
    return system.run(["/bin/sh", "-c", made], user=user).stdout.split()[1]


def _fingerprint(system: BootedSystem, public_key_file: str) -> str:
    """A public key file's SHA256 fingerprint, as ssh-keygen prints it (inside the root, as root)."""
    return system.run(["ssh-keygen", "-l", "-f", public_key_file]).stdout.split()[1]


def _audit_rows(d: Deployment, *filters: str, user: str = "sec") -> list[dict[str, Any]]:
    """`guardianctl --json audit query` rows (one JSON object a line), filtered as given."""
    shown = d.ctl("--json", "audit", "query", "--limit", "1000", *filters, user=user).stdout
    return [json.loads(line) for line in shown.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def deployed() -> Iterator[Deployment]:
    mode = os.environ.get("AGENT_GUARDIAN_SYSTEM_TEST", "auto")
    if mode == "off":
        pytest.skip("AGENT_GUARDIAN_SYSTEM_TEST=off")
    started = time.monotonic()
    try:
        check_host()
        pristine, cold = pristine_root()
    except Unavailable as why:
        if mode == "require":
            pytest.fail(f"the system test cannot run here: {why}")
        pytest.skip(f"the systemd system test cannot run here: {why}")
    timings = {"debootstrap (cold cache only)": time.monotonic() - started}
    run = fresh_copy(pristine)
    try:
        _copy_source(run / "root" / SRC.lstrip("/"))
        timings["fresh copy of the root and the source"] = time.monotonic() - started - sum(timings.values())
        with booted(run) as system:
            mark = time.monotonic()
            system.wait_until_running()
            timings["boot to running"] = time.monotonic() - mark
            deployment = Deployment(system=system, run=run, timings=timings, cold_cache=cold)
            _install_twice(deployment)
            yield deployment
    finally:
        remove_copy(run)


def _install_twice(d: Deployment) -> None:
    """Install; add a memory, edit the policy and config; install again (all kept: checked by the first test)."""
    system = d.system
    system.run(["useradd", "--create-home", "mallory"])
    d.host_path(WORK).mkdir(mode=0o711)
    mark = time.monotonic()
    d.first_install_output = _install(system, umask=STRICT_UMASK)
    d.timings["first install.sh (umask 077)"] = time.monotonic() - mark
    system.run(["useradd", "--create-home", "--groups", "agent-security", "sec"])
    # sec makes a key as a person would; before root enrols it the guardian refuses it, after it signs as sec.
    d.sec_fingerprint = _make_user_key(system, "sec")
    d.sec_unenrolled = d.ctl("--json", "whoami", user="sec", check=False)
    d.ctl("admins", "add", "sec", "--public-key", f"/home/sec/{USER_KEY}.pub", "--role", "security")
    # mallory has a key too (never enrolled): what stops her is the admin socket's mode, not a missing key.
    _make_user_key(system, "mallory")

    token = d.add_agent("keeper")
    d.kept_memory_content = "kept across a reinstall: the walrus hums at midnight"
    d.kept_memory_id = d.mcp("store", "--token-file", token, "--content", d.kept_memory_content)["ids"][0]
    d.edited_policy = _edit_yaml(d.host_path(f"{ETC}/policy.yaml"), _open_rate_limits)
    d.edited_config = _edit_yaml(d.host_path(f"{ETC}/config.yaml"), _file_logs)
    d.keys_before = {name: _sha256(d.host_path(f"{ETC}/credentials/{name}")) for name in KEY_FILES}

    mark = time.monotonic()
    d.second_install_output = _install(system)
    d.timings["second install.sh"] = time.monotonic() - mark
    d.keys_after = {name: _sha256(d.host_path(f"{ETC}/credentials/{name}")) for name in KEY_FILES}


# -- install ---------------------------------------------------------------------------------------


def test_install_twice_keeps_keys_data_and_edited_policy(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    d = deployed
    report(
        capsys,
        f"root cache: {'cold (debootstrap ran)' if d.cold_cache else 'warm'}",
        *(f"{name}: {seconds:.1f} s" for name, seconds in d.timings.items()),
    )
    assert "guardianctl agents add" in d.first_install_output, d.first_install_output
    assert "generated /etc/agent-guardian/credentials/db.key" in d.first_install_output
    assert "agent-guardian install: generated" not in d.second_install_output, d.second_install_output
    assert "keeping /etc/agent-guardian/policy.yaml" in d.second_install_output
    assert "keeping /etc/agent-guardian/config.yaml" in d.second_install_output
    assert f"generated {ROOT_KEY}" in d.first_install_output
    assert f"generated {BACKUP_KEY}" in d.first_install_output
    assert f"wrote {FIRST_ADMINS}: root (role security) and backup (role operator)" in d.first_install_output
    assert "sudo guardianctl whoami" in d.first_install_output
    assert f"keeping {FIRST_ADMINS}" in d.second_install_output
    assert "guardianctl admins add backup" not in d.second_install_output  # its key was enrolled at first
    assert d.keys_after == d.keys_before
    assert d.host_path(f"{ETC}/policy.yaml").read_text() == d.edited_policy
    assert d.host_path(f"{ETC}/config.yaml").read_text() == d.edited_config
    in_force = json.loads(d.ctl("--json", "policy", "show").stdout)
    assert in_force["text"] == d.edited_policy, "the guardian does not run the edited policy"
    token = f"{WORK}/root/keeper.token"
    assert d.mcp("get", "--token-file", token, "--id", d.kept_memory_id)["content"] == d.kept_memory_content
    for unit in SERVICES:
        assert d.system.show(unit, "ActiveState") == "active"
        assert d.system.show(unit, "UnitFileState") == "enabled"
    source = d.host_path(SRC)
    left = [p.name for p in [*source.glob("build"), *source.glob("*.egg-info")]]
    assert left == [], f"install.sh left build output in the source tree it was run from: {left}"


def test_exposure_scores(deployed: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    """systemd-analyze security --offline=yes: inside on the installed units, and on the host on the shipped ones."""
    scores: dict[str, dict[str, float]] = {}
    for unit in SERVICES:
        inside = deployed.system.run(
            ["systemd-analyze", "security", "--offline=yes", "--no-pager", f"/etc/systemd/system/{unit}"]
        )
        scores.setdefault(unit, {})["installed, in the root (systemd 252)"] = _exposure(inside.stdout, unit)
        if shutil.which("systemd-analyze"):
            shipped = subprocess.run(
                ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(REPO / "systemd" / unit)],
                capture_output=True,
                text=True,
                check=False,
            )
            version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, check=False)
            where = f"shipped, on the host ({version.stdout.split('(')[0].strip()})"
            scores[unit][where] = _exposure(shipped.stdout, unit)
    report(
        capsys,
        *(f"exposure {unit}: " + ", ".join(f"{v:.1f} {k}" for k, v in found.items()) for unit, found in scores.items()),
    )
    for unit, found in scores.items():
        assert max(found.values()) <= MAX_EXPOSURE[unit], f"{unit}: {found} (limit {MAX_EXPOSURE[unit]})"


def _exposure(output: str, unit: str) -> float:
    match = re.search(rf"Overall exposure level for {re.escape(unit)}: ([0-9.]+)", output)
    assert match, output
    return float(match.group(1))


# -- users, files and sockets ------------------------------------------------------------------------

#: path -> (octal mode, owner:group), as DESIGN.md sets them (sockets and /run: stat'ed inside).
EXPECTED_MODES = {
    ETC: ("750", "root:agent-guardian"),
    f"{ETC}/config.yaml": ("640", "root:agent-guardian"),
    f"{ETC}/policy.yaml": ("640", "root:agent-guardian"),
    f"{ETC}/credentials": ("700", "root:root"),
    **{f"{ETC}/credentials/{name}": ("600", "root:root") for name in KEY_FILES},
    FIRST_ADMINS: ("640", "root:agent-guardian"),
    BACKUP_KEY: ("600", "root:root"),
    f"{BACKUP_KEY}.pub": ("600", "root:root"),
    "/root/.config/agent-guardian": ("700", "root:root"),
    ROOT_KEY: ("600", "root:root"),
    "/var/lib/agent-guardian": ("700", "agent-guardian:agent-guardian"),
    DATABASE: ("600", "agent-guardian:agent-guardian"),
    "/run/agent-guardian": ("711", "agent-guardian:agent-guardian"),
    AGENT_SOCKET: ("660", "agent-guardian:agent-gateway"),
    ADMIN_SOCKET: ("660", "agent-guardian:agent-security"),
    "/run/agent-embedder": ("750", "agent-embedder:agent-embedder"),
    EMBEDDER_SOCKET: ("660", "agent-embedder:agent-embedder"),
    "/var/log/agent-guardian": ("2750", "agent-guardian:agent-security"),
    GUARDIAN_LOG: ("640", "agent-guardian:agent-security"),
    SECURITY_LOG: ("640", "agent-guardian:agent-security"),
}


def _modes(system: BootedSystem, paths: list[str]) -> dict[str, tuple[str, str]]:
    lines = system.run(["stat", "-c", "%n %a %U:%G", *paths]).stdout.splitlines()
    return {name: (mode, owner) for name, mode, owner in (line.split() for line in lines)}


def test_files_and_sockets_have_their_modes_and_owners(deployed: Deployment) -> None:
    found = _modes(deployed.system, list(EXPECTED_MODES))
    assert found == EXPECTED_MODES
    other_bits = deployed.system.run(
        ["find", ETC, "/var/lib/agent-guardian", "/var/log/agent-guardian", "-perm", "/o=rw"]
    ).stdout
    assert other_bits == "", f"readable or writable by others: {other_bits}"


def test_logrotate_rotates_the_guardians_logs_as_its_user(deployed: Deployment) -> None:
    system = deployed.system
    rotate = system.run(
        ["logrotate", "--force", "--state", f"{WORK}/logrotate.state", "/etc/logrotate.d/agent-guardian"], check=False
    )
    assert rotate.returncode == 0 and "error" not in rotate.stderr.lower(), rotate.stderr
    assert _modes(system, [GUARDIAN_LOG, f"{GUARDIAN_LOG}.1"]) == {
        GUARDIAN_LOG: ("640", "agent-guardian:agent-security"),
        f"{GUARDIAN_LOG}.1": ("640", "agent-guardian:agent-security"),
    }
    deployed.ctl("agents", "add", "after-rotation", user="sec")  # an admin action: a line in the security log
    security_log = deployed.host_path(SECURITY_LOG)
    deadline = time.monotonic() + 10
    while '"object_id": "after-rotation"' not in security_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"object_id": "after-rotation"' in security_log.read_text(), "the guardian did not reopen its rotated log"


def _probe(system: BootedSystem, user: str, command: str, *paths: str) -> dict[str, Any]:
    return dict(json.loads(system.run([VENV_PYTHON, PROBE, command, *paths], user=user).stdout))


PRIVATE_FILES = (
    DATABASE,
    f"{ETC}/credentials/db.key",
    f"{ETC}/credentials/audit.keys",
    f"{ETC}/policy.yaml",
    f"{ETC}/config.yaml",
    GUARDIAN_LOG,
    SECURITY_LOG,
)


def test_the_gateway_user_reaches_the_agent_socket_only(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    system = deployed.system
    connect = _probe(system, "agent-gateway", "connect", AGENT_SOCKET, ADMIN_SOCKET, EMBEDDER_SOCKET)
    health = _probe(system, "agent-gateway", "health", AGENT_SOCKET)
    health_admin = _probe(system, "agent-gateway", "health", ADMIN_SOCKET)
    reads = _probe(system, "agent-gateway", "read", *PRIVATE_FILES)
    journal = system.run(
        ["journalctl", "-u", "agent-guardian", "--no-pager", "-o", "cat"], user="agent-gateway", check=False
    )
    report(
        capsys,
        f"agent-gateway: connect {connect}; gRPC health on agent.sock {health['status']},"
        f" on admin.sock {health_admin['status']}",
        f"agent-gateway: read {reads}",
    )
    assert connect == {AGENT_SOCKET: "ok", ADMIN_SOCKET: "EACCES", EMBEDDER_SOCKET: "EACCES"}
    assert health == {"status": "SERVING"}
    assert health_admin["status"] == "UNAVAILABLE"
    assert reads == dict.fromkeys(PRIVATE_FILES, "EACCES")
    assert "agent-guardian" not in journal.stdout, "the gateway's user can read the guardian's journal"


def test_the_security_team_uses_guardianctl_and_nothing_else(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    system = deployed.system
    listing = deployed.ctl("--json", "agents", "list", user="sec")
    verify = deployed.ctl("audit", "verify", user="sec", check=False)
    connect = _probe(system, "sec", "connect", AGENT_SOCKET, ADMIN_SOCKET, EMBEDDER_SOCKET)
    reads = _probe(system, "sec", "read", DATABASE, f"{ETC}/credentials/db.key", SECURITY_LOG)
    report(capsys, f"sec (in agent-security): guardianctl agents list ok; connect {connect}; read {reads}")
    assert "keeper" in {agent["name"] for agent in json.loads(listing.stdout)}
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert connect == {AGENT_SOCKET: "EACCES", ADMIN_SOCKET: "ok", EMBEDDER_SOCKET: "EACCES"}
    assert reads == {DATABASE: "EACCES", f"{ETC}/credentials/db.key": "EACCES", SECURITY_LOG: "ok"}


def test_admins_sign_their_requests_and_the_audit_names_them(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """root signs with the key install.sh made; sec with a key of their own that root enrolled; the audit says who.

    first-admins names root (security) and the backup timer (operator) with the public halves of
    the keys install.sh generated; the guardian enrolled both from it, audited as ``@first-admins``;
    root's enrolment of sec and sec's own admin actions are audited as ``@admin:root`` and
    ``@admin:sec``, each with the signing key's fingerprint in the row's session column.
    """
    d = deployed
    root_fingerprint = _fingerprint(d.system, f"{ROOT_KEY}.pub")
    backup_fingerprint = _fingerprint(d.system, f"{BACKUP_KEY}.pub")
    named = [line.split() for line in d.host_path(FIRST_ADMINS).read_text().splitlines() if not line.startswith("#")]
    root_public = d.host_path(f"{ROOT_KEY}.pub").read_text().split()[:2]
    backup_public = d.host_path(f"{BACKUP_KEY}.pub").read_text().split()[:2]
    assert [line[:4] for line in named] == [["root", "security", *root_public], ["backup", "operator", *backup_public]]

    unenrolled = d.sec_unenrolled
    assert unenrolled is not None and unenrolled.returncode == 1, unenrolled
    assert f"no admin is enrolled with the key {d.sec_fingerprint}" in unenrolled.stderr, unenrolled.stderr
    as_root = json.loads(d.ctl("--json", "whoami").stdout)
    as_sec = json.loads(d.ctl("--json", "whoami", user="sec").stdout)
    assert (as_root["name"], as_root["role"], as_root["fingerprint"]) == ("root", "security", root_fingerprint)
    assert (as_sec["name"], as_sec["role"], as_sec["fingerprint"]) == ("sec", "security", d.sec_fingerprint)
    enrolled = d.ctl("--json", "admins", "list", user="sec").stdout
    admins = {row["name"]: row for row in map(json.loads, enrolled.splitlines())}
    assert {name: (row["role"], row["fingerprint"]) for name, row in admins.items()} == {
        "root": ("security", root_fingerprint),
        "backup": ("operator", backup_fingerprint),
        "sec": ("security", d.sec_fingerprint),
    }
    assert admins["sec"]["added_by"] == "@admin:root"

    d.ctl("agents", "add", "made-by-sec", user="sec")
    first = _audit_rows(d, "--agent", "@first-admins")
    by_root = _audit_rows(d, "--agent", "@admin:root", "--operation", "admin.admins.add")
    by_sec = _audit_rows(d, "--agent", "@admin:sec")
    sec_added_agent = [(row["object_id"], row["decision"]) for row in by_sec if row["operation"] == "admin.agent.add"]
    report(
        capsys,
        f"admins: root {root_fingerprint} (key made by install.sh), sec {d.sec_fingerprint} (ssh-keygen, enrolled by"
        f" root), backup {backup_fingerprint}; unenrolled sec: {unenrolled.stderr.strip()!r}",
        f"audit: {len(first)} rows by @first-admins, {len(by_root)} admins.add by @admin:root, {len(by_sec)} rows by"
        f" @admin:sec (operations {sorted(Counter(row['operation'] for row in by_sec).items())})",
    )
    assert {(row["object_id"], row["session"], row["decision"]) for row in first} == {
        ("root", root_fingerprint, "allow"),
        ("backup", backup_fingerprint, "allow"),
    }
    assert [(row["object_id"], row["session"], row["decision"]) for row in by_root] == [
        ("sec", root_fingerprint, "allow")
    ]
    assert by_sec and {row["session"] for row in by_sec} == {d.sec_fingerprint}
    assert ("made-by-sec", "allow") in sec_added_agent, by_sec


def test_an_ordinary_user_reaches_neither_socket(deployed: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    system = deployed.system
    connect = _probe(system, "mallory", "connect", AGENT_SOCKET, ADMIN_SOCKET, EMBEDDER_SOCKET)
    reads = _probe(system, "mallory", "read", *PRIVATE_FILES)
    ctl = deployed.ctl("agents", "list", user="mallory", check=False)
    report(
        capsys, f"mallory (an admin key of her own, not enrolled): connect {connect}; guardianctl exit {ctl.returncode}"
    )
    assert deployed.host_path(f"/home/mallory/{USER_KEY}").exists(), "mallory has no key: refused before the socket"
    assert connect == {AGENT_SOCKET: "EACCES", ADMIN_SOCKET: "EACCES", EMBEDDER_SOCKET: "EACCES"}
    assert reads == dict.fromkeys(PRIVATE_FILES, "EACCES")
    assert ctl.returncode == 3 and "may this user connect" in ctl.stderr


# -- agent-embedder: its sandbox, who reaches it, recall by meaning ------------------------------------

#: [Service] settings that make a unit's service what it is, not its sandbox: a probe run "as the unit"
#: leaves them out. RuntimeDirectory= above all: the probe's own transient unit would remove the real
#: service's socket directory when it ends; StateDirectory= would chown the guardian's state again.
NOT_SANDBOX = frozenset(
    {
        "Type", "NotifyAccess", "ExecStart", "ExecReload", "Restart", "RestartSec", "WatchdogSec",
        "TimeoutStartSec", "TimeoutStopSec", "RuntimeDirectory", "RuntimeDirectoryMode", "StateDirectory",
        "StateDirectoryMode", "LoadCredential",
    }
)  # fmt: skip
#: Addresses that listen inside the root (the gateway's MCP endpoint, the guardian's /metrics).
LISTENING = ("127.0.0.1:8765", "127.0.0.1:9464")


def _sandbox(system: BootedSystem, unit: str, without: frozenset[str] = frozenset()) -> list[str]:
    """The installed unit's [Service] sandbox (user, groups, hardening, limits) as systemd-run -p options."""
    section, options = "", []
    for raw in (system.root / "etc/systemd/system" / unit).read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[Service]":
            key = line.split("=", 1)[0]
            if key not in NOT_SANDBOX | without:
                options += ["-p", line]
    return options


def _probe_in_unit(
    system: BootedSystem, unit: str, command: str, *paths: str, without: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """access_probe.py run by systemd in a transient service with unit's own sandbox (less the settings without)."""
    run = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", *_sandbox(system, unit, without)]
    return dict(json.loads(system.run([*run, VENV_PYTHON, PROBE, command, *paths]).stdout))


def test_only_the_guardians_unit_reaches_the_embedder(deployed: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    """The embedder's socket is for the guardian's service (SupplementaryGroups=), not its user nor anyone else."""
    system = deployed.system
    guardian = _probe_in_unit(system, "agent-guardian.service", "embed", EMBEDDER_SOCKET)
    guardian_user = _probe(system, "agent-guardian", "connect", EMBEDDER_SOCKET)
    gateway = _probe(system, "agent-gateway", "embed", EMBEDDER_SOCKET)
    report(
        capsys,
        f"the guardian's unit (systemd-run with its sandbox): embed over {EMBEDDER_SOCKET} {guardian}",
        f"agent-guardian as a login user (no SupplementaryGroups=): connect {guardian_user[EMBEDDER_SOCKET]};"
        f" agent-gateway: embed {gateway['status']}",
    )
    assert guardian["status"] == "OK", guardian
    assert guardian["model"].startswith(EMBEDDING_MODEL_PREFIX) and guardian["dims"] == 384, guardian
    assert guardian_user == {EMBEDDER_SOCKET: "EACCES"}
    assert gateway["status"] == "EACCES", gateway  # refused at connect: the socket's directory is not its group's


def test_the_embedder_reads_nothing_of_the_guardian_and_reaches_no_network(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """As its user, as its unit (each layer of its sandbox alone where one can be taken away), and its process."""
    system, unit = deployed.system, "agent-embedder.service"
    # Its user outside the sandbox: the files' modes alone; TCP as the control (the addresses do listen).
    user_reads = _probe(system, "agent-embedder", "read", *PRIVATE_FILES)
    user_connect = _probe(system, "agent-embedder", "connect", AGENT_SOCKET, ADMIN_SOCKET, EMBEDDER_SOCKET)
    user_tcp = _probe(system, "agent-embedder", "tcp", *LISTENING)
    # Its unit's whole sandbox.
    unit_reads = _probe_in_unit(system, unit, "read", *PRIVATE_FILES)
    unit_connect = _probe_in_unit(system, unit, "connect", AGENT_SOCKET, ADMIN_SOCKET, EMBEDDER_SOCKET)
    unit_tcp = _probe_in_unit(system, unit, "tcp", *LISTENING)
    # One layer at a time: InaccessiblePaths= without the user's modes (root, but no capabilities: root
    # owns the keys); IPAddressDeny= and PrivateNetwork= without RestrictAddressFamilies=; PrivateNetwork= alone.
    root_reads = _probe_in_unit(system, unit, "read", *PRIVATE_FILES, without=frozenset({"User", "Group"}))
    gateway = LISTENING[0]
    ip_deny_tcp = _probe_in_unit(system, unit, "tcp", gateway, without=frozenset({"RestrictAddressFamilies"}))
    private_net_tcp = _probe_in_unit(
        system, unit, "tcp", gateway, without=frozenset({"RestrictAddressFamilies", "IPAddressDeny"})
    )
    # The running service itself: its own network namespace, with a loopback and nothing else.
    pid = system.show(unit, "MainPID")
    interfaces = [
        line.split(":")[0].strip() for line in system.run(["cat", f"/proc/{pid}/net/dev"]).stdout.splitlines()[2:]
    ]
    namespaces = system.run(["readlink", f"/proc/{pid}/ns/net", "/proc/1/ns/net"]).stdout.split()
    report(
        capsys,
        f"agent-embedder (user, modes alone): read {_by_outcome(user_reads)}; connect {user_connect}; tcp {user_tcp}",
        f"agent-embedder (its unit's sandbox, systemd-run): read {_by_outcome(unit_reads)}; connect {unit_connect};"
        f" tcp {unit_tcp}",
        f"its sandbox as root without capabilities (InaccessiblePaths= alone): read {_by_outcome(root_reads)}",
        f"its sandbox less RestrictAddressFamilies=: tcp {ip_deny_tcp}; less IPAddressDeny= too (PrivateNetwork="
        f" alone): tcp {private_net_tcp}",
        f"the running agent-embedder (PID {pid}): interfaces {interfaces}; network namespace {namespaces[0]}"
        f" (systemd's: {namespaces[1]})",
    )
    denied = dict.fromkeys(PRIVATE_FILES, "EACCES")
    assert user_reads == denied
    assert unit_reads == denied
    assert root_reads == denied, "InaccessiblePaths= does not hide the guardian's files on its own"
    own_socket_only = {AGENT_SOCKET: "EACCES", ADMIN_SOCKET: "EACCES", EMBEDDER_SOCKET: "ok"}
    assert user_connect == own_socket_only
    assert unit_connect == own_socket_only
    assert user_tcp == dict.fromkeys(LISTENING, "ok"), "the control failed: nothing listens at these addresses"
    assert unit_tcp == dict.fromkeys(LISTENING, "EAFNOSUPPORT")
    # IPAddressDeny= drops the packets (a SYN is retried until the timeout); refused would mean they passed.
    assert ip_deny_tcp[gateway] in ("ETIMEDOUT", "EPERM"), ip_deny_tcp
    # Its own loopback, where nothing listens: the gateway, listening on the system's, is out of reach.
    assert private_net_tcp == {gateway: "ECONNREFUSED"}, "PrivateNetwork= does not hold on its own"
    assert interfaces == ["lo"]
    assert namespaces[0] != namespaces[1]


def _by_outcome(outcomes: dict[str, str]) -> dict[str, list[str]]:
    """path -> outcome, turned round (outcome -> the paths' names), to print on one line."""
    grouped: dict[str, list[str]] = {}
    for path, outcome in outcomes.items():
        grouped.setdefault(outcome, []).append(Path(path).name)
    return grouped


#: Stored first; the last note is stored while the embedder restarts (test_independent_restarts_under_load).
FIRST_NOTES = ("allergy", "flight", "deploy")
LATE_NOTE = "dentist"
RECALL_AGENT = "recall"


def _recall_status(d: Deployment) -> dict[str, Any]:
    """The recall fields of `guardianctl --json status` (which exits 1 while anything warns: not checked)."""
    return dict(json.loads(d.ctl("--json", "status", check=False).stdout)["recall"])


def _wait_until_embedded(d: Deployment, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not ((recall := _recall_status(d))["index_ready"] and recall["memories_to_embed"] == 0):
        assert time.monotonic() < deadline, f"recall by meaning not caught up in {timeout_s} s: {recall}"
        time.sleep(0.2)
    return recall


def _search(d: Deployment, mode: str, *queries: str) -> list[dict[str, Any]]:
    token = f"{WORK}/root/{RECALL_AGENT}.token"
    return list(d.mcp("search", "--token-file", token, "--mode", mode, "--query", *queries)["results"])


def test_recall_by_meaning_through_the_gateway(deployed: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    """An MCP client stores notes and finds each by a question in other words; the embedder's model is in use."""
    d = deployed
    token = d.add_agent(RECALL_AGENT)
    started = time.monotonic()
    stored = d.mcp("store", "--token-file", token, "--content", *(NOTES[name] for name in FIRST_NOTES))
    ids = dict(zip(FIRST_NOTES, stored["ids"], strict=True))
    recall = _wait_until_embedded(d, timeout_s=30)
    questions = [QUESTIONS[name] for name in FIRST_NOTES]
    by_meaning = _search(d, "semantic", *questions)
    by_words = _search(d, "lexical", *questions)
    took = time.monotonic() - started
    top = {
        name: result["hits"][0] if result["hits"] else {} for name, result in zip(FIRST_NOTES, by_meaning, strict=True)
    }
    report(
        capsys,
        f"recall by meaning through the gateway: model {recall['embedding_model']}, {recall['vectors_indexed']}"
        f" vectors; stored {len(ids)} notes, searched in other words ({took:.1f} s in all)",
        *(f"  {QUESTIONS[n]!r}: top hit {n if hit.get('id') == ids[n] else hit.get('content')!r}, score"
          f" {hit.get('score', 0):.3f}, found by {hit.get('found_by')}" for n, hit in top.items()),
    )  # fmt: skip
    assert recall["embedding_model"].startswith(EMBEDDING_MODEL_PREFIX), recall
    assert recall["index_ready"] and recall["vectors_indexed"] >= len(FIRST_NOTES)
    for name, hit in top.items():
        assert hit.get("id") == ids[name], (name, by_meaning)
        assert hit["found_by"] == ["meaning"] and 0 < hit["score"] <= 1.0, hit
    for name, result in zip(FIRST_NOTES, by_words, strict=True):
        assert ids[name] not in [h["id"] for h in result["hits"]], f"{name}: found by words, so not by meaning alone"


# -- restarts under load ---------------------------------------------------------------------------


@dataclass
class Window:
    """A span of time (time.monotonic()) in which some failures are expected."""

    name: str
    start: float
    end: float
    allowed: frozenset[str]

    def holds(self, record: dict[str, Any]) -> bool:
        """The call overlapped the window: one in flight when the restart began may fail by it too."""
        start: float = record["start"]
        end: float = record["end"]
        return start <= self.end and end >= self.start


class Load:
    """LOAD_CLIENTS MCP clients inside the root, as mallory, each writing as its own agent."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.tokens = [d.add_agent(f"load-{i}", owner="mallory") for i in range(LOAD_CLIENTS)]
        work = d.work("mallory")
        self.out, stop, self.progress = f"{work}/load.json", f"{work}/load.stop", f"{work}/load.progress"
        self.stop_file = d.host_path(stop)
        argv = [VENV_PYTHON, CLIENTS, "load", "--token-file", *self.tokens, "--out", self.out, "--stop-file", stop]
        self.process = d.system.popen(argv, user="mallory", log=d.run / "load.log")

    def acked(self) -> int:
        progress = self.d.host_path(self.progress)
        return int(json.loads(progress.read_text())["acked"]) if progress.exists() else 0

    def wait_for_acks(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.acked() < count:
            assert self.process.poll() is None, (self.d.run / "load.log").read_text()
            assert time.monotonic() < deadline, f"the clients stored only {self.acked()} memories"
            time.sleep(0.1)

    def finish(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        assert self.process.returncode == 0, (self.d.run / "load.log").read_text()
        return list(json.loads(self.d.host_path(self.out).read_text()))


def _guardian_errors_seen_by_gateway(system: BootedSystem) -> dict[str, int]:
    """agent_gateway_guardian_errors_total by gRPC status code, from the gateway's /metrics."""
    metrics = system.run(["curl", "-sf", "http://127.0.0.1:9465/metrics"]).stdout
    found = re.findall(r'^agent_gateway_guardian_errors_total\{code="(\w+)"\} ([0-9.]+)$', metrics, re.MULTILINE)
    return {code: int(float(count)) for code, count in found}


def _settle(load: Load, windows: list[Window]) -> None:
    """Let the load run on past the last window, so the next step's failures are told apart from this one's."""
    load.wait_for_acks(load.acked() + 20 * LOAD_CLIENTS)
    while time.monotonic() < windows[-1].end + 0.5:
        time.sleep(0.05)


def _monotonic(system: BootedSystem, unit: str, prop: str = "ActiveEnterTimestampMonotonic") -> float:
    return int(system.show(unit, prop)) / 1e6


def _journal_cursor(system: BootedSystem, unit: str) -> str:
    shown = system.run(["journalctl", "-u", unit, "-n", "0", "--show-cursor", "--no-pager"]).stdout
    return shown.rsplit("-- cursor: ", 1)[1].strip()


def _guardian_errors_since(d: Deployment, cursor: str, log_offset: int) -> list[str]:
    journal = d.system.run(
        ["journalctl", "-u", "agent-guardian", "--after-cursor", cursor, "--no-pager", "-o", "cat"]
    ).stdout.splitlines()
    log = d.host_path(GUARDIAN_LOG).read_text()[log_offset:].splitlines()
    bad = re.compile(
        r'"level": "(error|critical)"|Traceback|Main process exited|[Ww]atchdog timeout|Failed with result'
    )
    return [line for line in journal + log if bad.search(line)]


def test_independent_restarts_under_load(
    deployed: Deployment, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    d, system = deployed, deployed.system
    guardian, gateway = "agent-guardian.service", "agent-gateway.service"
    load = Load(d)
    windows: list[Window] = []
    try:
        load.wait_for_acks(20 * LOAD_CLIENTS)

        # 1. systemctl restart agent-guardian, mid-load.
        pid_before = system.show(guardian, "MainPID")
        start = time.monotonic()
        system.systemctl("restart", guardian)
        guardian_ready = _monotonic(system, guardian)
        assert system.show(guardian, "MainPID") != pid_before
        windows.append(Window("guardian restart", start, guardian_ready + MAX_RECOVERY_S, frozenset({"unavailable"})))
        _settle(load, windows)

        # What the gateway got from the guardian meanwhile (its counters restart with it, next).
        gateway_saw = _guardian_errors_seen_by_gateway(system)

        # 2. systemctl restart agent-gateway: the guardian is untouched.
        guardian_pid = system.show(guardian, "MainPID")
        cursor = _journal_cursor(system, guardian)
        log_offset = len(d.host_path(GUARDIAN_LOG).read_text())
        start = time.monotonic()
        system.systemctl("restart", gateway)
        gateway_ready = _monotonic(system, gateway)
        windows.append(
            Window("gateway restart", start, gateway_ready + MAX_RECOVERY_S, frozenset({"transport", "connect"}))
        )
        _settle(load, windows)
        assert system.show(guardian, "MainPID") == guardian_pid
        assert system.show(guardian, "NRestarts") == "0"
        guardian_errors = _guardian_errors_since(d, cursor, log_offset)

        # 3. systemctl reload agent-guardian with a new policy: in force, nothing dropped.
        policy_path = d.host_path(f"{ETC}/policy.yaml")
        new_policy = _edit_yaml(policy_path, lambda p: p["limits"].update(max_tags=12))
        start = reload_started = time.monotonic()
        system.systemctl("reload", guardian)
        deadline = time.monotonic() + 10
        while (in_force := json.loads(d.ctl("--json", "policy", "show").stdout))["text"] != new_policy:
            assert time.monotonic() < deadline, "the reloaded policy is not in force"
            time.sleep(0.05)
        reloaded = time.monotonic()
        windows.append(Window("policy reload", start, reloaded + 1.0, frozenset()))
        metrics = system.run(["curl", "-sf", "http://127.0.0.1:9464/metrics"]).stdout
        assert f'guardian_policy_info{{version="{in_force["version"]}"}} 1.0' in metrics
        assert system.show(guardian, "MainPID") == guardian_pid
        _settle(load, windows)

        # 4. systemctl restart agent-embedder, mid-load: no write fails; a note stored meanwhile (and every
        # load write) is embedded once it is back.
        embedder = _restart_the_embedder(d)
        windows.append(Window("embedder restart", embedder.start, embedder.caught_up, frozenset()))
        assert system.show(guardian, "MainPID") == guardian_pid
        assert system.show(guardian, "NRestarts") == "0"
        _settle(load, windows)
    finally:
        records = load.finish()

    # After the load: nothing left to embed, and the note stored while the embedder restarted is found by meaning.
    recall = _wait_until_embedded(d, timeout_s=10)
    late = _search(d, "semantic", QUESTIONS[LATE_NOTE])[0]["hits"]
    assert late and late[0]["id"] == embedder.late_note, late

    evidence = tmp_path / "load-records.json"  # kept by pytest after the root is gone
    evidence.write_text(
        json.dumps(
            {
                "windows": [w.__dict__ | {"allowed": sorted(w.allowed)} for w in windows],
                "guardian_ready": guardian_ready,
                "gateway_ready": gateway_ready,
                "records": records,
            }
        )
    )
    figures = _restart_figures(records, windows, guardian_ready, gateway_ready)
    report(
        capsys,
        *figures["lines"],
        f"policy reload: the new version in force {reloaded - reload_started:.3f} s after `systemctl reload` began",
        f"guardian restart: gRPC errors the gateway got from the guardian (since it started): {gateway_saw}",
        *embedder.lines(),
        f"embedder restart: after the load, memories_to_embed {recall['memories_to_embed']},"
        f" {recall['vectors_indexed']} vectors; the note stored meanwhile found by meaning"
        f" (score {late[0]['score']:.3f})",
        f"every call: {evidence}",
    )
    assert figures["unexpected"] == [], (
        f"failures outside their window or of a kind it does not allow (gRPC errors the gateway got during the"
        f" guardian restart: {gateway_saw}; CANCELLED from a stopping guardian must reach the agent as"
        f" unavailable, not internal):\n{json.dumps(figures['unexpected'][:10], indent=1)}\nwindows:"
        f" {[(w.name, round(w.start, 3), round(w.end, 3)) for w in windows]}"
    )
    assert figures["hung"] == 0
    assert figures["max_latency"] < MAX_CALL_LATENCY_S
    assert figures["not_retryable"] == [], figures["not_retryable"][:10]
    assert figures["guardian_recovery"] < MAX_RECOVERY_S
    assert guardian_errors == [], guardian_errors
    assert embedder.guardian_errors == [], embedder.guardian_errors
    assert embedder.went_away, "no write found the embedder away: the restart did not test writing without it"

    # Every acknowledged write is there, once, with its content.
    stored: dict[str, str] = {}
    for token in load.tokens:
        listed = d.mcp("list", "--token-file", token)["memories"]
        contents = Counter(memory["content"] for memory in listed)
        assert [c for c, n in contents.items() if n > 1] == [], "a write was stored twice"
        stored.update({memory["id"]: memory["content"] for memory in listed})
    acked = [r for r in records if r["outcome"] == "ok"]
    missing = [r for r in acked if stored.get(r["id"]) != r["content"]]
    assert missing == [], f"{len(missing)} acknowledged writes are missing: {missing[:5]}"
    verify = d.ctl("audit", "verify", user="sec", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@dataclass
class EmbedderRestart:
    """What was seen while agent-embedder restarted under the load (times: time.monotonic())."""

    start: float
    #: When `systemctl restart` returned, and when systemd had the new embedder's READY=1.
    returned: float
    ready: float
    #: The note stored meanwhile (LATE_NOTE) and when its store returned.
    late_note: str
    stored_at: float
    #: When memories_to_embed was 0 again, and the most it was seen at before.
    caught_up: float
    peak: int
    #: Whether the guardian said the embedder went away and came back; its errors meanwhile (none expected).
    went_away: bool
    came_back: bool
    guardian_errors: list[str]

    def lines(self) -> list[str]:
        """The figures, to report."""
        return [
            f"embedder restart: `systemctl restart` returned after {self.returned - self.start:.2f} s (ready"
            f" {self.ready - self.start:.2f} s after it began); a note stored by"
            f" {self.stored_at - self.start:.2f} s in (before the embedder was ready: {self.stored_at < self.ready})",
            f"embedder restart: memories_to_embed peaked at {self.peak} (seen), back to 0"
            f" {self.caught_up - self.ready:.2f} s after the embedder was ready (limit {MAX_EMBED_CATCH_UP_S} s);"
            f" the guardian logged the embedder unavailable: {self.went_away}, available again: {self.came_back}",
        ]


def _restart_the_embedder(d: Deployment) -> EmbedderRestart:
    """`systemctl restart agent-embedder` while the load writes and a note is stored; until all is embedded again."""
    system, unit = d.system, "agent-embedder.service"
    pid_before = system.show(unit, "MainPID")
    cursor = _journal_cursor(system, "agent-guardian")
    log_offset = len(d.host_path(GUARDIAN_LOG).read_text())
    start = time.monotonic()
    restart = system.popen(["systemctl", "restart", unit], log=d.run / "embedder-restart.log")
    try:
        token = f"{WORK}/root/{RECALL_AGENT}.token"
        late_note: str = d.mcp("store", "--token-file", token, "--content", NOTES[LATE_NOTE])["ids"][0]
        stored_at = time.monotonic()  # (most of it is the MCP client's start)
        peak = 0
        while restart.poll() is None:
            peak = max(peak, _recall_status(d)["memories_to_embed"])
            assert time.monotonic() < start + 120, "systemctl restart agent-embedder did not return"
    finally:
        if restart.poll() is None:
            restart.kill()
            restart.wait()
    assert restart.returncode == 0, (d.run / "embedder-restart.log").read_text()
    returned = time.monotonic()
    ready = _monotonic(system, unit)
    assert system.show(unit, "MainPID") != pid_before
    while (behind := _recall_status(d)["memories_to_embed"]) > 0:
        peak = max(peak, behind)
        assert time.monotonic() < ready + MAX_EMBED_CATCH_UP_S, f"{behind} memories still to embed"
        time.sleep(0.1)
    caught_up = time.monotonic()
    journal = system.run(
        ["journalctl", "-u", "agent-guardian", "--after-cursor", cursor, "--no-pager", "-o", "cat"]
    ).stdout
    said = journal + d.host_path(GUARDIAN_LOG).read_text()[log_offset:]
    return EmbedderRestart(
        start=start,
        returned=returned,
        ready=ready,
        late_note=late_note,
        stored_at=stored_at,
        caught_up=caught_up,
        peak=peak,
        went_away='"event": "embedder_unavailable"' in said,
        came_back='"event": "embedder_available"' in said,
        guardian_errors=_guardian_errors_since(d, cursor, log_offset),
    )


def _restart_figures(
    records: list[dict[str, Any]], windows: list[Window], guardian_ready: float, gateway_ready: float
) -> dict[str, Any]:
    failures = [r for r in records if r["outcome"] != "ok"]
    unexpected = [r for r in failures if not any(w.holds(r) and r["outcome"] in w.allowed for w in windows)]
    ok_ends = sorted(r["end"] for r in records if r["outcome"] == "ok")
    guardian_recovery = next((end for end in ok_ends if end >= guardian_ready), float("inf")) - guardian_ready
    gateway_recovery = next((end for end in ok_ends if end >= gateway_ready), float("inf")) - gateway_ready
    latencies = [r["end"] - r["start"] for r in records if r["outcome"] != "connect"]
    ok_latencies = sorted(r["end"] - r["start"] for r in records if r["outcome"] == "ok")
    p99 = ok_latencies[int(len(ok_latencies) * 0.99)]
    lines = [
        f"load: {LOAD_CLIENTS} MCP clients (mcp.Client, streamable HTTP) as mallory, {len(records)} calls,"
        f" {len(ok_ends)} acknowledged, {len(failures)} failed"
    ]
    for w in windows:
        inside = Counter(r["outcome"] for r in failures if w.holds(r))
        lines.append(
            f"{w.name}: {sum(inside.values())} failed ({dict(inside) or 'none'}), {w.end - w.start:.2f} s window"
        )
    lines += [
        f"guardian restart: first acknowledged write {guardian_recovery:.3f} s after the guardian was ready"
        f" (limit {MAX_RECOVERY_S} s)",
        f"gateway restart: first acknowledged write {gateway_recovery:.3f} s after the gateway was ready",
        f"call latency: max {max(latencies):.3f} s (limit {MAX_CALL_LATENCY_S} s); acknowledged writes:"
        f" p50 {statistics.median(ok_latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms",
        f"failures outside their window: {len(unexpected)}",
    ]
    return {
        "lines": lines,
        "unexpected": unexpected,
        "hung": sum(1 for r in records if r["outcome"] == "hung"),
        "max_latency": max(latencies),
        "not_retryable": [r for r in failures if r["outcome"] == "unavailable" and not r.get("retryable")],
        "guardian_recovery": guardian_recovery,
    }


# -- backups ----------------------------------------------------------------------------------------


def test_the_backup_timer_keeps_verified_generations(deployed: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    """The timer is enabled; its service (a dynamic user in agent-security) has the guardian keep backup.keep.

    First the security team rotates the memory key and the database key under the hardened unit
    (the credentials are read-only to it: rotated versions go to its state dir), so the backups
    below hold memories signed with two keys in a file encrypted under a rotated one.
    """
    d, system = deployed, deployed.system
    assert system.systemctl("is-enabled", "agent-guardian-backup.timer").stdout.strip() == "enabled"
    assert system.show("agent-guardian-backup.timer", "ActiveState") == "active"
    for ring in ("memory", "database"):
        rotated = json.loads(d.ctl("--json", "keys", "rotate", ring, user="sec").stdout)
        assert rotated["key_id"] == "r1", rotated
    assert _modes(system, ["/var/lib/agent-guardian/rotated-keys.json"]) == {
        "/var/lib/agent-guardian/rotated-keys.json": ("600", "agent-guardian:agent-guardian")
    }
    _edit_yaml(d.host_path(f"{ETC}/config.yaml"), lambda config: config["backup"].update(keep=2))
    system.systemctl("restart", "agent-guardian.service")
    _wait_for_admin_socket(d)
    started = time.monotonic()
    for _ in range(3):
        system.systemctl("start", "agent-guardian-backup.service", timeout=300)
        assert system.show("agent-guardian-backup.service", "Result") == "success"
    took = (time.monotonic() - started) / 3
    listed = json.loads(d.ctl("--json", "backup", "list", user="sec").stdout)
    assert len(listed) == 2, listed
    # Each run signed as the admin "backup" with the key in its credentials, audited with that key's fingerprint.
    environment = system.show("agent-guardian-backup.service", "Environment")
    assert environment == "AGENT_GUARDIAN_ADMIN_KEY=/run/credentials/agent-guardian-backup.service/backup-admin.key"
    made = _audit_rows(d, "--agent", "@admin:backup", "--operation", "admin.backup.create")
    assert len(made) == 3, made
    assert {(row["session"], row["decision"]) for row in made} == {(_fingerprint(system, f"{BACKUP_KEY}.pub"), "allow")}
    made_names = {row["object_id"].split()[0] for row in made}
    assert {row["name"] for row in listed} <= made_names, (listed, made)
    modes = _modes(system, [f"/var/lib/agent-guardian/backups/{row['name']}" for row in listed])
    assert set(modes.values()) == {("600", "agent-guardian:agent-guardian")}
    verified = d.ctl("--json", "backup", "verify", listed[0]["name"], user="sec")
    check = json.loads(verified.stdout)
    assert check["ok"] and check["memories_checked"] > 0
    denied = d.ctl("backup", "list", user="mallory", check=False)
    assert denied.returncode == 3
    unit_file = "/etc/systemd/system/agent-guardian-backup.service"
    analyzed = system.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", unit_file])
    score = _exposure(analyzed.stdout, "agent-guardian-backup.service")
    report(
        capsys,
        f"backup timer: 3 runs of agent-guardian-backup.service ({took:.1f} s each), {len(listed)} kept (keep: 2),"
        f" newest verified: {check['memories_checked']} memory HMACs, {check['audit_rows_checked']} audit rows"
        f" (after rotating the memory and database keys); exposure {score:.1f}",
        f"backup timer: each run signed as @admin:backup (role operator) with {environment}",
    )
    assert score <= MAX_EXPOSURE["agent-guardian-backup.service"]


def _wait_for_admin_socket(d: Deployment) -> None:
    deadline = time.monotonic() + 60
    while d.ctl("agents", "list", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the guardian did not come back after its restart"
        time.sleep(0.2)


#: The README's nginx config (section "TLS"), with this test's name and certificate.
NGINX_SITE = """
server {
    listen 443 ssl;
    server_name memory.test;
    ssl_certificate     /etc/nginx/memory.test.pem;
    ssl_certificate_key /etc/nginx/memory.test.key;
    location / {
        proxy_pass http://127.0.0.1:8765;
        proxy_http_version 1.1;
        proxy_set_header Host $host;
        proxy_buffering off;
        proxy_read_timeout 1h;
        client_max_body_size 4m;
    }
}
"""
GATEWAY_BEHIND_TLS = """[Service]
ExecStart=
ExecStart=/opt/agent-guardian/venv/bin/agent-gateway --transport http --host 127.0.0.1 --port 8765 \\
    --socket /run/agent-guardian/agent.sock --ops-listen 127.0.0.1:9465 --allowed-host memory.test
"""


def test_an_agent_reaches_the_gateway_through_the_readmes_nginx_tls_config(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """nginx terminates TLS for memory.test with the README's config; the gateway, told that name, serves it."""
    d, system = deployed, deployed.system
    dropin = "/etc/systemd/system/agent-gateway.service.d/tls.conf"
    system.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=memory.test", "-addext", "subjectAltName=DNS:memory.test",
         "-keyout", "/etc/nginx/memory.test.key", "-out", "/etc/nginx/memory.test.pem"]
    )  # fmt: skip
    d.host_path("/etc/nginx/sites-enabled/memory.test").write_text(NGINX_SITE)
    system.run(["sh", "-c", "echo '127.0.0.1 memory.test' >> /etc/hosts"])
    system.run(["mkdir", "-p", "/etc/systemd/system/agent-gateway.service.d"])
    d.host_path(dropin).write_text(GATEWAY_BEHIND_TLS)
    try:
        system.systemctl("daemon-reload")
        system.systemctl("restart", "agent-gateway.service")
        system.systemctl("restart", "nginx.service")
        token = d.add_agent("tls-agent")
        url, trust = "https://memory.test/mcp", ["--ca", "/etc/nginx/memory.test.pem"]
        deadline = time.monotonic() + 30
        while True:  # the gateway restarts; nginx answers 502 until it listens
            stored = system.run(
                [VENV_PYTHON, CLIENTS, "store", "--url", url, *trust, "--token-file", token, "--content", "over TLS"],
                check=False,
                timeout=120,
            )
            if stored.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert stored.returncode == 0, stored.stderr[-2000:]
        memory_id = json.loads(stored.stdout)["ids"][0]
        got = d.mcp("get", "--url", url, *trust, "--token-file", token, "--id", memory_id)
        assert got["content"] == "over TLS"
    finally:
        system.run(["rm", "-f", dropin, "/etc/nginx/sites-enabled/memory.test"])
        system.systemctl("daemon-reload")
        system.systemctl("restart", "agent-gateway.service")
    report(
        capsys, "TLS: an MCP client stored and read a memory through nginx (the README's config) at https://memory.test"
    )


def test_the_oauth_key_fetcher_waits_for_an_issuer_and_runs_as_its_own_user(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its timer is enabled; with no issuer named it does nothing; named, it runs as agent-oauth, with a state dir
    only it may write, and an issuer it cannot reach (this root has no network out) leaves no key file."""
    d, system = deployed, deployed.system
    assert system.systemctl("is-enabled", "agent-guardian-oauth-keys.timer").stdout.strip() == "enabled"
    system.systemctl("start", "agent-guardian-oauth-keys.service")
    assert system.show("agent-guardian-oauth-keys.service", "ConditionResult") == "no"
    keys = "/var/lib/agent-guardian-oauth/issuer-keys.json"
    system.run(["install", "-m", "0600", "/dev/null", f"{ETC}/oauth.env"])
    d.host_path(f"{ETC}/oauth.env").write_text("ISSUER=https://issuer.invalid\n")
    try:
        # The timer (OnBootSec=1min) may start the service on its own while this test runs: stopped meanwhile,
        # so what is read below is this start's run.
        system.systemctl("stop", "agent-guardian-oauth-keys.timer")
        started = system.systemctl("start", "agent-guardian-oauth-keys.service", check=False)
        assert started.returncode != 0
        status = system.show("agent-guardian-oauth-keys.service", "ExecMainStatus")
        if status != "3":  # not reached: exit 3
            shown = system.systemctl("status", "agent-guardian-oauth-keys.service", check=False).stdout
            pytest.fail(f"ExecMainStatus {status}, not 3 (unreachable issuer):\n{shown}")
        assert system.show("agent-guardian-oauth-keys.service", "User") == "agent-oauth"
        log = system.run(["journalctl", "-u", "agent-guardian-oauth-keys.service", "--no-pager", "-o", "cat"]).stdout
        assert "the issuer's keys were not fetched: cannot reach" in log, log
        assert _modes(system, ["/var/lib/agent-guardian-oauth"]) == {
            "/var/lib/agent-guardian-oauth": ("755", "agent-oauth:agent-oauth")
        }
        assert not d.host_path(keys).exists()
    finally:
        system.run(["rm", "-f", f"{ETC}/oauth.env"])
        system.systemctl("reset-failed", "agent-guardian-oauth-keys.service", check=False)
        system.systemctl("start", "agent-guardian-oauth-keys.timer")
    config = yaml.safe_load(d.host_path(f"{ETC}/config.yaml").read_text())
    assert config["oauth_keys"] == keys
    report(capsys, "oauth keys: the fetcher runs only once an issuer is named, as agent-oauth; unreachable: exit 3")


# -- uninstall (last: it takes the deployment apart), then a fresh install on the purged host -------


def test_uninstall_keeps_data_and_a_reinstall_finds_it_then_purge_removes_everything(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    d, system = deployed, deployed.system
    output = _install(system, "--uninstall")
    for unit in (*SERVICES, "agent-guardian-backup.timer", "agent-guardian-oauth-keys.timer"):
        assert system.show(unit, "LoadState") == "not-found"
    assert not d.host_path("/opt/agent-guardian").exists()
    assert not d.host_path("/usr/local/bin/guardianctl").is_symlink()
    for kept in (DATABASE, f"{ETC}/credentials/db.key", f"{ETC}/policy.yaml", FIRST_ADMINS, BACKUP_KEY, ROOT_KEY):
        assert d.host_path(kept).exists(), f"uninstall removed {kept}:\n{output}"

    mark = time.monotonic()
    reinstalled = _install(system)
    reinstall = time.monotonic() - mark
    assert f"keeping {FIRST_ADMINS}" in reinstalled and "install: generated" not in reinstalled, reinstalled
    token = f"{WORK}/root/keeper.token"
    assert d.mcp("get", "--token-file", token, "--id", d.kept_memory_id)["content"] == d.kept_memory_content
    assert json.loads(d.ctl("--json", "whoami", user="sec").stdout)["name"] == "sec"

    _install(system, "--uninstall", "--purge")
    for gone in ("/opt/agent-guardian", "/var/lib/agent-guardian", ETC, "/var/log/agent-guardian", ROOT_KEY):
        assert not d.host_path(gone).exists(), f"--purge left {gone}"
    for gone in ("/run/agent-guardian", "/run/agent-embedder"):  # tmpfs inside: looked at from inside
        assert system.run(["test", "-e", gone], check=False).returncode != 0, f"--purge left {gone}"
    for name in ("agent-guardian", "agent-gateway", "agent-embedder"):
        assert system.run(["id", name], check=False).returncode != 0, f"--purge left the user {name}"
    for name in ("agent-gateway", "agent-security", "agent-guardian", "agent-embedder"):
        assert system.run(["getent", "group", name], check=False).returncode != 0, f"--purge left the group {name}"
    assert d.host_path(f"/home/sec/{USER_KEY}").exists(), "--purge removed a key it did not make"
    report(
        capsys, f"uninstall kept the data; reinstall ({reinstall:.1f} s) served the kept memory; --purge removed it all"
    )


def test_a_fresh_install_with_a_named_first_admin_then_a_new_backup_key(
    deployed: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the purge: install --admin sec --admin-key (sec's .pub); then, first-admins kept, a new backup key.

    No key is made for root, and root's guardianctl has none to sign with; sec signs as the first
    admin. When the backup key is new on an upgrade (here: deleted, and its admin removed), install.sh
    leaves first-admins as it is and prints the one command that enrols the new key, which sec runs.
    """
    d, system = deployed, deployed.system
    sec_public = f"/home/sec/{USER_KEY}.pub"
    mark = time.monotonic()
    first = _install(system, "--admin", "sec", "--admin-key", sec_public)
    fresh = time.monotonic() - mark
    assert f"wrote {FIRST_ADMINS}: sec (role security) and backup (role operator)" in first, first
    assert "The first admin is sec (role security)" in first
    assert not d.host_path(ROOT_KEY).exists(), "install.sh made root a key though --admin named the first admin"
    system.run(["usermod", "-aG", "agent-security", "sec"])  # the purge took the group away
    as_sec = json.loads(d.ctl("--json", "whoami", user="sec").stdout)
    assert (as_sec["name"], as_sec["role"], as_sec["fingerprint"]) == ("sec", "security", d.sec_fingerprint)
    as_root = d.ctl("whoami", check=False)
    assert as_root.returncode == 2 and "no admin key to sign with" in as_root.stderr, as_root

    d.ctl("admins", "remove", "backup", user="sec")
    system.run(["rm", f"{BACKUP_KEY}", f"{BACKUP_KEY}.pub"])
    mark = time.monotonic()
    upgrade = _install(system)
    upgraded = time.monotonic() - mark
    assert f"keeping {FIRST_ADMINS}" in upgrade and f"generated {BACKUP_KEY}" in upgrade, upgrade
    enrol = re.search(r"^ *(guardianctl admins add backup --public-key '[^']+' --role operator)$", upgrade, re.M)
    assert enrol, upgrade
    system.run(["/bin/sh", "-c", enrol[1]], user="sec")
    system.systemctl("start", "agent-guardian-backup.service", timeout=300)
    assert system.show("agent-guardian-backup.service", "Result") == "success"
    made = _audit_rows(d, "--agent", "@admin:backup", "--operation", "admin.backup.create")
    assert [(row["session"], row["decision"]) for row in made] == [(_fingerprint(system, f"{BACKUP_KEY}.pub"), "allow")]
    report(
        capsys,
        f"install --admin sec --admin-key {sec_public} on the purged host ({fresh:.1f} s): sec signs as the first"
        f" admin, root has no key; a new backup key on an upgrade ({upgraded:.1f} s): enrolled with the printed"
        " command, the backup unit signs with it",
    )
