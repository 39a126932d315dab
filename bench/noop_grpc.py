"""The gRPC floor: a unary method that does nothing, served like the guardian serves its agent socket.

``python -m bench.noop_grpc --socket PATH``. The same server settings as
``guardian.daemon.server``: a thread pool of the guardian's size, the same
``maximum_concurrent_rpcs`` and channel options, a filesystem Unix socket.
Requests and responses are raw bytes (no protobuf work), so what a client
times is gRPC itself.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, Final

import grpc

__all__ = ["CHANNEL_OPTIONS", "NOOP_METHOD", "main"]

NOOP_METHOD: Final = "/bench.v1.Noop/Call"
#: The gateway's channel options (gateway/client.py), so the bench's clients connect the same way.
CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
#: guardian/daemon/server.py: _WORKERS, maximum_concurrent_rpcs and the options it passes.
WORKERS: Final = 8
MAX_CONCURRENT_RPCS: Final = 256
_OPTIONS: Final = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.so_reuseport", 0)]


def _noop(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b""


def _handler() -> grpc.GenericRpcHandler[Any, Any]:
    method = grpc.unary_unary_rpc_method_handler(_noop)  # bytes in, bytes out: no (de)serializers
    return grpc.method_handlers_generic_handler("bench.v1.Noop", {"Call": method})


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m bench.noop_grpc", description=__doc__)
    parser.add_argument("--socket", required=True, help="absolute path of the Unix socket to bind")
    args = parser.parse_args(argv)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="Noop"),
        options=_OPTIONS,
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    server.add_generic_rpc_handlers((_handler(),))
    server.add_insecure_port(f"unix:{args.socket}")
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server.start()
    stop.wait()
    server.stop(1).wait(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
