"""The gRPC floors: a method that does nothing, on a Unix socket, in one of two server models.

``python -m bench.noop_grpc --socket PATH [--model sync|guardian]``

- ``sync`` (the ``grpc-noop`` floor beside every gRPC figure): grpcio's cheapest
  server, a synchronous unary method on a thread pool. What it costs is what any
  Python gRPC server costs a call.
- ``guardian`` (the ``grpc-aio-noop`` floor): the guardian's own server model
  (guardian/daemon/server.py) with the pipeline left out: a ``grpc.aio`` server
  with the guardian's options, a stream-unary method whose one message is read by
  the guardian's ``arrived_request`` on the event loop, then a hop to a worker
  pool of the agent socket's size. That model is what lets the guardian audit a
  call that carries no message and keep stalled streams from holding a thread
  (tests/security); what it costs above ``sync`` is the price of those two.

Requests and responses are raw bytes (no protobuf work), so what a client times
is gRPC and the server model.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import Any, Final

import grpc
import grpc.aio

from guardian.daemon.server import MAX_CONCURRENT_RPCS, SERVER_OPTIONS, WORKERS, arrived_request

__all__ = ["CHANNEL_OPTIONS", "MODELS", "NOOP_METHOD", "main"]

NOOP_METHOD: Final = "/bench.v1.Noop/Call"
#: The gateway's channel options (gateway/client.py), so the bench's clients connect the same way.
CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
#: The server models, by --model.
MODELS: Final = ("sync", "guardian")
_SERVICE: Final = "bench.v1.Noop"


def _noop(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b""


def _serve_sync(socket_path: str, stop: threading.Event) -> None:
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS["agent"], thread_name_prefix="Noop"),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
    )
    method = grpc.unary_unary_rpc_method_handler(_noop)  # bytes in, bytes out: no (de)serializers
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {"Call": method}),))
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    stop.wait()
    server.stop(1).wait(5)


async def _serve_guardian_model(socket_path: str, stop: threading.Event) -> None:
    pool = ThreadPoolExecutor(max_workers=WORKERS["agent"], thread_name_prefix="agent-worker")
    loop = asyncio.get_running_loop()

    async def behaviour(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await arrived_request(requests)
        await loop.run_in_executor(pool, lambda: None)  # where the guardian's pipeline would run
        return b""

    server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    method = grpc.stream_unary_rpc_method_handler(behaviour)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {"Call": method}),))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    await asyncio.to_thread(stop.wait)
    await server.stop(1)
    pool.shutdown(wait=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m bench.noop_grpc", description=__doc__)
    parser.add_argument("--socket", required=True, help="absolute path of the Unix socket to bind")
    parser.add_argument("--model", choices=MODELS, default="sync", help="the server model (default sync)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    if args.model == "sync":
        _serve_sync(args.socket, stop)
    else:
        asyncio.run(_serve_guardian_model(args.socket, stop))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
