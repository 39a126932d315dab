"""Regenerate the Python protobuf and gRPC stubs in shared/rpc/ from proto/ (`make stubs`).

The proto files are mapped under the virtual path ``shared/rpc`` so the
generated imports read ``from shared.rpc.guardian.v1 import ...``: the proto
package stays ``guardian.v1`` on the wire, and nothing collides with the
``guardian`` Python package. Only the packages in GRPC_SERVICES get gRPC
stubs; the embedder's messages travel in frames on a plain Unix socket
(shared/embedding.py), so it gets the messages alone. tests/unit/test_stubs.py
regenerates into a temporary directory and fails when the committed stubs differ.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
STUB_PACKAGE = Path("shared/rpc")
#: The proto packages under proto/, one directory each in STUB_PACKAGE.
SERVICES = ("guardian", "embedder")
#: Those of them that define gRPC services (the others are messages only).
GRPC_SERVICES = frozenset({"guardian"})


def proto_files(service: str) -> list[Path]:
    """Every .proto of one package under proto/, in a stable order."""
    return sorted((PROTO_DIR / service).rglob("*.proto"))


def generate(out_dir: Path) -> None:
    """Write the stubs for every proto file into out_dir/shared/rpc/..."""
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for service in SERVICES:
        grpc_outputs = [f"--grpc_python_out={out_dir}", f"--mypy_grpc_out={out_dir}"]
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{STUB_PACKAGE}={PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--mypy_out={out_dir}",
            *(grpc_outputs if service in GRPC_SERVICES else []),
            *(str(path) for path in proto_files(service)),
        ]
        result = subprocess.run(command, check=False, env=env, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"protoc failed on proto/{service}:\n{result.stderr}")
    package = out_dir / STUB_PACKAGE
    for directory in [package, *(p for p in package.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()


def main() -> None:
    """Regenerate the committed stubs in place."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    for service in SERVICES:
        target = ROOT / STUB_PACKAGE / service
        if target.exists():
            shutil.rmtree(target)
    generate(ROOT)
    print(f"stubs written to {STUB_PACKAGE}/{{{','.join(SERVICES)}}}")


if __name__ == "__main__":
    main()
