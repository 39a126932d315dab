"""The gateway's import boundary and public surface."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import gateway

GATEWAY_DIR = Path(__file__).resolve().parent.parent / "gateway"
MODULES = sorted(GATEWAY_DIR.glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_there_are_gateway_modules() -> None:
    assert {p.name for p in MODULES} >= {
        "__init__.py",
        "client.py",
        "sessions.py",
        "tools.py",
        "http_auth.py",
        "cli.py",
    }


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_gateway_module_imports_guardian(path: Path) -> None:
    assert not {name for name in imported_modules(path) if name.split(".")[0] == "guardian"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_only_the_client_touches_grpc_and_the_stubs(path: Path) -> None:
    if path.name == "client.py":
        return
    grpc_names = {n for n in imported_modules(path) if n.split(".")[0] == "grpc" or n.startswith("shared.rpc")}
    assert not grpc_names


def test_no_relative_imports_hide_from_the_checks() -> None:
    for path in MODULES:
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], path.name


def test_public_surface_is_exactly_all() -> None:
    assert sorted(gateway.__all__) == [
        "BearerAuth",
        "GatewayState",
        "GuardianClient",
        "Limits",
        "Memory",
        "MemoryDraft",
        "Page",
        "SearchHit",
        "SessionBroker",
        "SessionInfo",
        "build_http_app",
        "build_server",
        "mcp_outcome",
        "open_gateway",
    ]
    public = {name for name in vars(gateway) if not name.startswith("_")}
    submodules = {p.stem for p in MODULES}
    assert public - submodules == set(gateway.__all__)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_module_documents_itself_and_declares_all(path: Path) -> None:
    module = importlib.import_module("gateway" if path.stem == "__init__" else f"gateway.{path.stem}")
    assert module.__doc__
    assert isinstance(module.__all__, list)
    for name in module.__all__:
        item = getattr(module, name)
        if callable(item):
            assert item.__doc__, f"{module.__name__}.{name} has no docstring"
