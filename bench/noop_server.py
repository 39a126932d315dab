"""The MCP floor: a server on the same SDK with one tool that does nothing but one no-op gRPC call.

``python -m bench.noop_server --transport stdio --grpc-socket PATH`` or ``--transport http
--port PORT --grpc-socket PATH``. It is served the way ``agent-gateway`` serves its tools:
``MCPServer``, the SDK's stdio transport or its streamable HTTP app (``/mcp``,
DNS-rebinding protection on, the same defaults) under uvicorn with the gateway's
settings. Its tool makes one no-op unary call on a ``grpc.aio`` channel to the
gRPC floor's server (bench/noop_grpc.py) at PATH, as a gateway tool makes one call to
the guardian: the floor this design imposes. Without ``--grpc-socket`` the tool
returns at once (the MCP SDK alone). The only difference a client can time is the
work behind the tool.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Final

import grpc.aio
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from bench.noop_grpc import CHANNEL_OPTIONS, NOOP_METHOD

__all__ = ["NOOP_TOOL", "build_noop_server", "main"]

NOOP_TOOL: Final = "noop"
_GRPC_DEADLINE_S: Final = 30.0
_PATH: Final = "/mcp"


def build_noop_server(grpc_socket: str = "") -> MCPServer:
    """An MCP server whose one tool makes one no-op gRPC call to grpc_socket (none when "") and returns a constant."""
    server = MCPServer("bench-noop", instructions="A benchmark floor: one tool that does nothing.")
    channels: list[grpc.aio.Channel] = []  # made in the server's event loop, at the first call

    @server.tool(name=NOOP_TOOL, description="Does nothing and returns 'ok'.", structured_output=True)
    async def noop() -> str:
        if grpc_socket:
            if not channels:
                channels.append(grpc.aio.insecure_channel(f"unix:{grpc_socket}", options=CHANNEL_OPTIONS))
            method = channels[0].unary_unary(NOOP_METHOD, request_serializer=None, response_deserializer=None)
            await method(b"", timeout=_GRPC_DEADLINE_S)
        return "ok"

    return server


def _security(port: int) -> TransportSecuritySettings:
    """The gateway's rebinding rules: 127.0.0.1 and localhost on the bound port."""
    allowed = [f"127.0.0.1:{port}", f"localhost:{port}"]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=allowed,
        allowed_origins=[f"http://{host}" for host in allowed],
    )


async def _serve_http(port: int, grpc_socket: str) -> None:
    server = build_noop_server(grpc_socket)
    app = server.streamable_http_app(streamable_http_path=_PATH, transport_security=_security(port), host="127.0.0.1")
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        lifespan="on",
    )
    await uvicorn.Server(config).serve()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the no-op tool until stdin closes (stdio) or SIGTERM (http)."""
    parser = argparse.ArgumentParser(prog="python -m bench.noop_server", description=__doc__)
    parser.add_argument("--transport", choices=("stdio", "http"), required=True)
    parser.add_argument("--port", type=int, default=0, help="HTTP: port on 127.0.0.1")
    parser.add_argument("--grpc-socket", default="", help="the gRPC floor's socket (bench.noop_grpc) the tool calls")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.transport == "http":
        asyncio.run(_serve_http(args.port, args.grpc_socket))
    else:
        asyncio.run(build_noop_server(args.grpc_socket).run_stdio_async())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
