"""Structured logging: one JSON object per line, for both processes.

Two loggers matter: ``agent_guardian`` (the main log) and
``agent_guardian.security`` (denials, anomalies, integrity failures, policy
changes, audit chain heads, admin actions). Only fields named in a record's
``extra`` are added, so a log line holds what the code chose to put there:
never memory content, a token or a key.

By default every line goes to stderr (the journal under systemd). Given
files, the main log and the security log each go to their own file, opened
in append mode and reopened when the path no longer names the open file, so
``logrotate`` (rename, then create) loses no line: a line written between the
rename and the reopen lands in the rotated file, which ``delaycompress``
leaves uncompressed until the next rotation.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path
from typing import Any, Final, TextIO

__all__ = ["SECURITY_LOGGER", "JsonFormatter", "configure_logging"]

#: The security log's logger name.
SECURITY_LOGGER: Final = "agent_guardian.security"
#: A new log file's mode: the owner writes, its group (the security team) reads.
_LOG_FILE_MODE: Final = 0o640
#: How long lines keep going to a renamed log file before the handler creates the path itself.
_RECREATE_AFTER_S: Final = 5.0

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line: time, level, logger, message, and the record's extra fields."""
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _LogFile(logging.handlers.WatchedFileHandler):
    """A JSON-lines file reopened after rotation; a file it creates is 0640, whatever the umask."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), encoding="utf-8")
        self._missing_since: float | None = None

    def reopenIfNeeded(self) -> None:
        """Reopen when the path names another file; wait a few seconds for logrotate to create it.

        Between logrotate's rename and its create the path is missing. Creating it first
        would make logrotate move ours aside (NAME-YYYYMMDDHH.backup), so while the open
        file still exists under its new name, lines keep going there for up to
        _RECREATE_AFTER_S. The path is stat'ed once: were it stat'ed again before the
        reopen, a rename in between would have the handler create the path at once.
        """
        try:
            named = os.stat(self.baseFilename)
        except FileNotFoundError:
            named = None
        if named is not None and (named.st_dev, named.st_ino) == (self.dev, self.ino):
            self._missing_since = None
            return
        if named is None and self.stream is not None and os.fstat(self.stream.fileno()).st_nlink > 0:
            now = time.monotonic()
            if self._missing_since is None:
                self._missing_since = now
            if now - self._missing_since < _RECREATE_AFTER_S:
                return
        self._missing_since = None
        if self.stream is not None:
            self.stream.flush()
            self.stream.close()
            self.stream = None  # as the standard library does: _open may fail
        self.stream = self._open()
        self._statstream()

    def _open(self) -> io.TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.baseFilename, flags | os.O_CREAT | os.O_EXCL, _LOG_FILE_MODE)
            os.fchmod(fd, _LOG_FILE_MODE)
        except FileExistsError:
            fd = os.open(self.baseFilename, flags)
        return io.TextIOWrapper(io.FileIO(fd, "a"), encoding="utf-8", write_through=True)


def configure_logging(
    level: str,
    stream: TextIO | None = None,
    *,
    log_file: Path | None = None,
    security_file: Path | None = None,
) -> None:
    """Send every log record as a JSON line to log_file, or to stream (stderr by default).

    With security_file, the security log goes there alone; without it, it goes
    wherever the main log goes.
    """
    formatter = JsonFormatter()
    handler: logging.Handler = _LogFile(log_file) if log_file else logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
        existing.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    security = logging.getLogger(SECURITY_LOGGER)
    for existing in list(security.handlers):
        security.removeHandler(existing)
        existing.close()
    security.propagate = security_file is None
    if security_file is not None:
        security_handler = _LogFile(security_file)
        security_handler.setFormatter(formatter)
        security.addHandler(security_handler)
