"""A file that must be exactly the one its sha256 names: read once, checked, and the checked bytes used.

The embedding models (guardian/recall/model.py, embedder/model_files.py) are
loaded from the bytes this returns, never from a second read that could be
swapped under the check.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.errors import ConfigError

__all__ = ["read_pinned"]


def read_pinned(path: Path, sha256: str, what: str) -> bytes:
    """path's bytes if their sha256 is sha256; ConfigError naming the file and both digests otherwise."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"embedding: cannot read the {what} file {path}: {error.strerror}") from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256.lower():
        raise ConfigError(
            f"embedding: the {what} file {path} has sha256 {found}, not the {sha256} it must have;"
            " a model that cannot be vouched for is not loaded"
        )
    return data
