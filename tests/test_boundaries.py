"""The privilege boundary is a package boundary: check the imports on each side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.harness import ROOT

FORBIDDEN = {
    "guardian": {"gateway", "mcp", "starlette", "uvicorn", "httpx"},
    "gateway": {"guardian", "sqlcipher3", "yaml"},
    "shared": {"guardian", "gateway", "mcp", "sqlcipher3"},
}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_on_its_side(package: str) -> None:
    files = [p for p in (ROOT / package).rglob("*.py") if "rpc" not in p.relative_to(ROOT / package).parts]
    assert files
    offenders = {str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package]) for path in files}
    assert not {path: names for path, names in offenders.items() if names}
