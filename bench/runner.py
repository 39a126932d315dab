"""One run of the benchmark, size by size: the guardian, the prefill, the floors, the measurements, the checks.

For each size: a fresh guardian (bench policy: rate limits and anomaly locks
lifted, everything else as shipped) is filled to that many memories of agent
``bench``; the SQLCipher floor is timed on a table of the same size; then for
each transport and number of clients, the transport's floor is timed, then
get, search and list; once every transport has read, the same transports and
numbers of clients store and store_batch (against the same floors). After the
writes, the bench checks that the table holds every memory the guardian
acknowledged, then deletes them again (a direct DELETE, the search index's
rows too), so each transport writes at the size it names. Reads never follow
writes: that DELETE does not reach the guardian's in-memory vector index, and
the vectors it keeps of the written memories (real embeddings, where the
prefill's are random) would be every query's nearest neighbours, each
skipped at a cost (a search by meaning at 16 clients took 23 ms of the
guardian's CPU at 1k, against 4.6 at 1 client, when it came after the
1-client writes). At the end of a size it checks that the audit trail holds
one allow row per acknowledged store and batch. A measurement whose calls
failed (e.g. a gateway deadline) is followed by a wait until the guardian is
idle again, so the work its clients gave up on does not land on the next
measurement.

Every process is stopped by its PID when its size ends, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from bench.clients import (
    Acks,
    GrpcAgentClient,
    McpAgentClient,
    grpc_agent_clients,
    grpc_noop_calls,
    http_client_opener,
    mcp_clients,
    mcp_noop_call,
    stdio_opener,
)
from bench.corpus import BATCH_SIZE, Corpus
from bench.load import AsyncCall, measure, measure_sync
from bench.options import DIRECT_PREFILL_ABOVE, Options
from bench.prefill import PrefillReport, prefill_direct, prefill_grpc
from bench.procs import (
    RUN_ENV,
    BenchGuardian,
    CpuMeter,
    Spawned,
    free_port,
    peak_rss_kib,
    run_id,
    spawn,
    wait_for_port,
    wait_for_socket,
    wait_idle,
)
from bench.report import GRPC_FLOOR, GRPC_MODEL_FLOOR, MCP_FLOOR, Figure, Floor, Report
from bench.sqlfloor import FLOOR_OF, SqlFloor
from bench.stage_profile import StageMeter
from guardian.store import search_index

__all__ = ["AGENT", "log", "run_sizes"]

AGENT: Final = "bench"
#: The two passes over every transport and number of clients: the reads (which see exactly the prefilled
#: memories), then the writes.
_READS: Final = ("get", "search", "search_common", "list")
_WRITES: Final = ("store", "store_batch")
#: The audit (and stage profile) operation of each measured operation.
_AUDIT_OPERATION: Final = {
    "get": "memory.get",
    "search": "memory.search",
    "search_common": "memory.search",
    "list": "memory.list",
    "store": "memory.store",
    "store_batch": "memory.store_batch",
}


def log(message: str) -> None:
    """A progress line on stderr."""
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


class _Processes:
    """Processes started for one size, stopped by PID in reverse order."""

    def __init__(self) -> None:
        self._spawned: list[Spawned] = []
        self._pid_files: list[Path] = []

    def add(self, spawned: Spawned) -> Spawned:
        self._spawned.append(spawned)
        return spawned

    def note_pid_files(self, paths: Sequence[Path]) -> None:
        self._pid_files.extend(paths)

    def stop_all(self) -> None:
        while self._spawned:
            self._spawned.pop().stop()
        # stdio servers are the MCP client's children, which it ends; end any it left, by PID.
        for path in self._pid_files:
            with contextlib.suppress(OSError, ValueError):
                _kill_if_ours(int(path.read_text().strip()))
        self._pid_files.clear()


def _kill_if_ours(pid: int) -> None:
    """SIGKILL pid if it is still a process of this run (its environment carries the run id)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return
    if f"{RUN_ENV}={run_id()}".encode() in environ.split(b"\0"):
        os.kill(pid, signal.SIGKILL)


@dataclass
class _SizeRun:
    """The state of one size's measurements."""

    size: int
    root: Path
    guardian: BenchGuardian
    corpus: Corpus
    token: str
    procs: _Processes
    report: Report
    options: Options
    #: Highest rowid after the prefill: rows above it were written by the measurements.
    prefill_rowid: int = 0
    acks_total: Acks | None = None
    prefill_batches: int = 0
    gateway_peak_kib: dict[str, int] | None = None
    #: The gRPC floors' servers (_grpc_noop) by model, once started.
    grpc_noops: dict[str, Spawned] = field(default_factory=dict)
    #: The operations of the pass under way (_READS or _WRITES).
    operations: tuple[str, ...] = _READS
    #: The floors the reads pass measured, which the writes pass reuses: (name, transport, clients) -> floor.
    floors: dict[tuple[str, str, int], Floor] = field(default_factory=dict)

    def note_gateway_rss(self, kind: str, kib: int | None) -> None:
        peaks = self.gateway_peak_kib if self.gateway_peak_kib is not None else {}
        peaks[kind] = max(peaks.get(kind, 0), kib or 0)
        self.gateway_peak_kib = peaks

    def table_rows(self) -> int:
        with self.guardian.keyed_db() as db:
            return int(db.execute("SELECT count(*) FROM memories").fetchone()[0])


async def _measure_floor(
    run: _SizeRun, name: str, transport: str, calls: Sequence[AsyncCall], server_pids: list[int]
) -> Floor:
    """Time a floor's calls (and its server's CPU) and add it to the report, for the writes pass to reuse."""
    meter = CpuMeter({"server": server_pids})
    measurement = await measure(calls, run.options.budget, meter)
    floor = Floor(name, transport, run.size, measurement, meter.per_op_ms(measurement.ops))
    run.floors[name, transport, len(calls)] = floor
    run.report.floors.append(floor)
    return floor


async def _measure_operations(
    run: _SizeRun,
    transport: str,
    clients: Sequence[GrpcAgentClient | McpAgentClient],
    acks: Acks,
    floor: Floor,
    *,
    gateway_pids: list[int],
) -> None:
    """The pass's operations; after writes, check and remove what they stored (acks counts them)."""
    guardian_pid = run.guardian.spawned.pid if run.guardian.spawned is not None else -1
    processes = {"guardian": [guardian_pid]}
    if run.guardian.embedder is not None:  # a search's query is embedded there, on the search's path
        processes["embedder"] = [run.guardian.embedder.pid]
    if gateway_pids:
        processes["gateway"] = gateway_pids
    for operation in run.operations:
        rows = run.table_rows()
        calls: list[AsyncCall] = [getattr(client, operation) for client in clients]
        meter = CpuMeter(processes)
        stages = StageMeter(meter, run.guardian.ops_port) if run.options.profile else None
        measurement = await measure(calls, run.options.budget, stages or meter)
        stages_us = stages.per_call_us(_AUDIT_OPERATION[operation], measurement.ops) if stages else {}
        db_floor = next(
            (f for f in run.report.floors if f.size == run.size and f.name == "sqlcipher-" + FLOOR_OF[operation]),
            None,
        )
        run.report.figures.append(
            Figure(
                operation=operation,
                transport=transport,
                size=run.size,
                measurement=measurement,
                floor=floor,
                db_floor=db_floor,
                table_rows=rows,
                memories_per_call=BATCH_SIZE if operation == "store_batch" else 1,
                cpu_ms_per_op=meter.per_op_ms(measurement.ops),
                stages_us=stages_us,
            )
        )
        log(
            f"size {run.size} {transport:<5} clients {len(clients):>2} {operation:<11} "
            f"{measurement.ops_per_s:9.1f} ops/s  p50 {measurement.p50_ms:7.2f} ms  p99 {measurement.p99_ms:7.2f} ms"
            f"  floor {floor.measurement.ops_per_s:9.1f}"
            + (f"  ERRORS {measurement.errors}" if measurement.errors else "")
        )
        if measurement.errors and run.guardian.spawned is not None:
            # Calls the clients gave up on may still be running in the guardian: let it finish them.
            waited = wait_idle(run.guardian.spawned.pid)
            log(f"waited {waited:.1f} s for the guardian to finish calls its clients gave up on")
        if measurement.errors:
            run.report.problems.append(
                f"{operation} via {transport} x{len(clients)} at {run.size}: {measurement.errors} errors, "
                f"first: {measurement.first_error}"
            )
    if run.operations == _WRITES:
        _check_and_trim(run, transport, len(clients), acks)


def _check_and_trim(run: _SizeRun, transport: str, clients: int, acks: Acks) -> None:
    """Every acknowledged memory is in the table; then delete them so the next transport sees the size."""
    with run.guardian.keyed_db() as db:
        written = int(db.execute("SELECT count(*) FROM memories WHERE rowid > ?", (run.prefill_rowid,)).fetchone()[0])
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM memory_terms WHERE rowid > ?", (run.prefill_rowid,))  # the search index too
        # Their vectors too (the guardian's in-memory index keeps them until it restarts, which is why every
        # read is measured before any write: see the module docstring).
        db.execute("DELETE FROM memory_vectors WHERE rowid > ?", (run.prefill_rowid,))
        db.execute("DELETE FROM memories WHERE rowid > ?", (run.prefill_rowid,))
        db.execute("COMMIT")
    if written != acks.memories:
        run.report.problems.append(
            f"{transport} x{clients} at {run.size}: {acks.memories} memories acknowledged but {written} stored"
        )
    total = run.acks_total or Acks()
    total.store_calls += acks.store_calls
    total.batch_calls += acks.batch_calls
    total.memories += acks.memories
    run.acks_total = total


def _audit_check(run: _SizeRun) -> dict[str, Any]:
    """One allow row per acknowledged store and batch (prefill batches included), and no denial."""
    acks = run.acks_total or Acks()
    with run.guardian.keyed_db() as db:
        counts = dict(
            db.execute(
                "SELECT operation || ':' || decision, count(*) FROM audit"
                " WHERE operation LIKE 'memory.%' GROUP BY operation, decision"
            ).fetchall()
        )
    stores = int(counts.get("memory.store:allow", 0))
    batches = int(counts.get("memory.store_batch:allow", 0))
    refused = {key: value for key, value in counts.items() if not key.endswith(":allow")}
    ok = stores == acks.store_calls and batches == acks.batch_calls + run.prefill_batches and not refused
    return {
        "size": run.size,
        "ok": ok,
        "stores_acknowledged": acks.store_calls,
        "store_audit_rows": stores,
        "batches_acknowledged": acks.batch_calls + run.prefill_batches,
        "batch_audit_rows": batches,
        "memories_acknowledged_by_measurements": acks.memories,
        "refused_or_failed_rows": refused,
        "audit_rows_by_operation": counts,
    }


def _grpc_noop(run: _SizeRun, model: str = "sync") -> tuple[Spawned, Path]:
    """A gRPC floor's server (bench/noop_grpc.py) of this size's run, started at its first use. The sync one
    is the gRPC figures' floor, and the MCP floors' tool calls it; the guardian model's is a reference."""
    socket_path = run.root / f"noop-{model}.sock"
    server = run.grpc_noops.get(model)
    if server is None or not server.alive():
        argv = [sys.executable, "-m", "bench.noop_grpc", "--socket", str(socket_path), "--model", model]
        server = run.procs.add(spawn(f"grpc-noop-{model}", argv, run.root / f"noop-{model}.log"))
        run.grpc_noops[model] = server
        wait_for_socket(server, socket_path)
    return server, socket_path


async def _grpc_floor(run: _SizeRun, name: str, model: str, count: int) -> Floor:
    noop, noop_socket = _grpc_noop(run, model)
    async with grpc_noop_calls(noop_socket, count) as calls:
        return await _measure_floor(run, name, "grpc", calls, [noop.pid])


async def _grpc_transport(run: _SizeRun) -> None:
    for count in run.options.clients:
        floor = run.floors.get((GRPC_FLOOR, "grpc", count))
        if floor is None:  # the reads pass: measure it, and beside it the guardian's server model doing nothing
            floor = await _grpc_floor(run, GRPC_FLOOR, "sync", count)
            await _grpc_floor(run, GRPC_MODEL_FLOOR, "guardian", count)
        acks = Acks()
        async with grpc_agent_clients(run.guardian.agent_socket, run.token, count, run.corpus, acks) as clients:
            await _measure_operations(run, "grpc", clients, acks, floor, gateway_pids=[])


def _pid_files(run: _SizeRun, label: str, count: int) -> list[Path]:
    directory = run.root / "pids"
    directory.mkdir(exist_ok=True)
    files = [directory / f"{label}-{count}-{index}.pid" for index in range(count)]
    run.procs.note_pid_files(files)
    return files


def _pids_in(files: Sequence[Path]) -> list[int]:
    pids = []
    for path in files:
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(path.read_text().strip()))
    return pids


def _peak_of_pid_files(files: Sequence[Path]) -> int:
    return max((peak_rss_kib(pid) or 0 for pid in _pids_in(files)), default=0)


async def _stdio_transport(run: _SizeRun) -> None:
    grpc_noop, grpc_socket = _grpc_noop(run)
    for count in run.options.clients:
        floor = run.floors.get((MCP_FLOOR, "stdio", count))
        if floor is None:  # the reads pass: measure it
            noop_pids = _pid_files(run, "noop-stdio", count)
            openers = [
                stdio_opener("noop", pid, run.root / "noop-stdio.log", socket_path=grpc_socket) for pid in noop_pids
            ]
            async with mcp_clients(openers) as sessions:
                calls = [mcp_noop_call(session) for session in sessions]
                floor = await _measure_floor(run, MCP_FLOOR, "stdio", calls, [*_pids_in(noop_pids), grpc_noop.pid])
        gateway_pids = _pid_files(run, "gateway-stdio", count)
        openers = [
            stdio_opener(
                "gateway", pid, run.root / "gateway-stdio.log", socket_path=run.guardian.agent_socket, token=run.token
            )
            for pid in gateway_pids
        ]
        acks = Acks()
        async with mcp_clients(openers) as sessions:
            clients = [McpAgentClient(session, run.corpus, acks) for session in sessions]
            await _measure_operations(run, "stdio", clients, acks, floor, gateway_pids=_pids_in(gateway_pids))
            run.note_gateway_rss("gateway_stdio", _peak_of_pid_files(gateway_pids))


@contextlib.contextmanager
def _http_server(run: _SizeRun, name: str, argv: list[str]) -> Iterator[tuple[Spawned, str]]:
    port = free_port()
    spawned = run.procs.add(spawn(name, [*argv, "--port", str(port)], run.root / f"{name}.log"))
    try:
        wait_for_port(spawned, port)
        yield spawned, f"http://127.0.0.1:{port}/mcp"
    finally:
        spawned.stop()


async def _http_transport(run: _SizeRun) -> None:
    grpc_noop, grpc_socket = _grpc_noop(run)
    noop_argv = [sys.executable, "-m", "bench.noop_server", "--transport", "http", "--grpc-socket", str(grpc_socket)]
    gateway_argv = [
        sys.executable,
        "-m",
        "gateway.cli",
        "--transport",
        "http",
        "--socket",
        str(run.guardian.agent_socket),
    ]
    with (
        _http_server(run, "noop-http", noop_argv) as (noop, noop_url),
        _http_server(run, "gateway-http", gateway_argv) as (gateway, gateway_url),
    ):
        for count in run.options.clients:
            floor = run.floors.get((MCP_FLOOR, "http", count))
            if floor is None:  # the reads pass: measure it
                async with mcp_clients([http_client_opener(noop_url)] * count) as sessions:
                    calls = [mcp_noop_call(session) for session in sessions]
                    floor = await _measure_floor(run, MCP_FLOOR, "http", calls, [noop.pid, grpc_noop.pid])
            acks = Acks()
            async with mcp_clients([http_client_opener(gateway_url, run.token)] * count) as sessions:
                clients = [McpAgentClient(s, run.corpus, acks) for s in sessions]
                await _measure_operations(run, "http", clients, acks, floor, gateway_pids=[gateway.pid])
            run.note_gateway_rss("gateway_http", gateway.peak_rss_kib())


_TRANSPORT_RUNNERS: Final[dict[str, Callable[[_SizeRun], Awaitable[None]]]] = {
    "grpc": _grpc_transport,
    "stdio": _stdio_transport,
    "http": _http_transport,
}


def _sql_floors(run: _SizeRun) -> None:
    """The bare SQLCipher floor, on a table filled with the same corpus to the same size."""
    floor_corpus = Corpus()
    sql = SqlFloor(run.root / "floor.db", floor_corpus)
    try:
        seconds = sql.fill(run.size)
        log(f"size {run.size}: SQLCipher floor table filled in {seconds:.1f} s")
        report_plans = sql.plans()
        run.report.query_plans.append({"size": run.size, **report_plans})
        for operation in ("get", "fts", "fts_join_first", "list", "insert", "insert_batch"):
            meter = CpuMeter({})
            measurement = measure_sync(sql.operation(operation), run.options.budget, meter)
            floor = Floor(
                "sqlcipher-" + operation, "sqlcipher", run.size, measurement, meter.per_op_ms(measurement.ops)
            )
            run.report.floors.append(floor)
            if operation.startswith("insert"):
                sql.trim(run.size)
    finally:
        sql.close()


@asynccontextmanager
async def _size(size: int, temp_root: Path, options: Options, report: Report) -> AsyncIterator[_SizeRun]:
    root = temp_root / f"s{size}"
    guardian = BenchGuardian(root, profile=options.profile)
    procs = _Processes()
    try:
        guardian.prepare()
        guardian.start()
        token = guardian.add_agent(AGENT)
        run = _SizeRun(size, root, guardian, Corpus(), token, procs, report, options)
        yield run
    finally:
        procs.stop_all()
        guardian.stop()
        shutil.rmtree(root, ignore_errors=True)  # a size's state can be gigabytes (1M memories)


async def _run_size(size: int, temp_root: Path, options: Options, report: Report) -> None:
    async with _size(size, temp_root, options, report) as run:
        direct = options.prefill == "direct" or (options.prefill == "auto" and size > DIRECT_PREFILL_ABOVE)
        log(f"size {size}: prefilling ({'direct' if direct else 'grpc'})")
        prefill: PrefillReport
        if direct:
            run.guardian.stop()
            prefill = prefill_direct(run.guardian, AGENT, size, run.corpus)
            run.guardian.start()
        else:
            prefill = await prefill_grpc(run.guardian, run.token, size, run.corpus)
            run.prefill_batches = prefill.batches
        log(f"size {size}: vector index ready and organised {run.guardian.wait_recall_ready():.1f} s later")
        report.prefills.append({"size": size, **prefill.to_json()})
        log(f"size {size}: prefilled {size} in {prefill.seconds:.1f} s")
        with run.guardian.keyed_db() as db:
            run.prefill_rowid = int(db.execute("SELECT max(rowid) FROM memories").fetchone()[0] or 0)
            # The prefill wrote hundreds of memories a transaction, whose many segments every measured store would
            # pay for: one segment instead, nearer an index grown a memory at a time (search_index.optimize).
            started = time.perf_counter()
            search_index.optimize(db)
        log(f"size {size}: search index optimized in {time.perf_counter() - started:.1f} s")
        _sql_floors(run)
        for operations in (_READS, _WRITES):
            run.operations = operations
            for transport in options.transports:
                await _TRANSPORT_RUNNERS[transport](run)
                run.guardian.sample_rss()
        report.checks.append(_audit_check(run))
        if not report.checks[-1]["ok"]:
            report.problems.append(f"size {size}: audit check failed: {report.checks[-1]}")
        run.guardian.sample_rss()
        kib = {"guardian": run.guardian.peak_kib, **(run.gateway_peak_kib or {})}
        if run.guardian.embedder_peak_kib:
            kib["embedder"] = run.guardian.embedder_peak_kib
        report.rss.append({"size": size, "kib": kib})


async def run_sizes(options: Options, temp_root: Path, report: Report) -> None:
    """Measure every size of options into report, using temp_root for state."""
    for size in options.sizes:
        await _run_size(size, temp_root, options, report)
