"""A piece of work the daemon runs on a thread of its own beside serving: housekeeping, recall indexing."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

__all__ = ["Background"]


class Background(ABC):
    """Runs :meth:`run` on a daemon thread; :meth:`stop` asks it to end and waits for the step in progress."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the work to end, and wait (at most 30 s) for the step in progress."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @abstractmethod
    def run(self) -> None:
        """The work; it checks ``self._stop`` between steps."""
