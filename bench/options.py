"""The command line of ``python -m bench``: what to measure, and the smoke profile (``--quick``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.load import Budget

__all__ = ["DEFAULT_JSON", "DIRECT_PREFILL_ABOVE", "TRANSPORTS", "Options", "parse_options"]

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "latest.json"
TRANSPORTS: Final = ("grpc", "stdio", "http")
#: Above this size the prefill goes direct unless --prefill says otherwise (StoreBatch would take minutes).
DIRECT_PREFILL_ABOVE: Final = 200_000


@dataclass(frozen=True)
class Options:
    """What to measure."""

    sizes: tuple[int, ...]
    clients: tuple[int, ...]
    transports: tuple[str, ...]
    budget: Budget
    json_path: Path
    prefill: str
    quick: bool
    #: Have the guardian time its pipeline's stages, and print them per call beside each figure.
    profile: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "sizes": list(self.sizes),
            "clients": list(self.clients),
            "transports": list(self.transports),
            "budget": asdict(self.budget),
            "json": str(self.json_path),
            "prefill": self.prefill,
            "quick": self.quick,
            "profile": self.profile,
        }


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 1, got {text!r}")
    return values


def _transports(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [value for value in values if value not in TRANSPORTS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(TRANSPORTS)}, got {text!r}")
    return values


_EPILOG: Final = """\
floors (beside every figure, measured in the same run, same client code and concurrency):
  grpc-noop      a no-op unary call on a Unix socket, grpcio's synchronous server (grpc figures)
  grpc-aio-noop  the same no-op in the guardian's server model (grpc.aio, stream-unary, a worker hop):
                 divides no figure, bounds them
  mcp+grpc-noop  an MCP tool on the same SDK and transport that makes one no-op gRPC call over a
                 Unix socket to another process (stdio and http figures)
  sqlcipher-*    the operation's bare SQL on a SQLCipher table of the same size (db ratio)
  ratio = figure ops/s / floor ops/s; CPU ms per call of each process is in the table and the JSON.
  A target may print "at best X here": the best its figure could be on this stack, from the floors
  of the same run (which ones, it says); "out of reach" when X itself misses the target.

output: the table and the targets (issues 5, 15, 19) on stdout, progress on stderr, every figure in the JSON.
exit status: 0 every call succeeded and every check held; 1 otherwise (e.g. calls past a deadline);
             2 bad options. The JSON is written in every case but 2.

examples:
  python -m bench --quick --json /tmp/smoke.json        the smoke profile (seconds)
  python -m bench                                       1k and 100k memories, 1 and 16 clients (minutes)
  python -m bench --million --clients 1                 adds 1M memories (prefilled directly)
  python -m bench --sizes 100000 --transports grpc --duration 10
  python -m bench --profile --sizes 100000 --clients 1   where the guardian's CPU goes, by stage
  make bench BENCH_ARGS='--million'
  make profile
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark agent-guardian (store, store_batch, get, search, list) over direct gRPC, "
        "the MCP gateway on stdio and on streamable HTTP, against floors measured in the same run.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", type=_int_list, default=None, help="memories to prefill, e.g. 1000,100000 (default)")
    parser.add_argument("--million", action="store_true", help="also measure at 1,000,000 memories")
    parser.add_argument("--clients", type=_int_list, default=None, help="concurrent clients, e.g. 1,16 (default)")
    parser.add_argument(
        "--transports", type=_transports, default=TRANSPORTS, help="some of grpc,stdio,http (default: all)"
    )
    parser.add_argument("--duration", type=float, default=3.0, help="seconds to time each operation (default 3)")
    parser.add_argument("--ops", type=int, default=None, help="time this many calls per operation instead")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of untimed calls first (default 0.5)")
    parser.add_argument(
        "--prefill",
        choices=("auto", "grpc", "direct"),
        default="auto",
        help=f"grpc: StoreBatch; direct: the guardian's own modules while it is stopped; "
        f"auto: grpc up to {DIRECT_PREFILL_ABOVE} memories, direct above",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON (default: %(default)s)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke profile: 200 memories, 1 and 2 clients, 8 calls per operation (seconds in all)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="the guardian times each pipeline stage (tracing.profile_stages): its CPU per call by stage is "
        "printed beside the figures and written to the JSON (costs the guardian a few microseconds a call)",
    )
    return parser


def parse_options(argv: Sequence[str] | None) -> Options:
    """Options from the command line (exits with status 2 on a bad one)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or (args.ops is not None and args.ops < 1):
        parser.error("--duration must be above 0, --warmup at least 0 and --ops at least 1")
    if args.quick:
        sizes = args.sizes or (200,)
        clients = args.clients or (1, 2)
        budget = Budget(duration_s=args.duration, ops=args.ops or 8, warmup_s=0.0, warmup_ops=2)
    else:
        sizes = args.sizes or (1_000, 100_000)
        clients = args.clients or (1, 16)
        budget = Budget(duration_s=args.duration, ops=args.ops, warmup_s=args.warmup)
    if args.million and 1_000_000 not in sizes:
        sizes = (*sizes, 1_000_000)
    return Options(
        sizes=tuple(sorted(set(sizes))),
        clients=tuple(sorted(set(clients))),
        transports=args.transports,
        budget=budget,
        json_path=args.json,
        prefill=args.prefill,
        quick=args.quick,
        profile=args.profile,
    )
