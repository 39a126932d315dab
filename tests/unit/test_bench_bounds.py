"""The bench's bounds: what the same run's floors allow a target, and when that puts it out of reach.

The figures here are made up (a report is data); what is checked is the arithmetic
and which floors each bound reads, so that a bound printed beside a real run means
what its text says.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from bench.load import Measurement
from bench.report import GRPC_FLOOR, GRPC_MODEL_FLOOR, MCP_FLOOR, Figure, Floor, Report, Target, evaluate_targets


def rate(ops_per_s: float, clients: int = 1) -> Measurement:
    """ops_per_s over one second."""
    return Measurement(
        clients=clients, ops=round(ops_per_s), errors=0, seconds=1.0, p50_ms=1, p99_ms=1, mean_ms=1, max_ms=1
    )


def report_with(floors: list[Floor], figures: list[Figure]) -> Report:
    report = Report(options={}, workload={}, run_id="t", temp_root="/nonexistent")
    report.floors += floors
    report.figures += figures
    return report


def target(targets: list[Target], prefix: str) -> Target:
    found = [t for t in targets if t.name.startswith(prefix)]
    assert len(found) == 1, [t.name for t in targets]
    return found[0]


def test_guardian_cpu_per_store_is_bounded_by_the_cheapest_server_plus_the_bare_insert() -> None:
    size = 100_000
    grpc = Floor(GRPC_FLOOR, "grpc", size, rate(2000), {"server": 0.31, "client": 0.23})
    insert = Floor("sqlcipher-insert", "sqlcipher", size, rate(2500), {"client": 0.36})
    store = Figure("store", "grpc", size, rate(500), grpc, insert, size, cpu_ms_per_op={"guardian": 1.8})
    found = target(evaluate_targets(report_with([grpc, insert], [store])), "guardian CPU per store at 100k")
    assert found.measured == 1.8 and found.met is False
    assert found.bound == pytest.approx(0.67)
    assert found.out_of_reach  # 0.67 ms > 0.5 ms: no guardian on this stack gets there
    assert "0.310" in found.bound_detail and "0.360" in found.bound_detail
    assert found.to_json()["out_of_reach"] is True


def test_stores_at_16_clients_are_bounded_by_the_guardian_server_model_doing_nothing() -> None:
    size = 1000
    sync = Floor(GRPC_FLOOR, "grpc", size, rate(4600, 16), {"server": 0.3})
    model = Floor(GRPC_MODEL_FLOOR, "grpc", size, rate(1700, 16), {"server": 0.6})
    stores = Figure("store", "grpc", size, rate(600, 16), sync, None, size)
    targets = evaluate_targets(report_with([sync, model], [stores]))
    found = target(targets, f"16 concurrent direct gRPC stores at {size}")
    assert found.bound == pytest.approx(1700 / 4600)
    assert found.out_of_reach  # 0.37 < 0.4
    issue5 = target(targets, f"direct gRPC store, 16 clients, at {size}")
    assert issue5.bound == pytest.approx(1700 / 4600) and issue5.out_of_reach


def test_a_search_through_the_gateway_is_bounded_by_its_floor_and_its_query_embedding() -> None:
    size = 100_000
    floor = Floor(MCP_FLOOR, "stdio", size, rate(500), {"server": 1.4, "client": 0.4})
    fts = Floor("sqlcipher-fts", "sqlcipher", size, rate(2000), {"client": 0.5})
    search = Figure(
        "search_common",
        "stdio",
        size,
        rate(80),
        floor,
        fts,
        size,
        cpu_ms_per_op={"guardian": 5.0, "embedder": 2.0, "gateway": 3.0, "client": 3.4},
    )
    name = "search for words every memory holds, via gateway stdio, 1 client, at 100000:"
    found = target(evaluate_targets(report_with([floor, fts], [search])), name)
    # The floor's call takes 2 ms and the query's embedding 2 more: 2 / (2 + 2). The bare SQL ranking is not
    # counted (the guardian's ranking may cost less), nor the client's or the gateway's work.
    assert found.bound == pytest.approx(0.5)
    assert not found.out_of_reach  # exactly the threshold: reachable in principle
    assert found.bound_detail == "mcp+grpc-noop 2.00 ms a call + CPU ms embedder 2.00"
    slower = replace(search, cpu_ms_per_op={**search.cpu_ms_per_op, "embedder": 2.2})
    worse = target(evaluate_targets(report_with([floor, fts], [slower])), name)
    assert worse.bound is not None and worse.bound < 0.5 and worse.out_of_reach


def test_a_bound_that_does_not_miss_the_target_says_so_and_a_missing_floor_gives_none() -> None:
    size = 1000
    floor = Floor(MCP_FLOOR, "stdio", size, rate(500), {"server": 1.4, "client": 0.4})
    insert = Floor("sqlcipher-insert", "sqlcipher", size, rate(3000), {"client": 0.2})
    store = Figure("store", "stdio", size, rate(200), floor, insert, size, cpu_ms_per_op={"client": 0.5})
    found = target(evaluate_targets(report_with([floor, insert], [store])), "store via gateway stdio")
    assert found.bound == pytest.approx(2 / (2 + 0.2))
    assert not found.out_of_reach and found.met is False  # missed, but not by the floors

    without_insert = target(evaluate_targets(report_with([floor], [store])), "store via gateway stdio")
    assert without_insert.bound is None and not without_insert.out_of_reach
    concurrent = Figure("store", "stdio", size, rate(200, 16), floor, insert, size, cpu_ms_per_op={"client": 0.5})
    # A bound of serial calls says nothing of 16 clients at once.
    assert all(t.bound is None for t in evaluate_targets(report_with([floor, insert], [concurrent])))
