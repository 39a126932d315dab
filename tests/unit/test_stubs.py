"""The committed protobuf and gRPC stubs are exactly what `make stubs` generates from proto/."""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

import pytest

from tests.support.harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gen_stubs


@pytest.mark.parametrize("service", gen_stubs.SERVICES)
def test_committed_stubs_match_the_protos(tmp_path: Path, service: str) -> None:
    gen_stubs.generate(tmp_path)
    fresh = tmp_path / "shared" / "rpc" / service
    committed = ROOT / "shared" / "rpc" / service
    names = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file())
    assert names == sorted(
        p.relative_to(committed).as_posix()
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    stale = [name for name in names if not filecmp.cmp(fresh / name, committed / name, shallow=False)]
    assert not stale, f"stubs are stale; run `make stubs`: {stale}"
