"""The MCP floor: a server on the same SDK with one tool that does nothing.

``python -m bench.noop_server --transport stdio`` or ``--transport http --port PORT``.
It is served the way ``agent-gateway`` serves its tools: ``MCPServer``, the
SDK's stdio transport or its streamable HTTP app (``/mcp``, DNS-rebinding
protection on, the same defaults) under uvicorn with the gateway's settings.
The only difference a client can time is the work behind the tool.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Sequence
from typing import Final

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

__all__ = ["NOOP_TOOL", "build_noop_server", "main"]

NOOP_TOOL: Final = "noop"
_PATH: Final = "/mcp"


def build_noop_server() -> MCPServer:
    """An MCP server whose one tool returns a constant."""
    server = MCPServer("bench-noop", instructions="A benchmark floor: one tool that does nothing.")

    @server.tool(name=NOOP_TOOL, description="Does nothing and returns 'ok'.", structured_output=True)
    def noop() -> str:
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


async def _serve_http(port: int) -> None:
    server = build_noop_server()
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.transport == "http":
        asyncio.run(_serve_http(args.port))
    else:
        asyncio.run(build_noop_server().run_stdio_async())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
