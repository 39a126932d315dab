"""Create the project's virtualenv, even where the system Python lacks ensurepip.

Debian's python3 ships the venv module but not ensurepip unless python3-venv
is installed; then the venv is made without pip and pip is installed into
it from its wheel on PyPI (a wheel of pip can run itself).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import venv
from pathlib import Path

PYPI_PIP = "https://pypi.org/pypi/pip/json"


def _install_pip(python: Path) -> None:
    with urllib.request.urlopen(PYPI_PIP, timeout=60) as response:
        release = json.load(response)
    wheel = next(item for item in release["urls"] if item["filename"].endswith("-py3-none-any.whl"))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / wheel["filename"]
        wheel_url = urllib.parse.urljoin(PYPI_PIP, wheel["url"])  # some mirrors answer with relative URLs
        with urllib.request.urlopen(wheel_url, timeout=120) as response:  # noqa: S310
            target.write_bytes(response.read())
        subprocess.run([str(python), f"{target}/pip", "install", "-q", "--no-index", str(target)], check=True)


def main() -> None:
    """bootstrap_venv.py DIR: make DIR a virtualenv with pip."""
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".venv")
    python = target / "bin" / "python"
    probe = [str(python), "-m", "pip", "--version"]
    if python.exists() and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return
    try:
        if importlib.util.find_spec("ensurepip") is None:
            raise ImportError("ensurepip is missing")
        venv.EnvBuilder(with_pip=True, clear=True).create(target)
    except (ImportError, subprocess.CalledProcessError):
        shutil.rmtree(target, ignore_errors=True)
        venv.EnvBuilder(with_pip=False, clear=True).create(target)
        _install_pip(python)


if __name__ == "__main__":
    main()
