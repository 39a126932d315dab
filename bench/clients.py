"""The clients the bench times: one per concurrent caller, each with the five operations.

- :class:`GrpcAgentClient`: the agent service on its own ``grpc.aio`` channel and
  guardian session (what one gateway process does, minus MCP).
- :class:`McpAgentClient`: the real MCP client (``mcp.Client``) calling the gateway's tools.
- :func:`grpc_noop_call` and :func:`mcp_noop_call`: the floors, through the same
  client code as the figures they stand beside.

:func:`mcp_clients` enters many ``mcp.Client`` at once. Each is entered and left
by a task of its own (the SDK's transports use anyio task groups, which must be
left by the task that entered them); calls may come from any task.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from bench.corpus import LIST_DEPTH, LIST_PAGE_SIZE, SEARCH_LIMIT, Corpus, MemoryText
from bench.load import AsyncCall
from bench.noop_grpc import CHANNEL_OPTIONS, NOOP_METHOD
from bench.noop_server import NOOP_TOOL
from bench.procs import ROOT, RUN_ENV, run_id
from shared.rpc.guardian.v1 import agent_pb2 as pb
from shared.rpc.guardian.v1 import agent_pb2_grpc as pb_grpc

__all__ = [
    "OPERATIONS",
    "Acks",
    "CallFailed",
    "GrpcAgentClient",
    "McpAgentClient",
    "grpc_agent_clients",
    "grpc_noop_calls",
    "http_client_opener",
    "mcp_clients",
    "mcp_noop_call",
    "stdio_opener",
]

#: The operations measured, in the order the report lists them.
OPERATIONS: Final = ("store", "store_batch", "get", "search", "search_common", "list")
_DEADLINE_S: Final = 60.0
_START_TIMEOUT_S: Final = 180.0


class CallFailed(Exception):
    """A call the server answered with an error (a tool error, or a reply that does not fit)."""


@dataclass
class Acks:
    """Writes the guardian acknowledged, to check afterwards that each is stored and audited."""

    store_calls: int = 0
    batch_calls: int = 0
    memories: int = 0


def _draft(text: MemoryText) -> pb.MemoryDraft:
    return pb.MemoryDraft(content=text.content, tags=text.tags, metadata_json=json.dumps(text.metadata))


class GrpcAgentClient:
    """One direct client of the agent service: its own channel and guardian session."""

    def __init__(self, channel: grpc.aio.Channel, session_id: str, corpus: Corpus, acks: Acks) -> None:
        self._stub = pb_grpc.AgentServiceStub(channel)
        self._session = session_id
        self._corpus = corpus
        self._acks = acks
        self._cursor = ""
        self._pages = 0

    async def store(self) -> None:
        """Store one memory."""
        text = self._corpus.memory(self._acks.memories)
        await self._stub.Store(pb.StoreRequest(session_id=self._session, memory=_draft(text)), timeout=_DEADLINE_S)
        self._acks.store_calls += 1
        self._acks.memories += 1

    async def store_batch(self) -> None:
        """Store one batch."""
        drafts = [_draft(text) for text in self._corpus.batch(self._acks.memories)]
        request = pb.StoreBatchRequest(session_id=self._session, memories=drafts)
        reply = await self._stub.StoreBatch(request, timeout=_DEADLINE_S)
        self._acks.batch_calls += 1
        self._acks.memories += len(reply.memories)

    async def get(self) -> None:
        """Get one prefilled memory by id."""
        await self._stub.Get(pb.GetRequest(session_id=self._session, id=self._corpus.memory_id()), timeout=_DEADLINE_S)

    async def search(self) -> None:
        """Search for a few words."""
        request = pb.SearchRequest(session_id=self._session, query=self._corpus.query(), limit=SEARCH_LIMIT)
        await self._stub.Search(request, timeout=_DEADLINE_S)

    async def search_common(self) -> None:
        """Search for words every memory holds."""
        request = pb.SearchRequest(session_id=self._session, query=self._corpus.common_query(), limit=SEARCH_LIMIT)
        await self._stub.Search(request, timeout=_DEADLINE_S)

    async def list(self) -> None:
        """The next page (following the cursor LIST_DEPTH pages deep, then from the newest again)."""
        request = pb.ListRequest(session_id=self._session, page_size=LIST_PAGE_SIZE, cursor=self._cursor)
        reply = await self._stub.List(request, timeout=_DEADLINE_S)
        self._pages += 1
        self._cursor = reply.next_cursor if self._pages < LIST_DEPTH else ""
        if not self._cursor:
            self._pages = 0


def _text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)[:300]


class McpAgentClient:
    """One MCP client session calling the gateway's memory tools."""

    def __init__(self, client: Client, corpus: Corpus, acks: Acks) -> None:
        self._client = client
        self._corpus = corpus
        self._acks = acks
        self._cursor: str | None = None
        self._pages = 0

    async def _call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        result = await self._client.call_tool(tool, arguments)
        if result.is_error or not isinstance(result.structured_content, dict):
            raise CallFailed(f"{tool}: {_text_of(result)}")
        return result.structured_content

    async def store(self) -> None:
        """memory_store."""
        text = self._corpus.memory(self._acks.memories)
        await self._call("memory_store", {"content": text.content, "tags": list(text.tags), "metadata": text.metadata})
        self._acks.store_calls += 1
        self._acks.memories += 1

    async def store_batch(self) -> None:
        """memory_store_batch."""
        batch = [
            {"content": text.content, "tags": list(text.tags), "metadata": text.metadata}
            for text in self._corpus.batch(self._acks.memories)
        ]
        reply = await self._call("memory_store_batch", {"memories": batch})
        self._acks.batch_calls += 1
        self._acks.memories += len(reply["memories"])

    async def get(self) -> None:
        """memory_get."""
        await self._call("memory_get", {"id": self._corpus.memory_id()})

    async def search(self) -> None:
        """memory_search."""
        await self._call("memory_search", {"query": self._corpus.query(), "limit": SEARCH_LIMIT})

    async def search_common(self) -> None:
        """memory_search for words every memory holds."""
        await self._call("memory_search", {"query": self._corpus.common_query(), "limit": SEARCH_LIMIT})

    async def list(self) -> None:
        """memory_list, following next_cursor like GrpcAgentClient.list."""
        reply = await self._call("memory_list", {"page_size": LIST_PAGE_SIZE, "cursor": self._cursor})
        self._pages += 1
        self._cursor = reply.get("next_cursor") if self._pages < LIST_DEPTH else None
        if not self._cursor:
            self._pages = 0


def mcp_noop_call(client: Client) -> AsyncCall:
    """A call of the no-op tool through client."""

    async def call() -> None:
        result = await client.call_tool(NOOP_TOOL, {})
        if result.is_error:
            raise CallFailed(f"{NOOP_TOOL}: {_text_of(result)}")

    return call


@asynccontextmanager
async def grpc_agent_clients(
    socket_path: Path, token: str, count: int, corpus: Corpus, acks: Acks
) -> AsyncIterator[list[GrpcAgentClient]]:
    """count direct clients, each on its own channel and guardian session (closed on exit)."""
    channels = [grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS) for _ in range(count)]
    sessions: list[tuple[pb_grpc.AgentServiceAsyncStub, str]] = []
    try:
        for channel in channels:
            stub = pb_grpc.AgentServiceStub(channel)
            opened = await stub.OpenSession(pb.OpenSessionRequest(agent_token=token), timeout=_DEADLINE_S)
            sessions.append((stub, opened.session_id))
        yield [
            GrpcAgentClient(channel, session_id, corpus, acks)
            for channel, (_, session_id) in zip(channels, sessions, strict=True)
        ]
    finally:
        for stub, session_id in sessions:
            with suppress(grpc.aio.AioRpcError):
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=5)
        for channel in channels:
            await channel.close(grace=None)


@asynccontextmanager
async def grpc_noop_calls(socket_path: Path, count: int) -> AsyncIterator[list[AsyncCall]]:
    """count no-op callers of the gRPC floor server, each on its own channel."""
    channels = [grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS) for _ in range(count)]
    try:
        calls: list[AsyncCall] = []
        for channel in channels:
            method = channel.unary_unary(NOOP_METHOD, request_serializer=None, response_deserializer=None)

            async def call(method: Any = method) -> None:
                await method(b"", timeout=_DEADLINE_S)

            calls.append(call)
        yield calls
    finally:
        for channel in channels:
            await channel.close(grace=None)


ClientOpener = Callable[[], AbstractAsyncContextManager[Client]]


def _shell_wrapped(
    argv: Sequence[str], env: dict[str, str], pid_file: Path, stderr_file: Path
) -> StdioServerParameters:
    """argv run through /bin/sh, which notes its PID (exec keeps it) and sends stderr to a file."""
    return StdioServerParameters(
        command="/bin/sh",
        args=["-c", 'echo $$ >"$BENCH_PID_FILE"; exec "$@" 2>>"$BENCH_STDERR"', "bench-child", *argv],
        env={
            **env,
            "BENCH_PID_FILE": str(pid_file),
            "BENCH_STDERR": str(stderr_file),
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            RUN_ENV: run_id(),
        },
        cwd=str(ROOT),
    )


def stdio_opener(
    server: str, pid_file: Path, stderr_file: Path, *, socket_path: Path | None = None, token: str = ""
) -> ClientOpener:
    """Opens an MCP client on a new stdio server process: ``gateway`` (on the guardian's socket_path) or ``noop``
    (whose tool calls the gRPC floor at socket_path, when given)."""
    if server == "gateway":
        if socket_path is None or not token:
            raise ValueError("a stdio gateway needs the agent socket and a token")
        argv = [sys.executable, "-m", "gateway.cli", "--transport", "stdio", "--socket", str(socket_path)]
        env = {"AGENT_GUARDIAN_TOKEN": token}
    else:
        argv = [sys.executable, "-m", "bench.noop_server", "--transport", "stdio"]
        argv += ["--grpc-socket", str(socket_path)] if socket_path is not None else []
        env = {}
    params = _shell_wrapped(argv, env, pid_file, stderr_file)

    def opener() -> AbstractAsyncContextManager[Client]:
        return Client(params)

    return opener


def http_client_opener(url: str, token: str = "") -> ClientOpener:
    """Opens an MCP client session on a streamable HTTP server (with a bearer token when given)."""

    @asynccontextmanager
    async def opener() -> AsyncIterator[Client]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            httpx2.AsyncClient(headers=headers, timeout=_DEADLINE_S) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            yield client

    return opener


@asynccontextmanager
async def mcp_clients(openers: Sequence[ClientOpener]) -> AsyncIterator[list[Client]]:
    """Enter one MCP client per opener, concurrently; leave them all on exit."""
    clients: list[Client | None] = [None] * len(openers)
    ready = [asyncio.Event() for _ in openers]
    release = asyncio.Event()

    async def hold(index: int) -> None:
        async with openers[index]() as client:
            clients[index] = client
            ready[index].set()
            await release.wait()

    tasks = [asyncio.create_task(hold(index)) for index in range(len(openers))]
    all_ready: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(event.wait() for event in ready)))
    watched: list[asyncio.Future[Any]] = [all_ready, *tasks]
    try:
        async with asyncio.timeout(_START_TIMEOUT_S):
            while not all_ready.done():
                await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for task in tasks:
                    if task.done():
                        task.result()  # a client that could not connect: raise why
                        raise RuntimeError("an MCP client session ended while starting")
        yield [client for client in clients if client is not None]
    finally:
        release.set()
        all_ready.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=30)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
