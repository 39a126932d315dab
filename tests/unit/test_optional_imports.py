"""What a process loads only when its config asks for it: the OpenTelemetry SDK and exporter (spans
exported, shared/otlp.py) and PyJWT (OAuth access tokens, guardian/access/oauth.py). Each is a few
MiB of resident memory in every guardian and gateway that does not use it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.harness import ROOT

OPTIONAL = ("jwt", "opentelemetry.sdk", "opentelemetry.exporter")


def loaded_after_import(module: str) -> list[str]:
    """The OPTIONAL modules in sys.modules once a fresh interpreter has imported module."""
    script = f"import json, sys, {module}; print(json.dumps([m for m in {OPTIONAL!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded: list[str] = json.loads(done.stdout)
    return loaded


@pytest.mark.parametrize("module", ["guardian.daemon.main", "gateway.cli"])
def test_a_process_that_neither_exports_spans_nor_verifies_oauth_loads_neither(module: str) -> None:
    assert loaded_after_import(module) == []


def test_exporting_spans_loads_the_sdk() -> None:
    script = (
        "import sys; from shared import otlp; stop = otlp.export_spans('test', 'http://127.0.0.1:9/v1/traces'); "
        "print('opentelemetry.sdk' in sys.modules, otlp.exporting()); stop()"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]
