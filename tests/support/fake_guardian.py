"""A fake guardian for the gateway's tests, served at the real seam: gRPC on a Unix socket.

It implements the agent service over a small dict store and can simulate what
the real guardian does to a gateway: a restart (sessions forgotten, so calls get
UNAUTHENTICATED), being stopped (UNAVAILABLE), a rate limit (RESOURCE_EXHAUSTED
with ``retry-after-ms``), a refused token, and any status injected per method.

Like the guardian, it keeps memories in namespaces (each agent's own, named
after it, plus the shared ones in ``readable``/``writable``), refuses a write
into a namespace the agent may not write, and quarantines content containing
``QUARANTINE_TRIGGER``: the write's reply says "quarantined", reads never show it.

No tests here; the gateway's test modules import it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from shared.rpc.guardian.v1 import agent_pb2 as pb
from shared.rpc.guardian.v1 import agent_pb2_grpc as pb_grpc

TOKEN = "agt_" + "A" * 43
OTHER_TOKEN = "agt_" + "B" * 43
UNKNOWN_TOKEN = "agt_" + "Z" * 43
LIMITS = pb.Limits(
    max_content_bytes=4096,
    max_metadata_bytes=1024,
    max_tags=8,
    max_tag_bytes=32,
    max_batch=5,
    max_page_size=50,
    max_query_bytes=256,
    max_metadata_depth=6,
)
#: 30 days: what every fake session reports as its read window.
READ_WINDOW_MS = 30 * 86_400_000
#: Content containing this is quarantined, as the guardian's script-injection filter does.
QUARANTINE_TRIGGER = "<script>"


@dataclass
class Injected:
    code: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str], ...] = ()
    times: int = 1


@dataclass
class FakeGuardian(pb_grpc.AgentServiceServicer):
    """The agent service over dicts, with knobs for the failures a gateway must survive."""

    tokens: dict[str, str] = field(default_factory=lambda: {TOKEN: "agent-a", OTHER_TOKEN: "agent-b"})
    sessions: dict[str, str] = field(default_factory=dict)
    memories: dict[str, pb.Memory] = field(default_factory=dict)
    #: Shared namespaces each agent may read (its own namespace, named after it, comes first).
    readable: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"agent-a": ("news", "team")})
    #: Shared namespaces each agent may store into.
    writable: dict[str, frozenset[str]] = field(default_factory=lambda: {"agent-a": frozenset({"team"})})
    #: A buggy guardian: reads show quarantined memories too.
    leak_quarantined: bool = False
    calls: Counter[str] = field(default_factory=Counter)
    closed: list[str] = field(default_factory=list)
    #: The agent of every session opened, in order.
    opened: list[str] = field(default_factory=list)
    injected: dict[str, Injected] = field(default_factory=dict)
    #: The idempotency key of every Store call, in order (retries included).
    store_keys: list[str] = field(default_factory=list)
    #: Seconds each call sleeps before answering (to simulate a hung guardian).
    delay_s: float = 0.0

    def restart(self) -> None:
        """Forget every session, as a restarted guardian does (its sessions live in memory)."""
        self.sessions.clear()

    def inject(
        self,
        method: str,
        code: grpc.StatusCode,
        details: str = "",
        *,
        trailing: tuple[tuple[str, str], ...] = (),
        times: int = 1,
    ) -> None:
        """Make the next ``times`` calls of ``method`` fail with ``code``."""
        self.injected[method] = Injected(code, details, trailing, times)

    async def _enter(self, method: str, context: grpc.aio.ServicerContext[Any, Any], session_id: str | None) -> str:
        self.calls[method] += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        injected = self.injected.get(method)
        if injected is not None and injected.times > 0:
            injected.times -= 1
            if injected.trailing:
                context.set_trailing_metadata(injected.trailing)
            await context.abort(injected.code, injected.details)
        if session_id is None:
            return ""
        agent = self.sessions.get(session_id)
        if agent is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session")
        return agent

    def namespaces(self, agent: str) -> tuple[str, ...]:
        """What a session of ``agent`` reads: its own namespace first, then the shared ones."""
        return (agent, *self.readable.get(agent, ()))

    def _sees(self, agent: str, memory: pb.Memory) -> bool:
        active = memory.status == "active" or self.leak_quarantined
        return active and memory.namespace in self.namespaces(agent)

    @staticmethod
    def _status(content: str) -> str:
        return "quarantined" if QUARANTINE_TRIGGER in content else "active"

    async def _drafts(
        self, agent: str, drafts: list[pb.MemoryDraft], context: grpc.aio.ServicerContext[Any, Any]
    ) -> list[pb.Memory]:
        """Store every draft or none: a namespace the agent may not write refuses the lot."""
        for draft in drafts:
            if draft.namespace and draft.namespace not in self.writable.get(agent, frozenset()):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the policy does not allow this agent to write to namespace {draft.namespace}",
                )
        return [self._memory(agent, draft) for draft in drafts]

    def _memory(self, agent: str, draft: pb.MemoryDraft) -> pb.Memory:
        now = int(time.time() * 1000)
        memory = pb.Memory(
            id="mem_" + secrets.token_hex(16),
            content=draft.content,
            tags=list(draft.tags),
            metadata_json=draft.metadata_json,
            created_at_ms=now,
            updated_at_ms=now,
            sha256=hashlib.sha256(draft.content.encode()).hexdigest(),
            namespace=draft.namespace or agent,
            author=agent,
            status=self._status(draft.content),
        )
        self.memories[memory.id] = memory
        return memory

    async def _visible(self, agent: str, memory_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> pb.Memory:
        memory = self.memories.get(memory_id)
        if memory is None or not self._sees(agent, memory):
            await context.abort(grpc.StatusCode.NOT_FOUND, "no memory with that id")
        assert memory is not None
        return memory

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.OpenSessionResponse:
        await self._enter("OpenSession", context, None)
        agent = self.tokens.get(request.agent_token)
        if agent is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked token")
        session_id = "ses_" + secrets.token_urlsafe(24)
        self.sessions[session_id] = agent
        self.opened.append(agent)
        return pb.OpenSessionResponse(
            session_id=session_id,
            agent=agent,
            expires_at_ms=int(time.time() * 1000) + 3_600_000,
            idle_timeout_ms=600_000,
            limits=LIMITS,
            namespaces=self.namespaces(agent),
            read_window_ms=READ_WINDOW_MS,
        )

    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseSessionResponse:
        await self._enter("CloseSession", context, request.session_id)
        del self.sessions[request.session_id]
        self.closed.append(request.session_id)
        return pb.CloseSessionResponse()

    async def Store(self, request: pb.StoreRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.StoreResponse:
        self.store_keys.append(request.idempotency_key)
        agent = await self._enter("Store", context, request.session_id)
        if len(request.memory.content.encode()) > LIMITS.max_content_bytes:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "content is over 4096 bytes")
        (memory,) = await self._drafts(agent, [request.memory], context)
        return pb.StoreResponse(memory=memory)

    async def StoreBatch(
        self, request: pb.StoreBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StoreBatchResponse:
        agent = await self._enter("StoreBatch", context, request.session_id)
        if len(request.memories) > LIMITS.max_batch:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at most 5 memories per batch")
        return pb.StoreBatchResponse(memories=await self._drafts(agent, list(request.memories), context))

    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.GetResponse:
        agent = await self._enter("Get", context, request.session_id)
        return pb.GetResponse(memory=await self._visible(agent, request.id, context))

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.SearchResponse:
        agent = await self._enter("Search", context, request.session_id)
        words = request.query.lower().split()
        hits = [
            pb.SearchHit(memory=m, score=float(sum(m.content.lower().count(w) for w in words)))
            for m in self.memories.values()
            if self._sees(agent, m) and any(w in m.content.lower() for w in words)
        ]
        hits.sort(key=lambda h: -h.score)
        for rank, hit in enumerate(hits, 1):
            hit.lexical_rank = rank
        return pb.SearchResponse(hits=hits[: request.limit or LIMITS.max_page_size])

    async def List(self, request: pb.ListRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListResponse:
        agent = await self._enter("List", context, request.session_id)
        mine = [m for m in reversed(self.memories.values()) if self._sees(agent, m)]
        start = int(request.cursor) if request.cursor else 0
        size = request.page_size or LIMITS.max_page_size
        end = start + size
        return pb.ListResponse(memories=mine[start:end], next_cursor=str(end) if end < len(mine) else "")

    async def Update(self, request: pb.UpdateRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.UpdateResponse:
        agent = await self._enter("Update", context, request.session_id)
        memory = await self._visible(agent, request.id, context)
        if request.HasField("content"):
            memory.content = request.content
            memory.status = self._status(request.content)
        if request.HasField("tags"):
            memory.ClearField("tags")
            memory.tags.extend(request.tags.tags)
        if request.HasField("metadata_json"):
            memory.metadata_json = request.metadata_json
        memory.updated_at_ms += 1
        return pb.UpdateResponse(memory=memory)

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]) -> pb.DeleteResponse:
        agent = await self._enter("Delete", context, request.session_id)
        await self._visible(agent, request.id, context)
        del self.memories[request.id]
        return pb.DeleteResponse()


@contextmanager
def socket_dir() -> Iterator[str]:
    """A short temp dir (a Unix socket path must fit in 108 bytes; pytest's tmp_path may not)."""
    path = tempfile.mkdtemp(prefix="agw-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FakeGuardianServer:
    """Serves a FakeGuardian on a Unix socket; can be stopped and started again on the same path."""

    def __init__(self, path: str, fake: FakeGuardian | None = None) -> None:
        self.path = path
        self.fake = fake or FakeGuardian()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        server = grpc.aio.server()
        pb_grpc.add_AgentServiceServicer_to_server(self.fake, server)
        server.add_insecure_port(f"unix:{self.path}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


@asynccontextmanager
async def fake_guardian(fake: FakeGuardian | None = None) -> AsyncIterator[FakeGuardianServer]:
    """A running fake guardian (``fake``, or a fresh one) on a fresh socket, stopped on exit."""
    with socket_dir() as directory:
        server = FakeGuardianServer(os.path.join(directory, "agent.sock"), fake)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()
