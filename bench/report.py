"""What a run found: the figures beside their floors, the targets of issues 5, 15 and 19, the JSON.

Every figure names the floor it is divided by, measured in the same run:

- ``mcp+grpc-noop``: an MCP tool on the same SDK and transport that makes one no-op
  gRPC call over a Unix socket to another process (bench/noop_server.py), the floor
  this design imposes; same client code and number of clients (for ``stdio`` and
  ``http`` figures);
- ``grpc-noop``: the no-op unary call on the same kind of socket, same client
  library and number of clients, served by grpcio's synchronous server, the
  cheapest a Python process has (for ``grpc`` figures);
- ``grpc-aio-noop``: the same no-op in the guardian's own server model
  (bench/noop_grpc.py); no figure is divided by it, it bounds them;
- ``sqlcipher-*``: the bare SQLCipher statement of the operation on a table of
  the same size, one caller (beside every figure, as a second ratio).

ratio = figure ops/s / floor ops/s: 1.0 would mean the operation costs nothing
beyond its floor.

Some targets also get a *bound* from the same run's floors: the best figure
anything built on this stack could reach here (e.g. the guardian's CPU per store
is at least what grpcio's cheapest server spends on a call plus what the bare
durable insert costs). A target past its bound cannot be met on this stack;
the bound says which floors it adds up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from bench.load import Measurement

__all__ = [
    "GRPC_FLOOR",
    "GRPC_MODEL_FLOOR",
    "MCP_FLOOR",
    "Figure",
    "Floor",
    "Report",
    "Target",
    "evaluate_targets",
    "measure_and_print",
]

#: The gRPC figures' floor: a no-op on grpcio's synchronous server (bench/noop_grpc.py, model sync).
GRPC_FLOOR: Final = "grpc-noop"
#: The same no-op in the guardian's server model (bench/noop_grpc.py, model guardian).
GRPC_MODEL_FLOOR: Final = "grpc-aio-noop"
#: The stdio and HTTP figures' floor: an MCP no-op tool that makes one no-op gRPC call (bench/noop_server.py).
MCP_FLOOR: Final = "mcp+grpc-noop"

ONE_K: Final = 1_000
HUNDRED_K: Final = 100_000
ONE_M: Final = 1_000_000
_RSS_LIMIT_MB: Final = 150.0


@dataclass(frozen=True)
class Floor:
    """A floor measurement: what the same client gets from a server that does nothing (or bare SQL)."""

    name: str
    transport: str
    size: int
    measurement: Measurement
    #: CPU ms per call of the floor's server ("server") and of the bench's clients ("client").
    cpu_ms_per_op: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "transport": self.transport,
            "size": self.size,
            **self.measurement.to_json(),
            "cpu_ms_per_op": self.cpu_ms_per_op,
        }


@dataclass(frozen=True)
class Figure:
    """One operation through one transport at one concurrency and size, beside its floors."""

    operation: str
    transport: str
    size: int
    measurement: Measurement
    floor: Floor | None
    db_floor: Floor | None
    #: Memories the table held (all namespaces) when the measurement began.
    table_rows: int
    memories_per_call: int = 1
    #: CPU ms per call of the guardian, the gateway process(es) and the bench's clients.
    cpu_ms_per_op: dict[str, float] = field(default_factory=dict)
    #: With --profile: the guardian's CPU µs per call by pipeline stage (bench/stage_profile.py).
    stages_us: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """ops/s over the transport floor's ops/s."""
        return _ratio(self.measurement, self.floor)

    @property
    def db_ratio(self) -> float | None:
        """ops/s over the SQLCipher floor's ops/s."""
        return _ratio(self.measurement, self.db_floor)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "operation": self.operation,
            "transport": self.transport,
            "size": self.size,
            "table_rows_at_start": self.table_rows,
            "memories_per_call": self.memories_per_call,
            **self.measurement.to_json(),
            "floor": None if self.floor is None else self.floor.name,
            "floor_ops_per_s": None if self.floor is None else round(self.floor.measurement.ops_per_s, 2),
            "ratio": _rounded(self.ratio),
            "db_floor": None if self.db_floor is None else self.db_floor.name,
            "db_floor_ops_per_s": None if self.db_floor is None else round(self.db_floor.measurement.ops_per_s, 2),
            "db_ratio": _rounded(self.db_ratio),
            "cpu_ms_per_op": self.cpu_ms_per_op,
            **({"guardian_cpu_us_by_stage": self.stages_us} if self.stages_us else {}),
        }


def _ratio(measurement: Measurement, floor: Floor | None) -> float | None:
    if floor is None or floor.measurement.ops_per_s <= 0:
        return None
    return measurement.ops_per_s / floor.measurement.ops_per_s


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


@dataclass(frozen=True)
class Target:
    """One target of issue 5, evaluated: met is None when the run did not measure it."""

    name: str
    measured: float | None
    threshold: float
    comparison: str
    met: bool | None
    detail: str
    #: The best value this run's floors allow on this stack (None: no bound), and the floors it adds up.
    bound: float | None = None
    bound_detail: str = ""

    @property
    def out_of_reach(self) -> bool:
        """Whether the bound itself misses the threshold: no code on this stack could meet it here."""
        if self.bound is None:
            return False
        return self.bound < self.threshold if self.comparison == ">=" else self.bound > self.threshold

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "target": self.name,
            "measured": _rounded(self.measured),
            "comparison": self.comparison,
            "threshold": self.threshold,
            "met": self.met,
            "detail": self.detail,
            "bound": _rounded(self.bound),
            "bound_detail": self.bound_detail,
            "out_of_reach": self.out_of_reach,
        }


def _target(name: str, measured: float | None, comparison: str, threshold: float, detail: str) -> Target:
    if measured is None:
        return Target(name, None, threshold, comparison, None, f"not measured in this run ({detail})")
    met = measured >= threshold if comparison == ">=" else measured <= threshold
    return Target(name, measured, threshold, comparison, met, detail)


@dataclass
class Report:
    """Everything one run measured."""

    options: dict[str, Any]
    workload: dict[str, Any]
    run_id: str
    temp_root: str
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    finished_at: str = ""
    figures: list[Figure] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)
    #: Per size: peak RSS (KiB) of the guardian and of each kind of gateway process.
    rss: list[dict[str, Any]] = field(default_factory=list)
    prefills: list[dict[str, Any]] = field(default_factory=list)
    #: Per size: acknowledged writes against stored rows and audit rows.
    checks: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Per size: EXPLAIN QUERY PLAN of the search floor and of the guardian's search SQL.
    query_plans: list[dict[str, Any]] = field(default_factory=list)
    #: Recall quality on the eval set, per search mode (bench/recall_eval/quality.py); None: not measured.
    recall: dict[str, Any] | None = None

    def figure(self, operation: str, transport: str, clients: int, size: int) -> Figure | None:
        """The figure measured for these, if any."""
        for figure in self.figures:
            if (figure.operation, figure.transport, figure.measurement.clients, figure.size) == (
                operation,
                transport,
                clients,
                size,
            ):
                return figure
        return None

    def floor(self, name: str, transport: str, clients: int, size: int) -> Floor | None:
        """The floor measured for these, if any."""
        for floor in self.floors:
            if (floor.name, floor.transport, floor.measurement.clients, floor.size) == (name, transport, clients, size):
                return floor
        return None

    def to_json(self, targets: list[Target]) -> dict[str, Any]:
        """The whole run, JSON-ready."""
        return {
            "schema": 1,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "machine": machine_info(),
            "options": self.options,
            "workload": self.workload,
            "temp_root": self.temp_root,
            "prefills": self.prefills,
            "floors": [floor.to_json() for floor in self.floors],
            "results": [figure.to_json() for figure in self.figures],
            "peak_rss": self.rss,
            "checks": self.checks,
            "query_plans": self.query_plans,
            "recall": self.recall,
            "targets": [target.to_json() for target in targets],
            "problems": self.problems,
        }

    def write_json(self, path: Path, targets: list[Target]) -> None:
        """Write the JSON file (creating its directory)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(targets), indent=2) + "\n")

    def table(self) -> str:
        """The figures as a fixed-width table, then the floors."""
        head = (
            f"{'operation':<12} {'transport':<9} {'clients':>7} {'size':>8} {'ops/s':>9} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'floor':<9} {'floor/s':>9} {'ratio':>6} {'db floor':<22} {'db/s':>9} {'db ratio':>8} "
            f"{'cpu ms/op guardian/embedder/gateway/client'}"
        )
        lines = [head, "-" * len(head)]
        for figure in sorted(self.figures, key=_figure_order):
            m = figure.measurement
            lines.append(
                f"{figure.operation:<12} {figure.transport:<9} {m.clients:>7} {figure.size:>8} {m.ops_per_s:>9.1f} "
                f"{m.p50_ms:>8.2f} {m.p99_ms:>8.2f} {_floor_name(figure.floor):<9} {_floor_rate(figure.floor):>9} "
                f"{_fmt(figure.ratio):>6} {_floor_name(figure.db_floor):<22} {_floor_rate(figure.db_floor):>9} "
                f"{_fmt(figure.db_ratio):>8} {_cpu(figure.cpu_ms_per_op, _PROCESSES)}"
                + (f"  ({m.errors} errors)" if m.errors else "")
            )
        lines += ["", "floors (same run):", f"{'floor':<26} {'transport':<9} {'clients':>7} {'size':>8} "
                  f"{'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} cpu ms/op server/client"]  # fmt: skip
        for floor in self.floors:
            m = floor.measurement
            lines.append(
                f"{floor.name:<26} {floor.transport:<9} {m.clients:>7} {floor.size:>8} {m.ops_per_s:>9.1f} "
                f"{m.p50_ms:>8.2f} {m.p99_ms:>8.2f} {_cpu(floor.cpu_ms_per_op, ('server', 'client'))}"
            )
        lines += _stage_lines(self.figures)
        lines += ["", "peak RSS (VmHWM):"]
        for entry in self.rss:
            parts = ", ".join(f"{name} {kib / 1000 * 1.024:.1f} MB" for name, kib in entry["kib"].items() if kib)
            lines.append(f"  size {entry['size']}: {parts}")
        return "\n".join(lines)


#: The processes whose CPU a figure's table row shows, in its order.
_PROCESSES: Final = ("guardian", "embedder", "gateway", "client")


def _stage_lines(figures: list[Figure]) -> list[str]:
    """With --profile: each figure's guardian CPU per call by stage, and what no stage covers (gRPC, the rest)."""
    profiled = [figure for figure in sorted(figures, key=_figure_order) if figure.stages_us]
    if not profiled:
        return []
    lines = ["", "guardian CPU per call by pipeline stage, us (--profile; other = the process's CPU less the stages):"]
    for figure in profiled:
        total_us = figure.cpu_ms_per_op.get("guardian", 0.0) * 1000
        stages = dict(figure.stages_us)
        stages["other"] = round(max(0.0, total_us - sum(stages.values())), 1)
        parts = "  ".join(f"{stage} {us:.0f}" for stage, us in stages.items())
        lines.append(
            f"  {figure.operation:<12} {figure.transport:<5} x{figure.measurement.clients:<3} {figure.size:>8}: "
            f"total {total_us:.0f} = {parts}"
        )
    return lines


_TRANSPORT_ORDER: Final = {"grpc": 0, "stdio": 1, "http": 2}
_OPERATION_ORDER: Final = {"store": 0, "store_batch": 1, "get": 2, "search": 3, "search_common": 4, "list": 5}


def _figure_order(figure: Figure) -> tuple[int, int, int, int]:
    return (
        figure.size,
        _OPERATION_ORDER.get(figure.operation, 9),
        _TRANSPORT_ORDER.get(figure.transport, 9),
        figure.measurement.clients,
    )


def _floor_name(floor: Floor | None) -> str:
    return "-" if floor is None else floor.name


def _floor_rate(floor: Floor | None) -> str:
    return "-" if floor is None else f"{floor.measurement.ops_per_s:.1f}"


def _cpu(cpu: dict[str, float], names: tuple[str, ...]) -> str:
    return "/".join(f"{cpu[name]:.2f}" if name in cpu else "-" for name in names)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rss_mb(report: Report, size: int, process: str) -> float | None:
    for entry in report.rss:
        if entry["size"] == size:
            values = [kib for name, kib in entry["kib"].items() if name.startswith(process) and kib]
            return max(values) * 1024 / 1e6 if values else None
    return None


def evaluate_targets(report: Report) -> list[Target]:
    """The targets of issues 5, 15 and 19, each with the figure that decides it."""
    targets: list[Target] = []
    sizes = sorted({figure.size for figure in report.figures})
    for size in sizes:
        figure = report.figure("store", "stdio", 1, size)
        insert = report.floor("sqlcipher-insert", "sqlcipher", 1, size)
        target = _target(
            f"store via gateway stdio, 1 client, at {size}: ratio to the MCP+gRPC no-op floor",
            figure.ratio if figure else None,
            ">=",
            0.75,
            "memory_store over stdio / no-op tool (one no-op gRPC call) over stdio, serial",
        )
        targets.append(_bounded(target, _serial_bound(figure, {"sqlcipher-insert": _cpu_of(insert, "client")})))
    for size, threshold in ((HUNDRED_K, 0.6), (ONE_M, 0.4)):
        for transport in ("stdio", "http"):
            for clients in sorted({f.measurement.clients for f in report.figures}) or [1]:
                figure = report.figure("search", transport, clients, size)
                target = _target(
                    f"search via gateway {transport}, {clients} client(s), at {size}: ratio to the MCP+gRPC"
                    " no-op floor",
                    figure.ratio if figure else None,
                    ">=",
                    threshold,
                    f"memory_search over {transport} / no-op tool (one no-op gRPC call) over {transport}",
                )
                targets.append(_bounded(target, _search_bound(figure)))
    for size, threshold in ((HUNDRED_K, 0.5), (ONE_M, 0.35)):  # issue 15: a search's cost bounded by k
        figure = report.figure("search_common", "stdio", 1, size)
        target = _target(
            f"search for words every memory holds, via gateway stdio, 1 client, at {size}: ratio to the MCP"
            " no-op floor",
            figure.ratio if figure else None,
            ">=",
            threshold,
            "memory_search 'project memo' over stdio / no-op tool (one no-op gRPC call) over stdio, serial",
        )
        targets.append(_bounded(target, _search_bound(figure)))
    for size in sizes:
        figure = report.figure("store", "grpc", 16, size)
        check = next((c for c in report.checks if c["size"] == size), None)
        verified = bool(check and check.get("ok"))
        detail = "Store over the agent socket / gRPC no-op, 16 clients each; " + (
            "every acknowledged store found stored and audited" if verified else "stored/audited check FAILED"
        )
        target = _target(
            f"direct gRPC store, 16 clients, at {size}: ratio to the gRPC no-op floor",
            figure.ratio if figure else None,
            ">=",
            0.7,
            detail,
        )
        if target.met and not verified:
            target = Target(target.name, target.measured, target.threshold, ">=", False, detail)
        targets.append(_bounded(target, _server_model_bound(report, 16, size)))
    for transport in ("grpc", "stdio", "http"):
        for clients in sorted({f.measurement.clients for f in report.figures}) or [1]:
            small = report.figure("store", transport, clients, ONE_K)
            large = report.figure("store", transport, clients, HUNDRED_K)
            ratio = None
            if small and large and small.measurement.ops_per_s > 0:
                ratio = large.measurement.ops_per_s / small.measurement.ops_per_s
            targets.append(
                _target(
                    f"store throughput at 100k / at 1k, {transport}, {clients} client(s)",
                    ratio,
                    ">=",
                    0.9,
                    "store ops/s at 100,000 memories over store ops/s at 1,000",
                )
            )
    targets += _write_path_targets(report)
    for process in ("guardian", "gateway"):
        targets.append(
            _target(
                f"peak RSS of the {process} at 100k (MB)",
                _rss_mb(report, HUNDRED_K, process),
                "<=",
                _RSS_LIMIT_MB,
                f"VmHWM of the {process} process(es) at 100,000 memories, the largest one",
            )
        )
    return targets


def _write_path_targets(report: Report) -> list[Target]:
    """Issue 19's: the guardian's CPU per store, stores at 16 clients, the store rate at 1M against 1k."""
    store = report.figure("store", "grpc", 1, HUNDRED_K)
    cpu = _target(
        "guardian CPU per store at 100k, direct gRPC, 1 client (ms)",
        store.cpu_ms_per_op.get("guardian") if store else None,
        "<=",
        0.5,
        "the guardian process's CPU (all threads) over the timed stores, per store; filters on, as shipped",
    )
    targets = [_bounded(cpu, _store_cpu_bound(report, HUNDRED_K))]
    for size in sorted({figure.size for figure in report.figures}):
        figure = report.figure("store", "grpc", 16, size)
        target = _target(
            f"16 concurrent direct gRPC stores at {size}, durable and audited: ratio to the gRPC no-op floor at 16",
            figure.ratio if figure else None,
            ">=",
            0.4,
            "Store over the agent socket / gRPC no-op, 16 clients each (the audit check below covers them)",
        )
        targets.append(_bounded(target, _server_model_bound(report, 16, size)))
    small, large = report.figure("store", "grpc", 1, ONE_K), report.figure("store", "grpc", 1, ONE_M)
    targets.append(
        _target(
            "store rate at 1M / at 1k, direct gRPC, 1 client",
            large.measurement.ops_per_s / small.measurement.ops_per_s
            if small and large and small.measurement.ops_per_s > 0
            else None,
            ">=",
            0.9,
            "store ops/s at 1,000,000 memories over store ops/s at 1,000",
        )
    )
    return targets


# -- bounds: the best a target's figure could be on this stack, from the same run's floors ------------------

Bound = tuple[float, str]


def _bounded(target: Target, bound: Bound | None) -> Target:
    return target if bound is None else replace(target, bound=bound[0], bound_detail=bound[1])


def _cpu_of(floor: Floor | None, process: str) -> float | None:
    return None if floor is None else floor.cpu_ms_per_op.get(process)


def _store_cpu_bound(report: Report, size: int) -> Bound | None:
    """A store's guardian CPU is at least a call on grpcio's cheapest server plus the bare durable insert."""
    server = _cpu_of(report.floor(GRPC_FLOOR, "grpc", 1, size), "server")
    insert = _cpu_of(report.floor("sqlcipher-insert", "sqlcipher", 1, size), "client")
    if server is None or insert is None:
        return None
    return server + insert, (
        f"{GRPC_FLOOR} server CPU {server:.3f} + sqlcipher-insert CPU {insert:.3f} ms: grpcio's cheapest server "
        "doing nothing, then the memory and its search terms inserted and committed (no audit row, no HMAC)"
    )


def _server_model_bound(report: Report, clients: int, size: int) -> Bound | None:
    """Calls at this concurrency go no faster than the guardian's server model doing nothing."""
    model = report.floor(GRPC_MODEL_FLOOR, "grpc", clients, size)
    ratio = _ratio(model.measurement, report.floor(GRPC_FLOOR, "grpc", clients, size)) if model else None
    if ratio is None:
        return None
    return ratio, (
        f"{GRPC_MODEL_FLOOR} / {GRPC_FLOOR} at {clients} clients: the guardian's server model doing nothing (the "
        "model in which a call without a message is audited and a stalled stream holds no worker thread)"
    )


def _search_bound(figure: Figure | None) -> Bound | None:
    """A search through the gateway also embeds its query, in the embedder, before it ranks anything. (Not the
    bare SQL floor of its words' ranking: the guardian leaves out of the ranking words most memories hold, so its
    lexical leg can cost less than that floor.)"""
    if figure is None:
        return None
    return _serial_bound(figure, {"embedder": figure.cpu_ms_per_op.get("embedder")})


def _serial_bound(figure: Figure | None, extra: dict[str, float | None]) -> Bound | None:
    """One serial client: a call lasts at least the floor's call plus the extra CPU ms named, each spent on the
    call's path, one after another."""
    if figure is None or figure.floor is None or figure.measurement.clients != 1:
        return None
    if figure.floor.measurement.ops_per_s <= 0 or any(ms is None for ms in extra.values()):
        return None
    spent = {name: ms for name, ms in extra.items() if ms is not None}
    floor_ms = 1000 / figure.floor.measurement.ops_per_s
    parts = " + ".join(f"{name} {ms:.2f}" for name, ms in spent.items())
    return floor_ms / (floor_ms + sum(spent.values())), f"{figure.floor.name} {floor_ms:.2f} ms a call + CPU ms {parts}"


def render_targets(targets: list[Target]) -> str:
    """The targets as lines: met / NOT MET / not measured."""
    lines = ["targets (issues 5, 15, 19):"]
    for target in targets:
        state = "not measured" if target.met is None else ("met" if target.met else "NOT MET")
        measured = "-" if target.measured is None else f"{target.measured:.3f}"
        lines.append(f"  [{state:^12}] {target.name}: {measured} (needs {target.comparison} {target.threshold})")
        if target.bound is not None:
            reach = "out of reach on this stack" if target.out_of_reach else "within reach"
            lines.append(f"  {'':14} at best {target.bound:.3f} here ({reach}): {target.bound_detail}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """CPU count, Python and library versions, platform."""
    packages: dict[str, str | None] = {}
    for package in ("mcp", "grpcio", "sqlcipher3", "protobuf", "uvicorn"):
        try:
            packages[package] = version(package)
        except PackageNotFoundError:
            packages[package] = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load_average_at_end": load,
        "packages": packages,
    }


def measure_and_print(
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str | None,
    measure: Callable[[Path], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> int:
    """The command line of a one-off measurement (recall quality, review signals): run it under a temporary
    directory, print its table, write its JSON when asked (``--json PATH``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    temp_root = Path(tempfile.mkdtemp(prefix="agm-", dir="/tmp"))
    try:
        figures = measure(temp_root)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    print(render(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0
