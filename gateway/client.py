"""The gateway's only caller of the guardian: typed stubs over one gRPC channel.

This is the one module that imports the generated stubs and ``grpc``. Every
method takes and returns plain values (``gateway.models``); every gRPC failure
becomes a ``shared.errors`` exception in one place, ``guardian_errors()``, so no
gRPC type leaks out of here.

- One async channel to a filesystem Unix socket (``unix:/abs/path``), with a
  short reconnect backoff so the gateway notices a restarted guardian quickly.
- Every call has a deadline (default 10 s). Calls never wait for the channel
  to become ready: a stopped guardian is reported at once, not after the
  deadline.
- Every call is retried on ``Unavailable`` with exponential backoff and jitter,
  a few times within about two seconds and never past the call's deadline.
  Reads are safe to repeat; each write carries an idempotency key made for it
  (the same key on every retry), so a write whose answer was lost is answered
  from the guardian's record of it instead of being applied twice.
- An answer that does not fit its request is an ``InternalError``, never passed
  on: e.g. a quarantined memory is only ever the answer to a write (reads never
  show one), a memory stored into a named namespace comes back from it, and one
  stored with a declared source or derived_from comes back with them. A trust
  level the gateway does not know (or none, from a guardian that does not say)
  is taken as ``untrusted``: never more trust than the guardian gave.
- ``guardian_errors()`` also counts each failed call by status code
  (``agent_gateway_guardian_errors_total``), and ``check_health()`` is the
  readiness probe: the gRPC health service on the same channel, with a short
  deadline.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar, cast

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.metrics import GatewayMetrics
from gateway.models import (
    ACTIVE,
    QUARANTINED,
    TRUST_LEVELS,
    Limits,
    Memory,
    MemoryDraft,
    MemoryStatus,
    Page,
    Provenance,
    SearchHit,
    SearchHits,
    SearchMode,
    SessionInfo,
    TrustLevel,
)
from shared.error_table import error_row, received_row
from shared.errors import (
    GuardianError,
    InternalError,
    InvalidArgument,
    RateLimited,
    Unavailable,
)
from shared.formats import RETRY_AFTER_METADATA_KEY
from shared.rpc.guardian.v1 import agent_pb2 as pb
from shared.rpc.guardian.v1 import agent_pb2_grpc as pb_grpc
from shared.trace import METADATA_KEY as TRACE_METADATA_KEY
from shared.trace import TraceContext

#: The wire's search modes.
_SEARCH_MODES: Final[dict[SearchMode, pb.SearchMode.ValueType]] = {
    "hybrid": pb.SEARCH_MODE_HYBRID,
    "lexical": pb.SEARCH_MODE_LEXICAL,
    "semantic": pb.SEARCH_MODE_SEMANTIC,
}

__all__ = [
    "AGENT_SERVICE",
    "DEFAULT_DEADLINE_S",
    "HEALTH_DEADLINE_S",
    "UNAVAILABLE_MESSAGE",
    "GuardianClient",
    "guardian_errors",
    "new_idempotency_key",
]

DEFAULT_DEADLINE_S: Final = 10.0
#: The service name the guardian's gRPC health service reports for the agent socket.
AGENT_SERVICE: Final = "guardian.v1.AgentService"
#: Deadline of the readiness probe: a scrape must not hang on a stuck guardian.
HEALTH_DEADLINE_S: Final = 1.0
UNAVAILABLE_MESSAGE: Final = error_row(Unavailable).default_message

_DEFAULT_RETRY_AFTER_MS: Final = 1000
#: Status details are written by the guardian to be safe to show; this only bounds their size.
_MAX_DETAILS_CHARS: Final = 500

_CHANNEL_OPTIONS: Final = (
    # A restarted guardian is reachable again within about a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

_R = TypeVar("_R")
_jitter = secrets.SystemRandom()


def _details(exc: grpc.aio.AioRpcError, default: str) -> str:
    details = (exc.details() or "").strip()
    return details[:_MAX_DETAILS_CHARS] if details else default


def _retry_after_ms(exc: grpc.aio.AioRpcError) -> int:
    # grpc.aio returns a grpc.aio.Metadata of (key, value) pairs; grpc-stubs types it as sync grpc's.
    metadata = cast("Iterable[tuple[str, str | bytes]]", exc.trailing_metadata() or ())
    for key, value in metadata:
        if key == RETRY_AFTER_METADATA_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
            if text.isdecimal():
                return int(text)
    return _DEFAULT_RETRY_AFTER_MS


def _from_status(exc: grpc.aio.AioRpcError) -> GuardianError:
    """The ``shared.errors`` exception for one gRPC status: a lookup in ``shared/error_table.py``."""
    row = received_row(exc.code().name)
    message = _details(exc, row.default_message) if row.carries_details else row.default_message
    if row.error is RateLimited:
        return RateLimited(message, _retry_after_ms(exc))
    return row.error(message)


@contextmanager
def guardian_errors(metrics: GatewayMetrics | None = None) -> Iterator[None]:
    """Turn a gRPC failure raised inside the block into the matching ``shared.errors`` exception.

    With ``metrics``, count the failure by its status code name first.
    """
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if metrics is not None:
            metrics.guardian_error(exc.code().name)
        raise _from_status(exc) from exc
    except grpc.aio.UsageError as exc:  # the channel was closed: the gateway is stopping
        raise Unavailable(UNAVAILABLE_MESSAGE) from exc


@contextmanager
def _request_shape() -> Iterator[None]:
    """Values protobuf cannot encode are the caller's mistake, reported before anything is sent."""
    try:
        yield
    except UnicodeEncodeError:
        raise InvalidArgument("text must be valid Unicode (no unpaired surrogate characters)") from None
    except (ValueError, TypeError):
        raise InvalidArgument("a number is out of range or a field has the wrong type") from None


def _status(value: str, *, written: bool) -> MemoryStatus:
    """A memory's status, checked against the request: a read never shows a quarantined memory."""
    if value == ACTIVE:
        return ACTIVE
    _check(written and value == QUARANTINED)
    return QUARANTINED


def _trust(value: str) -> TrustLevel:
    """A memory's trust level; one the gateway does not know, or none, is the lowest (fail closed)."""
    for level in TRUST_LEVELS:
        if value == level:
            return level
    return "untrusted"


def _provenance(msg: pb.Provenance) -> Provenance:
    return Provenance(
        source=msg.source,
        session=msg.session,
        derived_from=tuple(msg.derived_from),
        filter_hits=tuple(msg.filter_hits),
    )


def _memory(msg: pb.Memory, *, written: bool = False) -> Memory:
    """The plain value of a memory; ``written`` when it answers a write (only then may it be quarantined)."""
    return Memory(
        id=msg.id,
        content=msg.content,
        tags=tuple(msg.tags),
        metadata_json=msg.metadata_json,
        created_at_ms=msg.created_at_ms,
        updated_at_ms=msg.updated_at_ms,
        sha256=msg.sha256,
        namespace=msg.namespace,
        author=msg.author,
        status=_status(msg.status, written=written),
        provenance=_provenance(msg.provenance),
        trust=_trust(msg.trust),
        labelled=msg.labelled,
        redacted_by=tuple(msg.redacted_by),
    )


def _draft(draft: MemoryDraft) -> pb.MemoryDraft:
    return pb.MemoryDraft(
        content=draft.content,
        tags=draft.tags,
        metadata_json=draft.metadata_json,
        namespace=draft.namespace,
        source=draft.source,
        derived_from=draft.derived_from,
    )


def _limits(msg: pb.Limits) -> Limits:
    return Limits(
        max_content_bytes=msg.max_content_bytes,
        max_metadata_bytes=msg.max_metadata_bytes,
        max_tags=msg.max_tags,
        max_tag_bytes=msg.max_tag_bytes,
        max_batch=msg.max_batch,
        max_page_size=msg.max_page_size,
        max_query_bytes=msg.max_query_bytes,
        max_metadata_depth=msg.max_metadata_depth,
    )


def _stored_where_asked(draft: MemoryDraft, msg: pb.Memory) -> bool:
    """A memory stored into a named namespace comes back from that namespace, with what the draft declared."""
    return (not draft.namespace or msg.namespace == draft.namespace) and _written_as_asked(
        msg, draft.source or None, draft.derived_from or None
    )


def _written_as_asked(msg: pb.Memory, source: str | None, derived_from: Sequence[str] | None) -> bool:
    """A write that declared a source or derived_from comes back with them (the guardian drops repeated ids)."""
    provenance = msg.provenance
    return (source is None or provenance.source == source) and (
        derived_from is None or tuple(provenance.derived_from) == tuple(dict.fromkeys(derived_from))
    )


def new_idempotency_key() -> str:
    """A fresh idempotency key for one write: make one per write and use it for every retry of it."""
    return secrets.token_urlsafe(18)


def _check(condition: bool) -> None:
    """An answer that does not fit its request is a guardian bug, never passed on."""
    if not condition:
        raise InternalError()


#: The trace the gateway's current tool call belongs to (set by the tool wrapper, gateway/tools.py).
current_trace: ContextVar[TraceContext | None] = ContextVar("current_trace", default=None)


if TYPE_CHECKING:
    _AioUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _AioUnaryInterceptor = grpc.aio.UnaryUnaryClientInterceptor


class _SendTrace(_AioUnaryInterceptor):
    """Sends the current tool call's ``traceparent`` with each guardian call (shared/trace.py)."""

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        trace = current_trace.get()
        if trace is not None:
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
            metadata.add(TRACE_METADATA_KEY, trace.traceparent)
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


class GuardianClient:
    """Typed async client of the guardian's agent service on a Unix socket.

    Create it inside a running event loop; close it with ``await close()`` or
    use it as an async context manager. ``metrics`` (a fresh ``GatewayMetrics``
    when not given) counts its failed calls and records its health probes.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        read_attempts: int = 4,
        retry_window_s: float = 2.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        path = os.fspath(socket_path)
        if not os.path.isabs(path):
            raise ValueError(f"the guardian socket must be an absolute filesystem path, got {path!r}")
        if deadline_s <= 0 or read_attempts < 1 or retry_window_s < 0:
            raise ValueError("deadline_s must be > 0, read_attempts >= 1 and retry_window_s >= 0")
        self.socket_path: Final = path
        self.metrics: Final = metrics if metrics is not None else GatewayMetrics()
        self._deadline_s = deadline_s
        self._read_attempts = read_attempts
        self._retry_window_s = retry_window_s
        self._channel = grpc.aio.insecure_channel(
            f"unix:{path}", options=list(_CHANNEL_OPTIONS), interceptors=[cast("Any", _SendTrace())]
        )
        self._stub = pb_grpc.AgentServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        """Close the channel; calls made afterwards fail with ``Unavailable``."""
        await self._channel.close(grace=None)

    async def check_health(self, deadline_s: float = HEALTH_DEADLINE_S) -> str:
        """Ask the guardian's gRPC health service about the agent service: ``"ok"`` or what is wrong.

        Uses the client's channel and never waits for it to connect, so a stopped
        guardian is reported at once. Sets ``agent_gateway_guardian_up`` to match.
        Not counted as a guardian error: the probe runs on every scrape of ``/readyz``.
        """
        request = health_pb2.HealthCheckRequest(service=AGENT_SERVICE)
        try:
            response = await self._health.Check(request, timeout=deadline_s, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            finding = f"unreachable: the guardian's agent socket did not answer a health check ({exc.code().name})"
        except grpc.aio.UsageError:
            finding = "unreachable: the gateway is stopping"
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                finding = "ok"
            else:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                finding = f"not serving: the guardian reports its agent service as {status}"
        self.metrics.set_guardian_up(finding == "ok")
        return finding

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the two ways of calling ------------------------------------------------

    async def _retrying(self, call: Callable[[float], Awaitable[_R]]) -> _R:
        """Run a call that is safe to repeat (a read, or a write with its idempotency key), retrying ``Unavailable``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self._deadline_s
        attempt = 1
        while True:
            try:
                with guardian_errors(self.metrics):
                    return await call(max(deadline - loop.time(), 0.001))
            except Unavailable:
                delay = 0.1 * 3 ** (attempt - 1) * _jitter.uniform(0.5, 1.0)
                now = loop.time()
                if (
                    attempt >= self._read_attempts
                    or now + delay - start > self._retry_window_s
                    or now + delay >= deadline
                ):
                    raise
                attempt += 1
                await asyncio.sleep(delay)

    # -- one method per RPC ------------------------------------------------------

    async def open_session(self, agent_token: str) -> SessionInfo:
        """Exchange an agent token for a session (retried: a spare session only idles out)."""
        with _request_shape():
            request = pb.OpenSessionRequest(agent_token=agent_token)
        response = await self._retrying(lambda t: self._stub.OpenSession(request, timeout=t, wait_for_ready=False))
        # Every session reads at least the agent's own namespace (listed first).
        _check(
            bool(response.session_id)
            and response.HasField("limits")
            and bool(response.namespaces)
            and response.read_window_ms >= 0
        )
        return SessionInfo(
            session_id=response.session_id,
            agent=response.agent,
            expires_at_ms=response.expires_at_ms,
            idle_timeout_ms=response.idle_timeout_ms,
            limits=_limits(response.limits),
            namespaces=tuple(response.namespaces),
            read_window_ms=response.read_window_ms,
            operations=tuple(response.operations),
        )

    async def close_session(self, session_id: str) -> None:
        """End a session (one attempt: a session the guardian lost ends by itself)."""
        with _request_shape():
            request = pb.CloseSessionRequest(session_id=session_id)
        with guardian_errors(self.metrics):
            await self._stub.CloseSession(request, timeout=self._deadline_s, wait_for_ready=False)

    async def store(self, session_id: str, draft: MemoryDraft, idempotency_key: str | None = None) -> Memory:
        """Store one memory; its ``status`` says whether a content filter quarantined it.

        idempotency_key: the same for every attempt of this one write (a fresh one when not given).
        """
        key = idempotency_key or new_idempotency_key()
        with _request_shape():
            request = pb.StoreRequest(session_id=session_id, memory=_draft(draft), idempotency_key=key)
        response = await self._retrying(lambda t: self._stub.Store(request, timeout=t, wait_for_ready=False))
        _check(response.HasField("memory") and _stored_where_asked(draft, response.memory))
        return _memory(response.memory, written=True)

    async def store_batch(
        self, session_id: str, drafts: Sequence[MemoryDraft], idempotency_key: str | None = None
    ) -> tuple[Memory, ...]:
        """Store all drafts or none; memories come back in the order of the drafts."""
        key = idempotency_key or new_idempotency_key()
        with _request_shape():
            request = pb.StoreBatchRequest(
                session_id=session_id, memories=[_draft(d) for d in drafts], idempotency_key=key
            )
        response = await self._retrying(lambda t: self._stub.StoreBatch(request, timeout=t, wait_for_ready=False))
        _check(
            len(response.memories) == len(drafts)
            and all(_stored_where_asked(d, m) for d, m in zip(drafts, response.memories, strict=True))
        )
        return tuple(_memory(m, written=True) for m in response.memories)

    async def get(self, session_id: str, memory_id: str) -> Memory:
        """One memory by id."""
        with _request_shape():
            request = pb.GetRequest(session_id=session_id, id=memory_id)
        response = await self._retrying(lambda t: self._stub.Get(request, timeout=t, wait_for_ready=False))
        _check(response.HasField("memory") and response.memory.id == memory_id)
        return _memory(response.memory)

    async def search(
        self, session_id: str, query: str, limit: int | None = None, mode: SearchMode = "hybrid"
    ) -> SearchHits:
        """Search by words and meaning (or one of them), best match first; ``limit=None``: the session's maximum."""
        with _request_shape():
            request = pb.SearchRequest(session_id=session_id, query=query, limit=limit or 0, mode=_SEARCH_MODES[mode])
        response = await self._retrying(lambda t: self._stub.Search(request, timeout=t, wait_for_ready=False))
        _check(limit is None or len(response.hits) <= limit)
        hits = tuple(
            SearchHit(
                memory=_memory(h.memory), score=h.score, lexical_rank=h.lexical_rank, semantic_rank=h.semantic_rank
            )
            for h in response.hits
        )
        return SearchHits(hits, semantic_pending=response.semantic_pending, withheld=response.withheld)

    async def list(self, session_id: str, page_size: int | None = None, cursor: str | None = None) -> Page:
        """One page of memories, newest first; pass the returned ``next_cursor`` for the next."""
        with _request_shape():
            request = pb.ListRequest(session_id=session_id, page_size=page_size or 0, cursor=cursor or "")
        response = await self._retrying(lambda t: self._stub.List(request, timeout=t, wait_for_ready=False))
        _check(page_size is None or len(response.memories) <= page_size)
        return Page(
            memories=tuple(_memory(m) for m in response.memories),
            next_cursor=response.next_cursor or None,
            withheld=response.withheld,
        )

    async def update(
        self,
        session_id: str,
        memory_id: str,
        *,
        content: str | None = None,
        tags: Sequence[str] | None = None,
        metadata_json: str | None = None,
        source: str | None = None,
        derived_from: Sequence[str] | None = None,
        idempotency_key: str | None = None,
    ) -> Memory:
        """Replace each given field of a memory; fields left as None keep their value.

        source: where what this update writes came from (None: the memory's own);
        derived_from: the memories it was built from, replacing the recorded ones (None: kept; empty: none).
        """
        key = idempotency_key or new_idempotency_key()
        with _request_shape():
            request = pb.UpdateRequest(
                session_id=session_id,
                id=memory_id,
                content=content,
                tags=None if tags is None else pb.TagList(tags=tags),
                metadata_json=metadata_json,
                source=source,
                derived_from=None if derived_from is None else pb.IdList(ids=derived_from),
                idempotency_key=key,
            )
        response = await self._retrying(lambda t: self._stub.Update(request, timeout=t, wait_for_ready=False))
        _check(
            response.HasField("memory")
            and response.memory.id == memory_id
            and _written_as_asked(response.memory, source, derived_from)
        )
        return _memory(response.memory, written=True)

    async def delete(self, session_id: str, memory_id: str, idempotency_key: str | None = None) -> None:
        """Delete a memory."""
        key = idempotency_key or new_idempotency_key()
        with _request_shape():
            request = pb.DeleteRequest(session_id=session_id, id=memory_id, idempotency_key=key)
        await self._retrying(lambda t: self._stub.Delete(request, timeout=t, wait_for_ready=False))
