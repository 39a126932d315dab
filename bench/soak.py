"""``make soak``: mixed load through the real path for a while, watching memory and file descriptors.

A guardian (the bench policy) and an HTTP gateway; MCP clients through the gateway and
direct gRPC clients (as other gateways would be) store, batch, get, search, list,
update and delete, in the mix an agent would; every ``--sample`` seconds it reads both
processes' RSS and open file descriptors, and at the end it prints them at the start,
at the end and at their highest, with the calls made and failed. Exit 0 when no call
failed and both processes are still up; 1 otherwise.

    python -m bench.soak --duration 600            (make soak SOAK_SECONDS=600)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.clients import Acks, GrpcAgentClient, McpAgentClient, grpc_agent_clients, http_client_opener, mcp_clients
from bench.corpus import Corpus
from bench.procs import BenchGuardian, Spawned, free_port, spawn, wait_for_port

__all__ = ["main"]

#: The share of each operation in the mix: mostly reads and single stores, as an agent's loop does.
MIX: Final = {"search": 30, "get": 25, "store": 20, "list": 15, "store_batch": 5, "churn": 5}


@dataclass
class Sample:
    """Both processes at one moment."""

    at_s: float
    rss_kib: dict[str, int]
    fds: dict[str, int]


@dataclass
class Tally:
    calls: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _sample(started: float, processes: dict[str, Spawned]) -> Sample:
    return Sample(
        at_s=round(time.monotonic() - started, 1),
        rss_kib={name: _rss_kib(p.pid) for name, p in processes.items()},
        fds={name: _fds(p.pid) for name, p in processes.items()},
    )


async def _client_loop(
    name: str, ops: dict[str, Callable[[], Awaitable[None]]], deadline: float, tally: Tally, seed: int
) -> None:
    rng = random.Random(seed)  # noqa: S311 - a workload, not a secret
    names, weights = list(MIX), list(MIX.values())
    while time.monotonic() < deadline:
        operation = rng.choices(names, weights)[0]
        tally.calls[f"{name}:{operation}"] += 1
        try:
            await ops[operation]()
        except Exception as error:  # counted and reported: a soak must not stop at the first failure
            tally.failures[f"{name}:{operation}: {type(error).__name__}: {str(error)[:120]}"] += 1


def _mcp_ops(client: McpAgentClient) -> dict[str, Callable[[], Awaitable[None]]]:
    async def churn() -> None:  # store, update, delete one memory: the rows and index entries come and go
        stored = await client._call("memory_store", {"content": "soak churn note", "tags": ["soak"]})
        memory_id = stored["memory"]["id"]
        await client._call("memory_update", {"id": memory_id, "content": "soak churn note, updated"})
        await client._call("memory_delete", {"id": memory_id})

    return {
        "search": client.search,
        "get": client.get,
        "store": client.store,
        "list": client.list,
        "store_batch": client.store_batch,
        "churn": churn,
    }


def _grpc_ops(client: GrpcAgentClient) -> dict[str, Callable[[], Awaitable[None]]]:
    return {
        "search": client.search,
        "get": client.get,
        "store": client.store,
        "list": client.list,
        "store_batch": client.store_batch,
        "churn": client.store,
    }


async def _soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    guardian = BenchGuardian(root / "state")
    guardian.prepare()
    guardian.start()
    assert guardian.spawned is not None
    token = guardian.add_agent("soak")
    port = free_port()
    gateway_argv = [sys.executable, "-m", "gateway.cli", "--transport", "http", "--socket", str(guardian.agent_socket)]
    gateway = spawn("gateway-http", [*gateway_argv, "--port", str(port)], root / "gateway.log")
    processes = {"guardian": guardian.spawned, "gateway": gateway}
    corpus = Corpus(seed=args.seed)
    tally = Tally()
    samples: list[Sample] = []
    try:
        wait_for_port(gateway, port)
        url = f"http://127.0.0.1:{port}/mcp"
        async with mcp_clients([http_client_opener(url, token)] * args.mcp_clients) as sessions:
            acks_mcp, acks_grpc = Acks(), Acks()
            clients = [McpAgentClient(session, corpus, acks_mcp) for session in sessions]
            for client in clients[:1]:
                await client.store_batch()  # something to get and search from the start
            corpus.ids.extend(await _ids(guardian))
            async with grpc_agent_clients(guardian.agent_socket, token, args.grpc_clients, corpus, acks_grpc) as direct:
                started = time.monotonic()
                deadline = started + args.duration
                samples.append(_sample(started, processes))
                loops = [
                    asyncio.create_task(_client_loop("mcp", _mcp_ops(c), deadline, tally, n))
                    for n, c in enumerate(clients)
                ] + [
                    asyncio.create_task(_client_loop("grpc", _grpc_ops(c), deadline, tally, 100 + n))
                    for n, c in enumerate(direct)
                ]
                while time.monotonic() < deadline:
                    await asyncio.sleep(min(args.sample, max(0.0, deadline - time.monotonic())))
                    samples.append(_sample(started, processes))
                    print(_sample_line(samples[-1], tally), file=sys.stderr, flush=True)
                await asyncio.gather(*loops)
                samples.append(_sample(started, processes))
        alive = {name: process.alive() for name, process in processes.items()}
    finally:
        gateway.stop()
        guardian.stop()
    return _report(args, samples, tally, alive)


async def _ids(guardian: BenchGuardian) -> list[str]:
    with guardian.keyed_db() as db:
        return [row[0] for row in db.execute("SELECT id FROM memories").fetchall()]


def _sample_line(sample: Sample, tally: Tally) -> str:
    calls, failed = sum(tally.calls.values()), sum(tally.failures.values())
    memory = ", ".join(f"{name} {kib / 1024:.1f} MB / {sample.fds[name]} fds" for name, kib in sample.rss_kib.items())
    return f"[soak {sample.at_s:>7.1f} s] {calls} calls, {failed} failed; {memory}"


def _report(args: argparse.Namespace, samples: list[Sample], tally: Tally, alive: dict[str, bool]) -> dict[str, Any]:
    first, last = samples[0], samples[-1]
    processes = {}
    for name in first.rss_kib:
        processes[name] = {
            "rss_mb_start": round(first.rss_kib[name] / 1024, 1),
            "rss_mb_end": round(last.rss_kib[name] / 1024, 1),
            "rss_mb_peak": round(max(s.rss_kib[name] for s in samples) / 1024, 1),
            "fds_start": first.fds[name],
            "fds_end": last.fds[name],
            "fds_peak": max(s.fds[name] for s in samples),
            "alive_at_end": alive[name],
        }
    return {
        "duration_s": args.duration,
        "clients": {"mcp_http": args.mcp_clients, "grpc": args.grpc_clients},
        "calls": sum(tally.calls.values()),
        "calls_by_operation": dict(sorted(tally.calls.items())),
        "failed": sum(tally.failures.values()),
        "failures": dict(tally.failures.most_common(20)),
        "processes": processes,
        "samples": [vars(sample) for sample in samples],
    }


def _print_table(report: dict[str, Any]) -> None:
    print(f"soak: {report['duration_s']} s, {report['calls']} calls, {report['failed']} failed")
    header = ("process", "RSS start", "RSS end", "RSS peak", "fds start", "fds end", "peak")
    print(f"{header[0]:<10} " + " ".join(f"{title:>10}" for title in header[1:]))
    for name, row in report["processes"].items():
        print(
            f"{name:<10} {row['rss_mb_start']:>8.1f}MB {row['rss_mb_end']:>8.1f}MB {row['rss_mb_peak']:>8.1f}MB"
            f" {row['fds_start']:>10} {row['fds_end']:>10} {row['fds_peak']:>10}"
        )
    for failure, count in report["failures"].items():
        print(f"  failed {count}x: {failure}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.soak``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Mixed load through the real MCP gateway and over gRPC for a while; reports the RSS and"
        " open file descriptors of the guardian and the gateway at the start and the end.",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--mcp-clients", type=int, default=4, help="MCP clients through the HTTP gateway (4)")
    parser.add_argument("--grpc-clients", type=int, default=2, help="direct gRPC clients (2)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples (10)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.mcp_clients < 1 or args.grpc_clients < 0 or args.sample <= 0:
        parser.error("--duration and --sample must be > 0, --mcp-clients >= 1, --grpc-clients >= 0")
    root = Path(tempfile.mkdtemp(prefix="agsoak-", dir="/tmp"))
    try:
        report = asyncio.run(_soak(args, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _print_table(report)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    ok = report["failed"] == 0 and all(row["alive_at_end"] for row in report["processes"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
