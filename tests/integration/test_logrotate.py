"""systemd/logrotate.conf with the real logrotate against a real guardian: no log line is lost.

A guardian writes its main and security logs to files while threads make it deny
requests as fast as it can (each denial is one security-log line) and logrotate
rotates both files again and again. At the end, the "denied" lines across the
current and every rotated file (the old ones gzipped) must number exactly the
denials the clients were told of.

logrotate is the host's if installed. Otherwise, on a Debian-like machine, its
package (and any shared library it needs that the host lacks) is fetched with
`apt-get download` and unpacked with `dpkg-deb -x` into a cache dir: nothing is
installed on the host. Without that, the test is skipped and says why.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from guardian.state.statedir import init_state_dir
from tests.support.harness import ROOT, Guardian, agent_pb2

SHIPPED_CONFIG = ROOT / "systemd" / "logrotate.conf"
SHIPPED_PATHS = "/var/log/agent-guardian/guardian.log /var/log/agent-guardian/security.log"
SHIPPED_CREATE = "create 0640 agent-guardian agent-security"
SHIPPED_SU = "su agent-guardian agent-security"

#: Where an unpacked logrotate is kept between runs (not /tmp: the suite's tmp dirs come and go).
CACHE_DIR = Path("/var/tmp/agent-guardian-test-cache/logrotate")
ROTATIONS = 6  # fewer than the shipped `rotate 14`, so no rotated file is deleted before it is counted
LINES_PER_ROTATION = 150
SENDERS = 2


# -- the shipped file --------------------------------------------------------------------------------


def directives(config: str) -> list[str]:
    """The directive lines of a logrotate config, without comments and indentation."""
    stripped = (line.split("#", 1)[0].strip() for line in config.splitlines())
    return [line for line in stripped if line]


def test_shipped_config_rotates_by_rename_and_create() -> None:
    # Exactly these directives: no copytruncate (it loses the lines written between its copy and its
    # truncate), no postrotate (the guardian reopens by itself), no other service's logs.
    assert directives(SHIPPED_CONFIG.read_text()) == [
        SHIPPED_PATHS + " {",
        "daily",
        "rotate 14",
        "compress",
        "delaycompress",
        "missingok",
        "notifempty",
        SHIPPED_CREATE,
        SHIPPED_SU,
        "}",
    ]


def config_for(log_dir: Path) -> str:
    """The shipped config, pointed at log_dir, runnable by the user running the tests.

    Three lines change: the paths; `create 0640 agent-guardian agent-security`
    becomes `create 0640`; the `su` line goes. The guardian here runs as the
    test's user, so its files belong to that user, and agent-guardian (which may
    not even exist here) could neither rename them nor create files in the test's
    private dir. With no owner named, logrotate gives a new file the old one's
    owner and group. Everything else (daily, rotate 14, compress, delaycompress,
    missingok, notifempty, the 0640 mode) is the shipped file's, byte for byte.
    """
    shipped = SHIPPED_CONFIG.read_text()
    changed = shipped
    for old, new in (
        (SHIPPED_PATHS, f"{log_dir}/guardian.log {log_dir}/security.log"),
        (SHIPPED_CREATE, "create 0640"),
        (SHIPPED_SU + "\n", ""),
    ):
        assert changed.count(old) == 1, f"systemd/logrotate.conf no longer has exactly one {old.strip()!r}"
        changed = changed.replace(old, new)
    return changed


# -- getting logrotate ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Logrotate:
    """A logrotate binary and the environment it runs in."""

    binary: Path
    library_path: str = ""

    def run(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        if self.library_path:
            env["LD_LIBRARY_PATH"] = self.library_path
        return run([str(self.binary), *args], timeout_s=timeout_s, env=env)


def run(
    command: list[str], *, timeout_s: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command in its own process group; on timeout kill that group (by the PID we started) and raise."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def private_dir_owned_by_me(path: Path) -> bool:
    """Whether path is a real directory of ours that nobody else can write (we execute what is in it)."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022


def unpacked(tree: Path) -> Logrotate:
    """The logrotate in an unpacked package tree, with every directory holding a shared library on its path."""
    library_dirs = sorted({str(library.parent) for library in tree.rglob("lib*.so*")})
    return Logrotate(tree / "usr" / "sbin" / "logrotate", ":".join(library_dirs))


def missing_libraries(logrotate: Logrotate) -> list[str]:
    env = {**os.environ, "LD_LIBRARY_PATH": logrotate.library_path}
    result = run(["ldd", str(logrotate.binary)], timeout_s=30, env=env)
    return re.findall(r"^\s*(\S+) => not found", result.stdout, re.MULTILINE)


def apt_download(packages: list[str], into: Path) -> None:
    """`apt-get download` (after `apt-get update` if the package lists lack them); skips the test if it cannot."""
    try:
        result = run(["apt-get", "download", *packages], cwd=into, timeout_s=180)
        if result.returncode != 0 and os.geteuid() == 0:
            # A fresh machine has no package lists yet. Only the lists are updated: nothing is installed.
            update = run(["apt-get", "update"], timeout_s=300)
            if update.returncode != 0:
                pytest.skip(f"logrotate is not installed and `apt-get update` failed: {tail(update.stderr)}")
            result = run(["apt-get", "download", *packages], cwd=into, timeout_s=180)
    except subprocess.TimeoutExpired as timeout:
        pytest.skip(f"logrotate is not installed and {' '.join(map(str, timeout.cmd))} timed out (no network?)")
    if result.returncode != 0:
        why = "" if os.geteuid() == 0 else " (not root, so `apt-get update` was not tried)"
        pytest.skip(
            f"logrotate is not installed and `apt-get download {' '.join(packages)}` failed{why}: {tail(result.stderr)}"
        )


def library_dependencies(package: str) -> list[str]:
    """The library packages package depends on that the host does not have installed."""
    depends = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package], timeout_s=60).stdout
    names = re.findall(r"^\s*\|?Depends: ([a-z0-9][a-z0-9.+-]*)$", depends, re.MULTILINE)
    absent = []
    for name in dict.fromkeys(names):
        if not name.startswith("lib"):
            continue
        status = run(["dpkg-query", "-W", "-f=${db:Status-Status}", name], timeout_s=30).stdout
        if status != "installed":
            absent.append(name)
    return absent


def fetch_logrotate(destination: Path) -> Logrotate:
    """Download and unpack logrotate (and the libraries it lacks) into destination, which must not exist."""
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query", "ldd"):
        if shutil.which(tool) is None:
            pytest.skip(
                f"logrotate is not installed, and without {tool} (not a Debian-like machine?) it cannot be"
                " fetched; install logrotate to run this test"
            )
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=destination.parent))
    try:
        debs, tree = work / "debs", work / "tree"
        debs.mkdir()
        apt_download(["logrotate"], debs)
        for deb in debs.glob("*.deb"):
            run(["dpkg-deb", "-x", str(deb), str(tree)], timeout_s=60).check_returncode()
        logrotate = unpacked(tree)
        if missing_libraries(logrotate):
            libraries = library_dependencies("logrotate")
            if libraries:
                apt_download(libraries, debs)
            for deb in debs.glob("*.deb"):
                run(["dpkg-deb", "-x", str(deb), str(tree)], timeout_s=60).check_returncode()
            logrotate = unpacked(tree)
            if missing := missing_libraries(logrotate):
                pytest.skip(f"the downloaded logrotate still lacks shared libraries {missing}; install logrotate")
        version = logrotate.run("--version", timeout_s=30)
        if version.returncode != 0:
            pytest.skip(f"the downloaded logrotate does not run: {tail(version.stderr)}")
        shutil.rmtree(debs)
        try:
            tree.rename(destination)  # atomic: a concurrent run either wins or finds ours
        except OSError:
            if not (destination / "usr" / "sbin" / "logrotate").exists():
                raise
        return unpacked(destination)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def logrotate() -> Iterator[Logrotate]:
    """The host's logrotate, else one unpacked from Debian's package (cached), else the test is skipped."""
    installed = shutil.which("logrotate", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if installed:
        yield Logrotate(Path(installed))
        return
    cache_parent = CACHE_DIR.parent
    cache_parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not private_dir_owned_by_me(cache_parent):
        # Someone else could swap what is in it; fetch into a private dir used by this run only.
        private = Path(tempfile.mkdtemp(prefix="agent-guardian-logrotate-"))
        try:
            yield fetch_logrotate(private / "logrotate")
        finally:
            shutil.rmtree(private, ignore_errors=True)
        return
    cached = unpacked(CACHE_DIR)
    usable = private_dir_owned_by_me(CACHE_DIR) and cached.binary.exists()
    if usable and cached.run("--version", timeout_s=30).returncode == 0:
        yield cached
        return
    if CACHE_DIR.exists():
        shutil.rmtree(CACHE_DIR)  # ours but broken: fetch again
    yield fetch_logrotate(CACHE_DIR)


# -- the guardian and its load --------------------------------------------------------------------------


@contextmanager
def guardian_logging_to(log_dir: Path) -> Iterator[Guardian]:
    """A started guardian on a fresh state dir whose config sends both logs to files in log_dir."""
    state_dir = Path(tempfile.mkdtemp(prefix="ag-", dir="/tmp"))  # short: socket paths must fit sun_path
    guardian = Guardian(state_dir)
    try:
        init_state_dir(state_dir)
        config = yaml.safe_load(guardian.config.read_text()) or {}
        # Merged into what is there: every other key stays as init (or the harness) left it.
        logging_section = config.setdefault("logging", {})
        logging_section.update(file=str(log_dir / "guardian.log"), security_file=str(log_dir / "security.log"))
        ops = config.setdefault("ops", {})
        if ops.get("listen"):
            ops["listen"] = "127.0.0.1:0"  # a free port, as running_guardian does: never collides with another
        guardian.config.write_text(yaml.safe_dump(config, sort_keys=False))
        guardian.start()
        yield guardian
    finally:
        if guardian.process is not None:
            guardian.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


class DeniedCalls(threading.Thread):
    """Calls Get with a session the guardian never issued until told to stop; counts the denials."""

    def __init__(self, guardian: Guardian, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.guardian = guardian
        self.done = done
        self.denied = 0
        self.problems: list[str] = []

    def run(self) -> None:
        channel, stub = self.guardian.agent_stub()
        request = agent_pb2.GetRequest(session_id="ses_never_issued", id="mem_none")
        try:
            while not self.done.is_set():
                try:
                    stub.Get(request, timeout=30)
                except grpc.RpcError as error:
                    # The guardian writes the security-log line before it answers, so each
                    # UNAUTHENTICATED here is one line on disk. Anything else makes the count
                    # uncertain: stop and fail.
                    if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                        self.problems.append(f"{error.code()}: {error.details()}")
                        return
                    self.denied += 1
                else:
                    self.problems.append("a Get with a session never issued was answered")
                    return
        except Exception as error:
            self.problems.append(repr(error))
        finally:
            channel.close()


def wait_for_denials(senders: list[DeniedCalls], when: str, timeout_s: float = 60) -> None:
    """Wait until the senders have made LINES_PER_ROTATION more denials; fail on a sender's problem."""

    def sent() -> int:
        assert not any(sender.problems for sender in senders), [sender.problems for sender in senders]
        return sum(sender.denied for sender in senders)

    target = sent() + LINES_PER_ROTATION
    deadline = time.monotonic() + timeout_s
    while sent() < target:
        assert time.monotonic() < deadline, f"timed out waiting for {LINES_PER_ROTATION} denials {when}"
        time.sleep(0.005)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of one log file (gzipped or not); fails on a line that is not one."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    text = raw.decode("utf-8")
    assert text == "" or text.endswith("\n"), f"{path.name} ends in a partial line"
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = json.loads(line)
        assert isinstance(entry, dict), f"{path.name}:{number} is not a JSON object"
        entries.append(entry)
    return entries


# -- the test ---------------------------------------------------------------------------------------


def test_no_line_is_lost_across_rotations(logrotate: Logrotate, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    log_dir.mkdir(mode=0o750)  # logrotate skips a dir that others (or a non-root group) can write
    config = tmp_path / "logrotate.conf"
    config.write_text(config_for(log_dir))
    config.chmod(0o644)  # logrotate ignores a config file others can write
    state = tmp_path / "logrotate.status"
    done = threading.Event()
    senders: list[DeniedCalls] = []
    outputs: list[str] = []
    with guardian_logging_to(log_dir) as guardian:
        try:
            senders = [DeniedCalls(guardian, done) for _ in range(SENDERS)]
            for sender in senders:
                sender.start()

            for rotation in range(ROTATIONS):
                # Lines in the file, so that notifempty does not skip this rotation.
                wait_for_denials(senders, f"before rotation {rotation + 1}")
                result = logrotate.run("--force", "--verbose", "--state", str(state), str(config))
                outputs.append(result.stderr + result.stdout)
                assert result.returncode == 0, f"logrotate failed on rotation {rotation + 1}:\n{outputs[-1]}"
            wait_for_denials(senders, "after the last rotation")
        finally:
            done.set()
            for sender in senders:
                sender.join(timeout=60)
        assert not any(sender.is_alive() for sender in senders)
        assert not any(sender.problems for sender in senders), [sender.problems for sender in senders]
        sent_total = sum(sender.denied for sender in senders)
        assert guardian.stop() == 0

    files = {path.name: path for path in log_dir.iterdir()}
    logs = {name: read_log(path) for name, path in files.items()}  # every file: JSON lines, nothing partial
    security_files = rotation_series("security.log", files)
    # Every security file had lines when it was rotated, so no rotation was skipped.
    assert len(security_files) == ROTATIONS + 1, "\n".join(outputs)
    found = sum(entry.get("event") == "denied" for name in security_files for entry in logs[name])
    assert found == sent_total, f"{sent_total} denials answered, {found} denied lines in {security_files}"
    assert all(entry["logger"] == "agent_guardian.security" for name in security_files for entry in logs[name])

    # The main log has lines at start and at stop, hardly between: the first rotation takes the start
    # line, later ones mostly skip the empty new file (notifempty), and the stop line is in a new file.
    main_files = rotation_series("guardian.log", files)
    assert len(main_files) >= 2, "\n".join(outputs)
    assert sorted([*security_files, *main_files]) == sorted(files), "unexpected files in the log dir"
    main_events = [entry.get("event") for name in main_files for entry in logs[name]]
    assert "serving" in main_events and "denied" not in main_events
    assert "serving" not in [entry.get("event") for entry in logs["guardian.log"]]
    assert "stopping" in [entry.get("event") for entry in logs["guardian.log"]]

    modes = {name: stat.S_IMODE(path.stat().st_mode) for name, path in files.items()}
    assert modes == dict.fromkeys(files, 0o640)


def rotation_series(base: str, files: dict[str, Path]) -> list[str]:
    """The names of base's current and rotated files; fails unless they are what compress + delaycompress make.

    That is base, base.1 (left plain for a late line), base.2.gz, ... with no gap and nothing else.
    """
    names = [name for name in files if name == base or name.startswith(base + ".")]
    count = len(names) - 1
    expected = [base] + [f"{base}.{n}" + (".gz" if n > 1 else "") for n in range(1, count + 1)]
    assert sorted(names) == sorted(expected), f"{base}: {sorted(names)}"
    return expected
