"""The guardian's two gRPC servers: the agent service on agent.sock, the
admin service on admin.sock, the gRPC health service on both.

Each service is registered only on its own socket, from its dispatch table;
a call to any other method is audited and answered UNIMPLEMENTED. Requests
that do not parse reach the pipeline as :class:`Malformed`, so they too are
refused with INVALID_ARGUMENT and audited.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from guardian.admin_service import AdminHandlers
from guardian.agent_service import AgentHandlers
from guardian.config import SocketConfig
from guardian.core import GuardianCore
from guardian.pipeline import ADMIN_CALLER, ADMIN_RULES, AGENT_RULES, Malformed, Pipeline, Rule
from guardian.sockets import prepare_socket_dir, remove_stale_socket, secure_socket
from shared.errors import InternalError
from shared.rpc.guardian.v1 import admin_pb2, agent_pb2

__all__ = ["GuardianServer"]

log = logging.getLogger("agent_guardian")

_WORKERS = 8


class _RefuseUnknown(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The last handler on each server: audits and refuses any method not served there."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = str(handler_call_details.method)

        def refuse(request: bytes, context: grpc.ServicerContext) -> None:
            try:
                self._pipeline.refuse_unknown(method, request)
            except Exception:
                log.exception("could not audit a call to an unknown method")
                context.abort(grpc.StatusCode.INTERNAL, "internal error")
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no such method on this socket")

        return grpc.unary_unary_rpc_method_handler(refuse)


def _parser(message_class: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return message_class.FromString(data)
        except DecodeError:
            return Malformed(data)

    return parse


def _service_handler(
    module: ModuleType, service_name: str, rules: dict[str, Rule], handlers: object, pipeline: Pipeline
) -> grpc.GenericRpcHandler[Any, Any]:
    """Build a service's handler from the proto descriptor and its dispatch table, which must agree."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    if set(service.methods_by_name) != set(rules):
        raise InternalError(f"the dispatch table of {service_name} does not match the proto")
    methods: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = getattr(module, method.input_type.name)
        response_class = getattr(module, method.output_type.name)
        handler = getattr(handlers, method.name)

        def behaviour(
            request: Any,
            context: grpc.ServicerContext,
            name: str = method.name,
            handler: Any = handler,
            response_class: type[Message] = response_class,
        ) -> Any:
            return pipeline.run(name, request, context, handler, response_class)

        methods[method.name] = grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, methods)


class GuardianServer:
    """Binds, serves and stops the two sockets."""

    def __init__(self, core: GuardianCore) -> None:
        self._core = core
        self._health = health.HealthServicer()
        self._servers: list[grpc.Server] = []
        config = core.config
        agent_pipeline = Pipeline(core, AGENT_RULES)
        admin_pipeline = Pipeline(core, ADMIN_RULES, caller=ADMIN_CALLER)
        self._plan: list[tuple[SocketConfig, str, grpc.GenericRpcHandler[Any, Any], Pipeline]] = [
            (
                config.agent_socket,
                "guardian.v1.AgentService",
                _service_handler(agent_pb2, "AgentService", AGENT_RULES, AgentHandlers(core), agent_pipeline),
                agent_pipeline,
            ),
            (
                config.admin_socket,
                "guardian.v1.AdminService",
                _service_handler(admin_pb2, "AdminService", ADMIN_RULES, AdminHandlers(core), admin_pipeline),
                admin_pipeline,
            ),
        ]

    def start(self) -> None:
        """Bind both sockets, secure them, and start serving."""
        config = self._core.config
        prepare_socket_dir(config.socket_dir, config.socket_dir_mode)
        # A request can hold max_batch drafts of max_content_bytes each, plus metadata and framing.
        max_message = 64 * 1024 * 1024
        old_umask = os.umask(0o177)  # the socket is created 0600, then opened up to its configured mode
        try:
            for socket_config, service_name, handler, pipeline in self._plan:
                remove_stale_socket(socket_config.path)
                server = grpc.server(
                    ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix=service_name.split(".")[-1]),
                    options=[("grpc.max_receive_message_length", max_message), ("grpc.so_reuseport", 0)],
                    maximum_concurrent_rpcs=256,
                )
                server.add_generic_rpc_handlers((handler,))
                health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
                server.add_generic_rpc_handlers((_RefuseUnknown(pipeline),))
                server.add_insecure_port(f"unix:{socket_config.path}")
                server.start()
                self._servers.append(server)
                secure_socket(socket_config)
                self._health.set(service_name, health_pb2.HealthCheckResponse.SERVING)
        finally:
            os.umask(old_umask)
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "guardian serving",
            extra={
                "event": "serving",
                "agent_socket": str(config.agent_socket.path),
                "admin_socket": str(config.admin_socket.path),
                "policy_version": self._core.policy.version,
            },
        )

    def set_serving(self, serving: bool) -> None:
        """Report both services (and the server as a whole) as SERVING or NOT_SERVING."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for _, service_name, _, _ in self._plan:
            self._health.set(service_name, status)
        self._health.set("", status)

    def stop(self, grace_s: float) -> None:
        """Stop accepting calls, let in-flight ones finish within grace_s, then stop."""
        self._health.enter_graceful_shutdown()
        events = [server.stop(grace_s) for server in self._servers]
        for event in events:
            event.wait(grace_s + 5)
        for socket_config, *_ in self._plan:
            with contextlib.suppress(FileNotFoundError):
                socket_config.path.unlink()
        self._servers.clear()
