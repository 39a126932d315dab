"""``agent-guardian``: run the guardian daemon.

Loads and validates the config, keys and policy, opens the encrypted
database, binds the agent and admin sockets and serves until SIGTERM or
SIGINT (in-flight requests finish, then the database is closed). SIGHUP
reloads the policy; a policy that fails validation leaves the running one.
Under systemd (``Type=notify``) it reports READY, RELOADING and STOPPING, and
pings the watchdog from its main loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

# One thread for numpy's BLAS, set before anything loads numpy: the guardian's vector work is small
# (one query against the caller's partitions), and BLAS worker threads spinning between calls would
# cost CPU on every request (measured: a search's CPU 6.9 ms instead of 0.9 at 16 clients).
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from guardian.daemon.heap import tune_heap  # noqa: E402 - after the BLAS setting
from guardian.daemon.maintenance import Maintenance  # noqa: E402
from guardian.daemon.recall import RecallIndexer  # noqa: E402
from guardian.daemon.server import GuardianServer  # noqa: E402
from guardian.state.config import load_config  # noqa: E402
from guardian.state.core import GuardianCore  # noqa: E402
from guardian.state.limits import restore as restore_limits  # noqa: E402 - after the BLAS setting
from guardian.state.limits import save_changed as save_limits  # noqa: E402 - after the BLAS setting
from shared.errors import ConfigError  # noqa: E402
from shared.jsonlog import configure_logging  # noqa: E402
from shared.ops_http import OpsServer  # noqa: E402
from shared.otlp import export_spans  # noqa: E402
from shared.sdnotify import Watchdog, notify  # noqa: E402

__all__ = ["main"]

log = logging.getLogger("agent_guardian")
security_log = logging.getLogger("agent_guardian.security")

#: How often the gRPC health service is brought in line with the readiness checks.
_HEALTH_CHECK_INTERVAL_S = 2.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-guardian",
        description="Run the agent-guardian daemon: the only process that holds the encrypted memory database,"
        " its keys and the policy. Serves agents on the agent socket and guardianctl on the admin socket.",
        epilog="Create a working state dir first with: guardianctl init --state-dir DIR. Signals: SIGTERM/SIGINT"
        " stop gracefully, SIGHUP reloads the policy.",
    )
    parser.add_argument("--config", required=True, type=Path, help="path to config.yaml (see guardianctl init)")
    return parser


def _start_ops(listen: tuple[str, int] | None, core: GuardianCore) -> OpsServer | None:
    """Serve /healthz, /readyz and /metrics if configured; None if not configured or it cannot bind."""
    if listen is None:
        return None
    try:
        ops = OpsServer(listen[0], listen[1], core.readiness, core.metrics.registry)
    except ConfigError as error:
        log.error("cannot start: %s", error.message, extra={"event": "start_failed"})
        return None
    ops.start()
    log.info("ops endpoint listening", extra={"event": "ops_listening", "host": listen[0], "port": ops.port})
    return ops


def _serve_until_stopped(
    core: GuardianCore, server: GuardianServer, stop: threading.Event, reload: threading.Event
) -> None:
    """The main loop: policy reloads, health, the watchdog; then a graceful stop and the last chain head."""
    config = core.config
    housekeeping = Maintenance(core, config.housekeeping_interval_ms / 1000, config.audit_head_interval_ms / 1000)
    housekeeping.start()
    recall = RecallIndexer(core)
    recall.start()
    notify(f"READY=1\nSTATUS=serving; policy {core.policy.version[:12]}")
    watchdog = Watchdog()
    next_health_check = 0.0
    while not stop.wait(0.2):
        watchdog.ping_if_due()  # from the main loop: a stuck loop stops the pings, and systemd restarts it
        if reload.is_set():
            reload.clear()
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            core.reload_policy_file()
            notify(f"READY=1\nSTATUS=serving; policy {core.policy.version[:12]}")
        if time.monotonic() >= next_health_check:
            next_health_check = time.monotonic() + _HEALTH_CHECK_INTERVAL_S
            server.set_serving(core.readiness().ready)
    notify("STOPPING=1")
    server.stop(config.shutdown_grace_s)
    recall.stop()
    housekeeping.stop()
    core.publish_audit_head("shutdown")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``agent-guardian``."""
    tune_heap()  # before any thread starts (guardian/daemon/heap.py)
    args = _parser().parse_args(argv)
    configure_logging("info")
    os.umask(0o077)
    try:
        config = load_config(args.config)
        configure_logging(config.log_level, log_file=config.log_file, security_file=config.security_log_file)
        core = GuardianCore.open(config)
    except ConfigError as error:
        log.error("cannot start: %s", error.message, extra={"event": "start_failed"})
        return 2
    stop_exporting = export_spans("agent-guardian", config.otlp_endpoint) if config.otlp_endpoint else None
    restore_limits(core)  # before the first request: a restart is no way around a lockout
    core.database.before_each_commit(lambda connection: save_limits(core, connection))
    server = GuardianServer(core)
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"event": "stopping", "signal": signal.Signals(signum).name})
        stop.set()

    reload = threading.Event()

    def request_reload(_signum: int, _frame: FrameType | None) -> None:
        reload.set()  # handled by the main loop, outside the signal handler

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    try:
        server.start()
    except ConfigError as error:
        log.error("cannot start: %s", error.message, extra={"event": "start_failed"})
        server.stop(0)
        core.close()
        return 2
    ops = _start_ops(config.ops_listen, core)
    if ops is None and config.ops_listen is not None:
        server.stop(0)
        core.close()
        return 2
    _serve_until_stopped(core, server, stop, reload)
    if ops is not None:
        ops.stop()
    core.close()
    if stop_exporting is not None:
        stop_exporting()  # the last spans out
    log.info("stopped", extra={"event": "stopped"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
