"""systemd's service notification protocol (``Type=notify``, ``WatchdogSec=``), without libsystemd.

A daemon started by systemd with ``NOTIFY_SOCKET`` set sends ``READY=1`` once
it serves, ``RELOADING=1`` / ``READY=1`` around a reload, ``STOPPING=1`` when
it begins to stop, and ``WATCHDOG=1`` at least every ``WATCHDOG_USEC / 2``.
Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing, so the same
code runs under ``make run`` and in tests.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["Watchdog", "notify"]


def notify(state: str) -> bool:
    """Send state (e.g. ``"READY=1"``) to systemd; False when not started by systemd or it failed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


class Watchdog:
    """Sends ``WATCHDOG=1`` when due, if systemd asked this process for it (``WATCHDOG_USEC``)."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: Seconds between pings (half the watchdog timeout); None when no watchdog is set.
        self.interval_s: float | None = int(usec) / 2_000_000 if wanted else None
        self._next = 0.0

    def ping_if_due(self) -> None:
        """Ping if half the timeout has passed since the last ping."""
        if self.interval_s is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.interval_s
        notify("WATCHDOG=1")
