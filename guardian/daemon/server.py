"""The guardian's two gRPC servers: the agent service on agent.sock, the
admin service on admin.sock, each with a gRPC health service of its own.

Each service is registered only on its own socket, from its dispatch table;
a call to any other method is audited and answered UNIMPLEMENTED. Every
method takes its request as raw bytes and must carry exactly one message,
within :data:`MAX_REQUEST_BYTES`, arriving within :data:`ARRIVAL_TIMEOUT_S`;
anything else (bytes that do not parse, no message, two, too large, too
slow) reaches the pipeline as :class:`~guardian.service.pipeline.Malformed` and is
refused with INVALID_ARGUMENT and audited.

The servers are ``grpc.aio`` servers on an event loop thread of their own:
waiting for a request's bytes holds no thread, so clients that open streams
and stall cannot take the workers from everyone else. Only a request that
has fully arrived goes to the socket's worker pool, where the pipeline runs
it (synchronously: SQLite, the filters and the HMACs); its audit row is
written even if the client hangs up meanwhile.

What gRPC itself refuses before the guardian sees a request cannot be
audited: a message over the transport limit (:data:`TRANSPORT_LIMIT_BYTES`,
RESOURCE_EXHAUSTED), and connections that never finish the HTTP/2 handshake
(closed after :data:`HANDSHAKE_TIMEOUT_MS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import _async as health_aio  # the aio HealthServicer (health.aio re-exports it untyped)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardian.daemon.sockets import prepare_socket_dir, secure_socket
from guardian.service.call import Malformed, Rule
from guardian.service.pipeline import ADMIN_CALLER, Pipeline
from guardian.service.rules import ADMIN_RULES, AGENT_RULES
from guardian.service.status import abort_with
from guardian.state.config import SocketConfig
from guardian.state.core import GuardianCore
from shared.errors import GuardianError, InternalError
from shared.rpc.guardian.v1 import admin_pb2, agent_pb2
from shared.unix_socket import remove_stale_socket

__all__ = [
    "ARRIVAL_TIMEOUT_S",
    "MAX_CONCURRENT_RPCS",
    "MAX_REQUEST_BYTES",
    "SERVER_OPTIONS",
    "TRANSPORT_LIMIT_BYTES",
    "WORKERS",
    "GuardianServer",
    "arrived_request",
]

log = logging.getLogger("agent_guardian")

#: The largest request the guardian reads (a batch of the largest memories policy limits allow fits).
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024
#: gRPC's own limit, above MAX_REQUEST_BYTES so that a request just over it is still audited.
TRANSPORT_LIMIT_BYTES: Final = MAX_REQUEST_BYTES + 4 * 1024 * 1024
#: How long a request's message may take to arrive once its call has begun.
ARRIVAL_TIMEOUT_S: Final = 10.0
HANDSHAKE_TIMEOUT_MS: Final = 10_000
#: Each server's channel options.
SERVER_OPTIONS: Final = (
    ("grpc.max_receive_message_length", TRANSPORT_LIMIT_BYTES),
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 128),
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
)
#: Calls a server holds at once (each waiting for its message holds no thread).
MAX_CONCURRENT_RPCS: Final = 4096
#: Worker threads running the pipeline, per socket.
WORKERS: Final = {"agent": 8, "admin": 4}
_START_TIMEOUT_S: Final = 30.0

T = TypeVar("T")


@dataclass(frozen=True)
class _Socket:
    """One server: its socket, its service, its pipeline and workers."""

    kind: str
    config: SocketConfig
    service_name: str
    module: ModuleType
    rules: dict[str, Rule]
    pipeline: Pipeline


async def _one_message(requests: AsyncIterator[bytes]) -> bytes | Malformed:
    """The call's only message, or Malformed when it carries none or more than one."""
    messages: list[bytes] = []
    async for data in requests:
        messages.append(data)
        if len(messages) > 1:
            return Malformed(messages[0], "a call must carry exactly one request message")
    if not messages:
        return Malformed(b"", "a call must carry exactly one request message")
    return messages[0]


async def arrived_request(requests: AsyncIterator[bytes]) -> bytes | Malformed:
    """The call's one message, read within ARRIVAL_TIMEOUT_S, else Malformed saying what was wrong."""
    try:
        async with asyncio.timeout(ARRIVAL_TIMEOUT_S):  # no task of its own, unlike wait_for
            return await _one_message(requests)
    except TimeoutError:
        return Malformed(b"", f"the request did not arrive within {ARRIVAL_TIMEOUT_S:.0f} s")


def _parse(message_class: type[Message], data: bytes | Malformed) -> Message | Malformed:
    if isinstance(data, Malformed):
        return data
    if len(data) > MAX_REQUEST_BYTES:
        return Malformed(data[:4096], f"the request is over the limit of {MAX_REQUEST_BYTES} bytes")
    try:
        return message_class.FromString(data)
    except DecodeError:
        return Malformed(data)


class GuardianServer:
    """Binds, serves and stops the two sockets."""

    def __init__(self, core: GuardianCore) -> None:
        self._core = core
        config = core.config
        self._sockets = [
            _Socket(
                "agent",
                config.agent_socket,
                "AgentService",
                agent_pb2,
                AGENT_RULES,
                Pipeline(core, AGENT_RULES),
            ),
            _Socket(
                "admin",
                config.admin_socket,
                "AdminService",
                admin_pb2,
                ADMIN_RULES,
                Pipeline(core, ADMIN_RULES, caller=ADMIN_CALLER),
            ),
        ]
        for socket in self._sockets:
            service = socket.module.DESCRIPTOR.services_by_name[socket.service_name]
            if set(service.methods_by_name) != set(socket.rules):
                raise InternalError(f"the dispatch table of {socket.service_name} does not match the proto")
        self._pools = {
            kind: ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{kind}-worker")
            for kind, workers in WORKERS.items()
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._servers: list[grpc.aio.Server] = []
        self._health: list[tuple[health_aio.HealthServicer, str]] = []

    # -- running coroutines on the server's loop, from the main thread ----------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout_s: float = _START_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def start(self) -> None:
        """Bind both sockets, secure them, and start serving."""
        config = self._core.config
        prepare_socket_dir(config.socket_dir, config.socket_dir_mode)
        self._thread.start()
        self._run(self._start())
        log.info(
            "guardian serving",
            extra={
                "event": "serving",
                "agent_socket": str(config.agent_socket.path),
                "admin_socket": str(config.admin_socket.path),
                "policy_version": self._core.policy.version,
            },
        )

    async def _start(self) -> None:
        old_umask = os.umask(0o177)  # the socket is created 0600, then opened up to its configured mode
        try:
            for socket in self._sockets:
                remove_stale_socket(socket.config.path, "guardian")
                server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
                server.add_generic_rpc_handlers((self._service_handler(socket),))
                health = health_aio.HealthServicer()
                health_pb2_grpc.add_HealthServicer_to_server(health, server)
                server.add_generic_rpc_handlers((_RefuseUnknown(socket.pipeline, self._pools[socket.kind]),))
                server.add_insecure_port(f"unix:{socket.config.path}")
                await server.start()
                self._servers.append(server)
                secure_socket(socket.config)
                full_name = f"guardian.v1.{socket.service_name}"
                self._health.append((health, full_name))
                await health.set(full_name, health_pb2.HealthCheckResponse.SERVING)
                await health.set("", health_pb2.HealthCheckResponse.SERVING)
        finally:
            os.umask(old_umask)

    def _service_handler(self, socket: _Socket) -> grpc.GenericRpcHandler[Any, Any]:
        """The service's methods from the proto descriptor, each run through the pipeline."""
        service = socket.module.DESCRIPTOR.services_by_name[socket.service_name]
        pool = self._pools[socket.kind]
        methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in service.methods:
            request_class = getattr(socket.module, method.input_type.name)
            response_class = getattr(socket.module, method.output_type.name)

            async def behaviour(
                requests: AsyncIterator[bytes],
                context: grpc.aio.ServicerContext[Any, Any],
                *,
                name: str = method.name,
                request_class: type[Message] = request_class,
                response_class: type[Message] = response_class,
            ) -> Message:
                arrived = await arrived_request(requests)
                request = _parse(request_class, arrived)
                data = arrived.data if isinstance(arrived, Malformed) else arrived
                metadata = tuple(context.invocation_metadata() or ())
                serve = functools.partial(socket.pipeline.run, name, request, metadata, response_class, data)
                try:
                    response: Message = await _in_pool(pool, serve)
                except GuardianError as error:
                    await abort_with(context, error)
                return response

            # stream-unary on raw bytes: the guardian, not gRPC, decides what "one message" is.
            methods[method.name] = grpc.stream_unary_rpc_method_handler(
                behaviour, request_deserializer=None, response_serializer=response_class.SerializeToString
            )
        return grpc.method_handlers_generic_handler(service.full_name, methods)

    def set_serving(self, serving: bool) -> None:
        """Report each service (and each server as a whole) as SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def apply() -> None:
            for health, full_name in self._health:
                await health.set(full_name, status)
                await health.set("", status)

        self._run(apply())

    def stop(self, grace_s: float) -> None:
        """Stop accepting calls, let in-flight ones finish within grace_s, then stop."""
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._run(self._stop(grace_s), timeout_s=grace_s + 10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=False)
        for socket in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                socket.config.path.unlink()

    async def _stop(self, grace_s: float) -> None:
        for health, _ in self._health:
            await health.enter_graceful_shutdown()
        await asyncio.gather(*(server.stop(grace_s) for server in self._servers))
        self._servers.clear()


def _in_pool(pool: ThreadPoolExecutor, work: functools.partial[T]) -> Awaitable[T]:
    return asyncio.get_running_loop().run_in_executor(pool, work)


class _RefuseUnknown(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The last handler on each server: audits and refuses any method not served there."""

    def __init__(self, pipeline: Pipeline, pool: ThreadPoolExecutor) -> None:
        self._pipeline = pipeline
        self._pool = pool

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = str(handler_call_details.method)

        async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> None:
            arrived = await arrived_request(requests)
            data = arrived.data if isinstance(arrived, Malformed) else arrived
            try:
                await _in_pool(self._pool, functools.partial(self._pipeline.refuse_unknown, method, data[:4096]))
            except Exception:
                log.exception("could not audit a call to an unknown method")
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no such method on this socket")

        return grpc.stream_unary_rpc_method_handler(refuse)
