"""A real systemd, booted as PID 1 in a throwaway Debian root, for the system test.

DESIGN.md's recipe, made safe to run on a developer's host or a CI machine:

- ``debootstrap --variant=minbase`` builds a pristine bookworm root once
  (debootstrap itself is installed with apt-get when missing); it is cached
  under /var/tmp/agent-guardian-test-cache/ ($AGENT_GUARDIAN_TEST_CACHE moves
  it), keyed by suite, variant, architecture and package list, and every run
  works on a fresh copy of it, deleted afterwards. debootstrap runs in its own
  mount and PID namespaces, so whatever it mounts or starts goes away with it.
- systemd boots in new PID, mount, UTS, IPC, network and cgroup namespaces:
  ``unshare --pid --fork --mount --uts --ipc --net``, then (as PID 1 of the new
  namespace) mounts are made private, the root is bind-mounted onto itself,
  proc, sysfs (read-only), tmpfs on /run and /tmp and a private /dev are
  mounted, the process moves into a cgroup of its own and ``unshare --cgroup``
  makes that cgroup the namespace's root, and ``exec chroot ROOT
  /lib/systemd/systemd --system`` replaces it, keeping PID 1.
  Why each deviation from the bare recipe:

  * ``--uts``: systemd sets the hostname; the host keeps its own.
  * ``--net``: the units listen on 127.0.0.1:8765, :9464 and :9465 inside the
    root without colliding with anything on the host (systemd brings up lo).
    install.sh itself runs in the host's network namespace (nsenter without
    ``-n``) so that pip can reach PyPI; systemctl reaches systemd through its
    filesystem socket, which works from any network namespace.
  * ``--ipc``, and the cgroup namespace with cgroup2 mounted on /sys/fs/cgroup
    before systemd starts (and ``systemd.unified_cgroup_hierarchy=1``, which
    systemd reads from its own arguments in a container): systemd creates its
    slices, scopes and BPF programs (IPAddressDeny=) under a cgroup made for
    this run, removed afterwards. Left to choose, systemd 252 on a host that
    uses cgroup v1 controllers picks the hybrid layout and creates init.scope,
    system.slice, ... in the host's own v1 hierarchies.
  * /proc/sys and /sys read-only, ``container=`` in PID 1's environment (as
    nspawn does): systemd does not write host-wide sysctls (kernel.core_pattern,
    fs.nr_open, ...), udev does not trigger the host's devices.
  * a private /dev (tmpfs with null, zero, full, random, urandom and tty bound
    from the host, and a new devpts instance) instead of binding the host's:
    systemd-tmpfiles-setup-dev would otherwise change modes and groups of the
    host's own device nodes.
  * the root's mounts are made shared (after the host's were made private):
    systemd moves each unit's credentials mount (LoadCredential=) back from a
    helper's namespace, which only propagates over a shared mount.
  * units that touch the host or the console (gettys, sysctl, binfmt, module
    loading, pstore, kernel audit) or only add noise (cron, apt timers) are
    masked in the copy.

- Commands run inside with ``nsenter -t PID -m -u -i -p -C [-n] -r -w``
  (PID: systemd's PID in the host's PID namespace, the child of unshare).
  systemctl is never run against the host.
- The end: SIGKILL to that PID (the kernel then kills every process of the PID
  namespace), unshare exits, the cgroup subtree is removed, and the mounts,
  which exist only in the private mount namespace, vanish with it. ``stop()``
  checks all of that (no process left with its root in the copy, no mount
  under it on the host, the cgroup gone, no init.scope new in the host's
  cgroup v1 hierarchies) before the copy is deleted with
  ``rm --one-file-system``. unshare runs under ``setpriv --pdeathsig KILL`` and
  ``--kill-child``, so even a test process killed with SIGKILL takes the
  booted system with it; the next run removes the copy and the (empty)
  cgroup such a run leaves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_DIR",
    "INCLUDE",
    "BootedSystem",
    "Unavailable",
    "booted",
    "check_host",
    "ensure_debootstrap",
    "fresh_copy",
    "pristine_root",
    "remove_copy",
]

#: Where pristine roots are kept between runs ($AGENT_GUARDIAN_TEST_CACHE moves it, e.g. to a CI cache).
CACHE_DIR = Path(os.environ.get("AGENT_GUARDIAN_TEST_CACHE", "/var/tmp/agent-guardian-test-cache"))
RUNS_DIR = Path("/var/tmp")
RUN_PREFIX = "agent-guardian-systest-"
SUITE = "bookworm"
VARIANT = "minbase"
#: $AGENT_GUARDIAN_TEST_MIRROR: a closer Debian mirror (the cached root does not depend on which).
MIRROR = os.environ.get("AGENT_GUARDIAN_TEST_MIRROR", "http://deb.debian.org/debian")
#: util-linux (runuser, setpriv) and passwd (useradd) come with minbase. openssh-client: the security
#: team's admin keys are made with ssh-keygen, as a person would make theirs (install.sh needs none of it).
#: nginx-light and openssl: the gateway behind a TLS-terminating proxy, as the README configures it.
INCLUDE = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "ca-certificates",
    "curl",
    "procps",
    "logrotate",
    "openssh-client",
    "nginx-light",
    "openssl",
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

#: Units masked in the copy: they would touch the host (sysctls, binfmt, modules, pstore,
#: the kernel's audit stream, a console) or only add noise to the run.
MASKED_UNITS = (
    "getty.target",
    "getty@.service",
    "serial-getty@.service",
    "console-getty.service",
    "container-getty@.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "systemd-pstore.service",
    "systemd-journald-audit.socket",
    "systemd-firstboot.service",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "cron.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "fstrim.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "logrotate.timer",
)

#: Runs as PID 1 of the new PID namespace, in the new mount namespace, before systemd.
#: $1: the root; $2: the cgroup (in the host's cgroup2 hierarchy) made for this run.
_BOOT_SCRIPT = r"""
set -eu
root=$1 cgroup=$2
echo 0 > "$cgroup/cgroup.procs"
mount --make-rprivate /
mount --bind "$root" "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
for node in null zero full random urandom tty; do
    touch "$root/dev/$node"
    mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"
ln -s /proc/self/fd/2 "$root/dev/stderr"
mount --make-rshared "$root"
exec unshare --cgroup -- /bin/sh -c '
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$1/sys/fs/cgroup"
    exec chroot "$1" /usr/bin/env -i container=agent-guardian-test \
        /lib/systemd/systemd --system --show-status=no systemd.unified_cgroup_hierarchy=1
' boot "$root"
"""


class Unavailable(Exception):
    """This machine cannot run the system test; the message says why (the test skips with it)."""


def _run(
    argv: Sequence[str], timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, env=env)


def check_host() -> None:
    """Raise Unavailable unless this machine can boot systemd in a throwaway root."""
    if not Path("/proc/self/ns/pid").exists():
        raise Unavailable("needs Linux namespaces")
    if os.geteuid() != 0:
        raise Unavailable("needs root (it boots systemd in throwaway namespaces and runs install.sh there)")
    missing = [tool for tool in ("unshare", "nsenter", "chroot", "setpriv", "mount") if not shutil.which(tool)]
    if missing:
        raise Unavailable(f"needs {', '.join(missing)} on the host (apt-get install util-linux systemd)")
    if cgroup2_parent() is None:
        raise Unavailable("needs a cgroup2 hierarchy on the host (cgroup v2 or hybrid) to give systemd a cgroup")
    probe = _run(["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--net", "--cgroup", "true"])
    if probe.returncode != 0:
        raise Unavailable(f"cannot create namespaces here (an unprivileged container?): {probe.stderr.strip()}")


def ensure_debootstrap() -> None:
    """Install debootstrap (and Debian's archive keyring) with apt-get if missing; else raise Unavailable."""
    packages = [] if shutil.which("debootstrap") else ["debootstrap"]
    if not DEBIAN_KEYRING.exists():  # e.g. an Ubuntu host: debootstrap could not verify Debian's archive
        packages.append("debian-archive-keyring")
    if not packages:
        return
    if not shutil.which("apt-get"):
        raise Unavailable(f"{' and '.join(packages)} missing and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    result = _run(install, timeout=600, env=env)
    if result.returncode != 0:  # a host that never ran apt-get update has no package lists
        _run(["apt-get", "update"], timeout=600, env=env)
        result = _run(install, timeout=600, env=env)
    if result.returncode != 0 or not shutil.which("debootstrap") or not DEBIAN_KEYRING.exists():
        raise Unavailable(f"apt-get could not install {' and '.join(packages)}: {result.stderr.strip()[-500:]}")


def _architecture() -> str:
    result = _run(["dpkg", "--print-architecture"])
    return result.stdout.strip() if result.returncode == 0 else os.uname().machine


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pristine_root() -> tuple[Path, bool]:
    """The cached pristine root (built now if missing) and whether it was built by this call.

    Concurrent test runs wait for one another on a lock; a build that fails leaves nothing behind.
    """
    arch = _architecture()
    key = hashlib.sha256(repr((SUITE, VARIANT, arch, sorted(INCLUDE))).encode()).hexdigest()[:12]
    CACHE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    entry = CACHE_DIR / f"debootstrap-{SUITE}-{arch}-{key}"
    root, complete = entry / "root", entry / "complete"
    with _locked(CACHE_DIR / f"debootstrap-{key}.lock"):
        if complete.exists():
            return root, False
        ensure_debootstrap()
        partial = CACHE_DIR / f"debootstrap-{key}.partial"
        _remove_tree(partial)
        partial.mkdir()
        log = partial / "debootstrap.log"
        argv = [
            "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--mount-proc",
            "debootstrap", f"--variant={VARIANT}", f"--include={','.join(INCLUDE)}", f"--arch={arch}",
            f"--keyring={DEBIAN_KEYRING}",
            SUITE, str(partial / "root"), MIRROR,
        ]  # fmt: skip
        with log.open("w") as out:
            result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=1200, check=False)
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-1500:]
            _remove_tree(partial)
            raise Unavailable(f"debootstrap of {SUITE} from {MIRROR} failed (is the mirror reachable?):\n{tail}")
        _remove_tree(entry)
        partial.rename(entry)
        (entry / "complete").write_text(f"{SUITE} {VARIANT} {arch} {','.join(INCLUDE)}\n")
    return root, True


def _remove_tree(path: Path) -> None:
    """rm -rf that never crosses into another filesystem (a leaked bind mount stays untouched)."""
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True, timeout=300)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_runs() -> None:
    """Remove copies and cgroups left by earlier runs whose test process is gone (one killed mid-run)."""
    candidates = list(RUNS_DIR.glob(f"{RUN_PREFIX}*"))
    parent = cgroup2_parent()
    if parent is not None:
        candidates += list(parent.glob(f"{RUN_PREFIX}*"))
    for path in candidates:
        owner = path.name.removeprefix(RUN_PREFIX).split("-", 1)[0]
        if not owner.isdigit() or _pid_alive(int(owner)):
            continue
        if path.is_relative_to(RUNS_DIR) and not _mounts_under(path):
            _remove_tree(path)
        elif parent is not None and path.is_relative_to(parent):
            _remove_cgroup(path, timeout_s=1)


def fresh_copy(pristine: Path) -> Path:
    """A new run directory holding a copy of the pristine root (RUN/root), ready to boot."""
    _sweep_stale_runs()
    run = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=RUNS_DIR))
    root = run / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(pristine), str(root)], check=True, timeout=300)
    units = root / "etc/systemd/system"
    for unit in MASKED_UNITS:
        (units / unit).unlink(missing_ok=True)
        (units / unit).symlink_to("/dev/null")
    shutil.rmtree(units / "getty.target.wants", ignore_errors=True)
    (root / "etc/machine-id").write_text(secrets.token_hex(16) + "\n")
    (root / "etc/hostname").write_text("agent-guardian-test\n")
    # install.sh's pip and bootstrap_venv.py reach PyPI from inside the root: the host's
    # resolver and CA bundle (which may hold a proxy's CA the root's package does not).
    shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
    if HOST_CA_BUNDLE.exists():
        shutil.copyfile(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
    return run


def remove_copy(run: Path) -> None:
    """Delete a run directory; refuses (raises) while anything is still mounted under it."""
    leaked = _mounts_under(run)
    if leaked:
        raise RuntimeError(f"refusing to delete {run}: still mounted on the host: {leaked}")
    _remove_tree(run)


def cgroup2_parent() -> Path | None:
    """This process's own cgroup in the host's cgroup2 hierarchy (where the run's cgroup is made)."""
    mount_point = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2" and fields[3] == "/":
            mount_point = Path(fields[4])
            break
    if mount_point is None:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return mount_point / line[3:].lstrip("/")
    return None


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return [point for point in points if point == str(path) or point.startswith(prefix)]


def _cgroup_tree(cgroup: Path) -> list[Path]:
    """The cgroup and every cgroup below it, deepest first."""
    return sorted((p for p in [cgroup, *cgroup.rglob("*")] if p.is_dir()), key=lambda p: len(p.parts), reverse=True)


def _remove_cgroup(cgroup: Path, timeout_s: float) -> list[str]:
    """Kill whatever is left in the cgroup subtree and remove it; the problems found (empty: clean)."""
    if not cgroup.exists():
        return []
    problems: list[str] = []
    kill = cgroup / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = []
        for group in _cgroup_tree(cgroup):
            try:
                group.rmdir()
            except OSError:
                remaining.append(group)
        if not remaining:
            return problems
        if time.monotonic() > deadline:
            procs = [(g / "cgroup.procs").read_text().split() for g in remaining if (g / "cgroup.procs").exists()]
            problems.append(f"cgroups not removable: {[str(g) for g in remaining]} (processes: {procs})")
            return problems
        time.sleep(0.1)


@dataclass
class BootedSystem:
    """systemd running as PID 1 of its own namespaces, in a copy of the root."""

    root: Path
    #: systemd's PID in the host's PID namespace.
    pid: int
    unshare: subprocess.Popen[bytes]
    cgroup: Path
    #: init.scope cgroups in the host's v1 hierarchies before the boot (none may appear).
    v1_before: set[str]

    def command(self, argv: Sequence[str], *, user: str | None = None, net: bool = True) -> list[str]:
        """argv as it runs inside: in systemd's namespaces and root, a clean environment, optionally as user."""
        namespaces = ["-m", "-u", "-i", "-p", "-C"] + (["-n"] if net else [])
        env = ["/usr/bin/env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root", "TERM=dumb"]
        as_user = ["/usr/sbin/runuser", "-u", user, "--"] if user else []
        return ["nsenter", "-t", str(self.pid), *namespaces, "-r", "-w", *env, *as_user, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        user: str | None = None,
        net: bool = True,
        check: bool = True,
        timeout: float = 60,
        extra_env: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside (see command); check: raise with its output when it fails."""
        argv = ["/usr/bin/env", *extra_env, *argv] if extra_env else list(argv)
        result = _run(self.command(argv, user=user, net=net), timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"inside the root, {' '.join(argv)} (as {user or 'root'}) exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def popen(self, argv: Sequence[str], *, user: str | None = None, log: Path) -> subprocess.Popen[bytes]:
        """Start argv inside, in the background, its output appended to log (on the host)."""
        with log.open("ab") as out:
            return subprocess.Popen(self.command(argv, user=user), stdout=out, stderr=subprocess.STDOUT)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """systemctl inside the root (never on the host)."""
        return self.run(["systemctl", "--no-pager", *args], check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit, e.g. show("agent-guardian.service", "MainPID")."""
        return self.systemctl("show", "--value", "-p", prop, unit).stdout.strip()

    def wait_until_running(self, timeout_s: float = 90) -> str:
        """Wait for ``systemctl is-system-running`` to say running or degraded; returns which."""
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            if self.unshare.poll() is not None:
                raise AssertionError(f"systemd exited during boot; see {self.root.parent / 'boot.log'}")
            result = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)
        raise AssertionError(f"systemd did not finish booting in {timeout_s} s (is-system-running: {state!r})")

    def stop(self) -> list[str]:
        """Kill systemd and everything in its namespaces; the problems found afterwards (empty: clean)."""
        problems: list[str] = []
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            problems.append(f"unshare (PID {self.unshare.pid}) did not exit after systemd was killed")
            self.unshare.kill()
            self.unshare.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _pid_alive(self.pid) and _is_zombie(self.pid) is False and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(self.pid) and _is_zombie(self.pid) is False:
            problems.append(f"systemd (PID {self.pid}) is still running")
        problems += _remove_cgroup(self.cgroup, timeout_s=10)
        leftovers = _processes_rooted_in(self.root)
        if leftovers:
            problems.append(f"processes left with their root in {self.root}: {leftovers}")
        mounts = _mounts_under(self.root.parent)
        if mounts:
            problems.append(f"mounts left on the host under {self.root.parent}: {mounts}")
        v1_new = _v1_init_scopes() - self.v1_before
        if v1_new:
            problems.append(f"systemd created cgroups in the host's v1 hierarchies: {sorted(v1_new)}")
        return problems


def _v1_init_scopes() -> set[str]:
    """The init.scope cgroups in the host's cgroup v1 hierarchies (a systemd that took one over leaves it)."""
    found: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup":
            with contextlib.suppress(OSError):
                found.update(str(path) for path in Path(fields[4]).rglob("init.scope"))
    return found


def _is_zombie(pid: int) -> bool | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _processes_rooted_in(root: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            target = os.readlink(proc / "root")
            if target == str(root) or target.startswith(str(root) + "/"):
                found.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
    return found


def _systemd_child(unshare_pid: int, timeout_s: float) -> int:
    """The PID of systemd: unshare's child, once it has exec'd /lib/systemd/systemd."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
            for child in children:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{child}/exe").endswith("/systemd"):
                        return int(child)
        time.sleep(0.02)
    raise AssertionError("systemd did not start in the throwaway root")


@contextlib.contextmanager
def booted(run: Path) -> Iterator[BootedSystem]:
    """Boot systemd in RUN/root; on the way out kill it, check nothing is left, and raise if something is."""
    root = run / "root"
    parent = cgroup2_parent()
    assert parent is not None
    cgroup = parent / run.name
    cgroup.mkdir()
    v1_before = _v1_init_scopes()
    log = (run / "boot.log").open("ab")
    argv = [
        "setpriv", "--pdeathsig", "KILL", "--",
        "unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
        "--uts", "--ipc", "--net",
        "/bin/sh", "-c", _BOOT_SCRIPT, "boot", str(root), str(cgroup),
    ]  # fmt: skip
    unshare = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    system = None
    try:
        try:
            pid = _systemd_child(unshare.pid, timeout_s=30)
        except AssertionError:
            boot_log = (run / "boot.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"systemd did not start in the throwaway root: {boot_log}") from None
        system = BootedSystem(root=root, pid=pid, unshare=unshare, cgroup=cgroup, v1_before=v1_before)
        yield system
    finally:
        if system is not None:
            problems = system.stop()
        else:
            unshare.kill()
            unshare.wait(timeout=30)
            problems = _remove_cgroup(cgroup, timeout_s=10)
        if problems:
            raise AssertionError("the throwaway system did not go away cleanly: " + "; ".join(problems))
