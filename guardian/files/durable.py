"""Writing the guardian's own files durably: fsync a file and its directory, replace a file atomically.

A file the guardian writes (the audit head, the rotated keys, a backup) is written to a
temporary name, fsynced, renamed over the old one and its directory fsynced, so after a
crash it is either the old file or the new one, whole, never a torn mix.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "replace_atomically"]


def fsync_file(path: Path) -> None:
    """Flush path's data to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush the directory at path (the names in it: a rename is durable once this returns)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Make path hold text (created with mode), via a temporary file, fsync, rename and a directory fsync."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)
