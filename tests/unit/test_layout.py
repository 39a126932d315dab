"""The guardian's house: packages whose names say the architecture, imports that only run down the layers.

A package may import only from packages below it in :data:`LAYERS` (or from itself), so there is no
cycle between packages and no import runs back up; ``ctl`` (the admin CLI, a separate program) sits on
top of everything. This test reads the imports from the source, as a reviewer drawing the graph would.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUARDIAN = ROOT / "guardian"

#: Lowest first: each package may import the ones before it.
LAYERS = ("files", "keys", "recall", "store", "access", "checks", "policy", "state", "service", "daemon", "ctl")
MAX_MODULES = 12


def guardian_imports(path: Path) -> set[str]:
    """The guardian packages a module imports (``guardian.store.audit`` -> ``store``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "guardian" else [f"guardian.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {name.split(".")[1] for name in names if name.startswith("guardian.")}
    return found


def test_guardian_is_packages_only() -> None:
    modules = sorted(path.name for path in GUARDIAN.glob("*.py"))
    assert modules == ["__init__.py"]
    packages = sorted(path.name for path in GUARDIAN.iterdir() if (path / "__init__.py").exists())
    assert packages == sorted(LAYERS)


@pytest.mark.parametrize("package", LAYERS)
def test_a_package_is_small_says_what_lives_there_and_imports_only_below_itself(package: str) -> None:
    folder = GUARDIAN / package
    modules = [path for path in folder.glob("*.py") if path.name != "__init__.py"]
    assert 0 < len(modules) <= MAX_MODULES
    docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
    assert docstring and len(docstring.splitlines()) <= 2
    allowed = set(LAYERS[: LAYERS.index(package) + 1])
    for module in modules:
        upward = guardian_imports(module) - allowed
        assert not upward, f"guardian/{package}/{module.name} imports {sorted(upward)} from above its layer"


def test_the_gateway_and_shared_import_nothing_of_the_guardian() -> None:
    for folder in ("gateway", "shared"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not guardian_imports(path), path
