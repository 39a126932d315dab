"""The benchmark's smoke run: ``python -m bench --quick`` runs, writes a complete JSON and leaves nothing behind.

The figures are not asserted (they depend on the machine); what is checked is
that every operation was measured through every transport at every
concurrency, beside its floors, that the stored-and-audited check held, and
that every process the bench started has ended and its temp dir is gone.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.clients import OPERATIONS
from bench.procs import RUN_ENV

ROOT = Path(__file__).resolve().parents[2]


def processes_of_run(run: str) -> list[int]:
    """PIDs whose environment carries this run's id (every process the bench starts inherits it)."""
    needle = f"{RUN_ENV}={run}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def test_quick_bench_writes_every_figure_and_leaves_nothing_running(tmp_path: Path) -> None:
    run = "smoke-" + secrets.token_hex(6)
    out = tmp_path / "bench.json"
    env = {**os.environ, RUN_ENV: run}
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
            cwd=ROOT,
            env=env,
            check=False,
            capture_output=True,
            text=True,
            timeout=150,
        )
    finally:
        leftovers = processes_of_run(run)
        for pid in leftovers:  # never leave them to the next test, even when failing
            os.kill(pid, signal.SIGKILL)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert not leftovers, f"the bench left processes running: {leftovers}"
    assert elapsed < 60, f"the smoke run took {elapsed:.0f} s"

    data = json.loads(out.read_text())
    assert data["run_id"] == run
    assert not Path(data["temp_root"]).exists(), "the bench left its temp dir"
    assert data["started_at"] and data["finished_at"]
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["python"]
    assert not data["problems"]

    options = data["options"]
    transports, clients, sizes = options["transports"], options["clients"], options["sizes"]
    assert set(transports) == {"grpc", "stdio", "http"}
    measured = {(r["operation"], r["transport"], r["clients"], r["size"]) for r in data["results"]}
    expected = {(o, t, c, s) for o in OPERATIONS for t in transports for c in clients for s in sizes}
    assert measured == expected
    for result_entry in data["results"]:
        assert result_entry["ops"] > 0 and result_entry["errors"] == 0, result_entry
        expected_floor = "grpc-noop" if result_entry["transport"] == "grpc" else "mcp+grpc-noop"
        assert result_entry["floor"] == expected_floor and result_entry["ratio"] is not None
        assert result_entry["db_floor"].startswith("sqlcipher-") and result_entry["db_ratio"] is not None

    floors = {(f["name"], f["transport"], f["clients"], f["size"]) for f in data["floors"]}
    for size in sizes:
        for count in clients:
            assert ("grpc-noop", "grpc", count, size) in floors
            assert ("grpc-aio-noop", "grpc", count, size) in floors
            assert ("mcp+grpc-noop", "stdio", count, size) in floors
            assert ("mcp+grpc-noop", "http", count, size) in floors
        for name in ("insert", "insert_batch", "get", "fts", "list"):
            assert (f"sqlcipher-{name}", "sqlcipher", 1, size) in floors

    assert [check["size"] for check in data["checks"]] == sizes
    assert all(check["ok"] for check in data["checks"]), data["checks"]
    for entry in data["peak_rss"]:
        assert entry["kib"]["guardian"] > 0 and entry["kib"]["gateway_stdio"] > 0 and entry["kib"]["gateway_http"] > 0
    assert data["targets"] and all({"target", "measured", "threshold", "met"} <= set(t) for t in data["targets"])
    # The stdio store's bound comes from this run's floors (MCP no-op, bare insert); the embedder's CPU is metered.
    bounded = {t["target"].split(":")[0]: t for t in data["targets"] if t["bound"] is not None}
    for size in sizes:
        assert 0 < bounded[f"store via gateway stdio, 1 client, at {size}"]["bound"] <= 1
    for entry in data["results"]:
        assert {"guardian", "embedder", "client"} <= set(entry["cpu_ms_per_op"]), entry


def test_a_short_soak_reports_memory_and_descriptors_and_leaves_nothing_running(tmp_path: Path) -> None:
    run = "soak-" + secrets.token_hex(6)
    out = tmp_path / "soak.json"
    env = {**os.environ, RUN_ENV: run}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "bench.soak", "--duration", "3", "--sample", "1", "--json", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        for pid in processes_of_run(run):
            os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["calls"] > 0 and report["failed"] == 0
    assert set(report["processes"]) == {"guardian", "gateway"}
    for row in report["processes"].values():
        assert row["rss_mb_start"] > 0 and row["fds_end"] > 0 and row["alive_at_end"]
    assert "RSS start" in result.stdout and not processes_of_run(run)


def test_the_filter_cost_bench_measures_every_pathological_rule_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import filter_cost

    assert filter_cost.main(["--repeat", "2", "--regex-timeout", "0.01"]) == 0
    printed = capsys.readouterr().out
    for rule in filter_cost.PATHOLOGICAL:
        rows = [line for line in printed.splitlines() if line.startswith(rule.name)]
        assert [row.split()[2] for row in rows] == ["spoiled", "matches"], printed
    assert "worst ratio" in printed
