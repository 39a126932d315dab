"""The privilege boundary is a package boundary: check the imports on each side, and the
gateway's own rules (only its client touches gRPC; its public surface is exactly ``__all__``)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import gateway
from tests.support.harness import ROOT

FORBIDDEN = {
    "guardian": {"gateway", "embedder", "mcp", "starlette", "uvicorn", "httpx", "onnx", "onnxruntime"},
    "gateway": {"guardian", "embedder", "sqlcipher3", "yaml", "onnx", "onnxruntime"},
    "shared": {"guardian", "gateway", "embedder", "mcp", "sqlcipher3", "onnx", "onnxruntime"},
    # The embedder parses agent text with a model: it must hold no key and reach no data. It speaks
    # frames on a plain socket (shared/embedding.py), so no gRPC core is loaded in its sandbox either.
    "embedder": {"guardian", "gateway", "sqlcipher3", "cryptography", "yaml", "mcp", "starlette", "uvicorn", "grpc"},
}


GATEWAY_MODULES = sorted((ROOT / "gateway").glob("*.py"))


def imported_names(path: Path) -> set[str]:
    """Every absolute module a file imports, as written (``grpc.aio``, ``shared.rpc.guardian.v1``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def imported_roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_names(path)}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_on_its_side(package: str) -> None:
    files = [p for p in (ROOT / package).rglob("*.py") if "rpc" not in p.relative_to(ROOT / package).parts]
    assert files
    offenders = {str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package]) for path in files}
    assert not {path: names for path, names in offenders.items() if names}


def names_imported_from(path: Path, module: str) -> set[str]:
    """The names a file imports from module (``from module import name``)."""
    return {
        alias.name
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.ImportFrom) and node.module == module and node.level == 0
        for alias in node.names
    }


def test_only_the_guardians_embedder_client_and_the_embedder_speak_to_the_embedder() -> None:
    """Speaking to it takes its messages (shared.rpc.embedder) or its frames (shared.embedding's reader and writer)."""
    frames = {"read_frame", "write_frame"}
    speakers = {
        package: {
            str(path.relative_to(ROOT))
            for path in (ROOT / package).rglob("*.py")
            if "rpc" not in path.relative_to(ROOT).parts
            and (
                any(name.startswith("shared.rpc.embedder") for name in imported_names(path))
                or names_imported_from(path, "shared.embedding") & frames
            )
        }
        for package in ("guardian", "gateway", "shared", "embedder")
    }
    assert speakers == {
        "guardian": {"guardian/recall/remote.py"},
        "gateway": set(),
        "shared": set(),
        "embedder": {"embedder/server.py"},
    }


@pytest.mark.parametrize("path", GATEWAY_MODULES, ids=lambda p: p.name)
def test_only_the_client_touches_grpc_and_the_stubs(path: Path) -> None:
    if path.name == "client.py":
        return
    grpc_names = {n for n in imported_names(path) if n.split(".")[0] == "grpc" or n.startswith("shared.rpc")}
    assert not grpc_names


def test_no_relative_imports_hide_from_the_checks() -> None:
    for path in GATEWAY_MODULES:
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
    submodules = {p.stem for p in GATEWAY_MODULES}
    assert public - submodules == set(gateway.__all__)


@pytest.mark.parametrize("path", GATEWAY_MODULES, ids=lambda p: p.name)
def test_every_module_documents_itself_and_declares_all(path: Path) -> None:
    module = importlib.import_module("gateway" if path.stem == "__init__" else f"gateway.{path.stem}")
    assert module.__doc__
    assert isinstance(module.__all__, list)
    for name in module.__all__:
        item = getattr(module, name)
        if callable(item):
            assert item.__doc__, f"{module.__name__}.{name} has no docstring"
