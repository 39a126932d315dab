"""The agent service's handlers: the only implementation of guardian.v1.AgentService.

Each handler checks its request's shape against the caller's limits and
returns the work to run inside the pipeline's transaction; the pipeline
(guardian/service/pipeline.py) has already resolved the session and will check the
policy and write the audit row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from guardian.policy.compile import Limits
from guardian.service import shape
from guardian.service.pipeline import Call
from guardian.state.core import GuardianCore
from guardian.store.database import Connection
from guardian.store.memories import Draft, StoredMemory
from shared.errors import InvalidArgument, Unauthenticated
from shared.rpc.guardian.v1 import agent_pb2 as pb

__all__ = ["AgentHandlers"]

Work = Callable[[Connection], Any]


def memory_message(memory: StoredMemory, redacted_by: tuple[str, ...] = ()) -> pb.Memory:
    """The wire form of a verified memory; redacted_by: the rules that redacted the write that returns it."""
    return pb.Memory(
        id=memory.id,
        content=memory.content,
        tags=list(memory.tags),
        metadata_json=memory.metadata_json,
        created_at_ms=memory.created_at_ms,
        updated_at_ms=memory.updated_at_ms,
        sha256=memory.sha256,
        namespace=memory.namespace,
        author=memory.author,
        status=memory.status,
        redacted_by=list(redacted_by),
    )


def limits_message(limits: Limits) -> pb.Limits:
    """The wire form of a profile's limits."""
    return pb.Limits(
        max_content_bytes=limits.max_content_bytes,
        max_metadata_bytes=limits.max_metadata_bytes,
        max_metadata_depth=limits.max_metadata_depth,
        max_tags=limits.max_tags,
        max_tag_bytes=limits.max_tag_bytes,
        max_batch=limits.max_batch,
        max_page_size=limits.max_page_size,
        max_query_bytes=limits.max_query_bytes,
    )


class AgentHandlers:
    """One method per AgentService RPC, named as the RPC."""

    def __init__(self, core: GuardianCore) -> None:
        self._core = core

    def OpenSession(self, call: Call, request: pb.OpenSessionRequest) -> Work:
        token = request.agent_token  # authenticated at the session stage; checked again under the writer lock

        def work(connection: Connection) -> pb.OpenSessionResponse:
            # A revocation that committed since the session stage must win.
            if self._core.agents.authenticate(connection, token, call.now_ms) != call.agent:
                raise Unauthenticated("the agent token was not accepted (wrong or revoked)")
            rules = call.policy.sessions
            session = self._core.sessions.open(call.agent, call.now_ms, rules.idle_timeout_ms, rules.max_lifetime_ms)
            call.session = session
            profile = call.required_profile
            return pb.OpenSessionResponse(
                session_id=session.id,
                agent=call.agent,
                expires_at_ms=session.expires_at_ms,
                idle_timeout_ms=session.idle_timeout_ms,
                limits=limits_message(profile.limits),
                namespaces=list(call.required_scope.namespaces),
                read_window_ms=profile.read_window_ms or 0,
            )

        return work

    def CloseSession(self, call: Call, request: pb.CloseSessionRequest) -> Work:
        def work(_: Connection) -> pb.CloseSessionResponse:
            session_id = call.required_session.id
            self._core.sessions.close(session_id)
            self._core.rates.forget_session(session_id)
            self._core.anomalies.forget_session(session_id)
            return pb.CloseSessionResponse()

        return work

    def Store(self, call: Call, request: pb.StoreRequest) -> Work:
        call.drafts = [self._draft(request.memory, call.required_profile.limits, "memory")]

        def work(connection: Connection) -> pb.StoreResponse:
            [memory] = self._core.memories.insert(connection, call.required_scope, call.drafts, call.now_ms)
            call.object_id = memory.id
            return pb.StoreResponse(memory=memory_message(memory, call.drafts[0].redacted_by))

        return work

    def StoreBatch(self, call: Call, request: pb.StoreBatchRequest) -> Work:
        limits = call.required_profile.limits
        if not request.memories:
            raise InvalidArgument("memories: needs at least one memory")
        if len(request.memories) > limits.max_batch:
            raise InvalidArgument(f"memories: {len(request.memories)} is over the batch limit of {limits.max_batch}")
        call.drafts = [self._draft(item, limits, f"memories[{index}]") for index, item in enumerate(request.memories)]
        call.cost = len(call.drafts)

        def work(connection: Connection) -> pb.StoreBatchResponse:
            memories = self._core.memories.insert(connection, call.required_scope, call.drafts, call.now_ms)
            call.object_id = ",".join(memory.id for memory in memories)
            pairs = zip(memories, call.drafts, strict=True)
            return pb.StoreBatchResponse(memories=[memory_message(memory, d.redacted_by) for memory, d in pairs])

        return work

    def Get(self, call: Call, request: pb.GetRequest) -> Work:
        memory_id = call.object_id = shape.memory_id(request.id)

        def work(connection: Connection) -> pb.GetResponse:
            memory = self._core.memories.get(connection, call.required_scope, memory_id)
            return pb.GetResponse(memory=memory_message(memory))

        return work

    def Search(self, call: Call, request: pb.SearchRequest) -> Work:
        limits = call.required_profile.limits
        query = shape.query(request.query, limits)
        limit = shape.page_size(request.limit, limits, "limit")

        def work(connection: Connection) -> pb.SearchResponse:
            hits = self._core.memories.search(connection, call.required_scope, query, limit)
            call.object_id = ",".join(memory.id for memory, _ in hits)
            return pb.SearchResponse(
                hits=[pb.SearchHit(memory=memory_message(memory), score=score) for memory, score in hits]
            )

        return work

    def List(self, call: Call, request: pb.ListRequest) -> Work:
        limits = call.required_profile.limits
        page_size = shape.page_size(request.page_size, limits, "page_size")

        def work(connection: Connection) -> pb.ListResponse:
            scope = call.required_scope
            memories, next_cursor = self._core.memories.list_page(connection, scope, page_size, request.cursor)
            call.object_id = ",".join(memory.id for memory in memories)
            return pb.ListResponse(memories=[memory_message(memory) for memory in memories], next_cursor=next_cursor)

        return work

    def Update(self, call: Call, request: pb.UpdateRequest) -> Work:
        limits = call.required_profile.limits
        memory_id = call.object_id = shape.memory_id(request.id)
        changed: set[str] = set()
        content, metadata = "", "{}"
        tags: tuple[str, ...] = ()
        if request.HasField("content"):
            content = shape.content(request.content, limits)
            changed.add("content")
        if request.HasField("tags"):
            tags = shape.tags(request.tags.tags, limits)
            changed.add("tags")
        if request.HasField("metadata_json"):
            metadata = shape.metadata_json(request.metadata_json, limits)
            changed.add("metadata")
        if not changed:
            raise InvalidArgument("update: set at least one of content, tags or metadata")
        call.drafts = [Draft(content=content, tags=tags, metadata_json=metadata)]
        call.changed = frozenset(changed)

        def work(connection: Connection) -> pb.UpdateResponse:
            [changes] = call.drafts
            memory = self._core.memories.update(
                connection,
                call.required_scope,
                memory_id,
                changes,
                changed=call.changed or frozenset(),
                now_ms=call.now_ms,
            )
            return pb.UpdateResponse(memory=memory_message(memory, changes.redacted_by))

        return work

    def Delete(self, call: Call, request: pb.DeleteRequest) -> Work:
        memory_id = call.object_id = shape.memory_id(request.id)

        def work(connection: Connection) -> pb.DeleteResponse:
            self._core.memories.delete(connection, call.required_scope, memory_id)
            return pb.DeleteResponse()

        return work

    @staticmethod
    def _draft(message: pb.MemoryDraft, limits: Limits, field: str) -> Draft:
        draft = shape.draft(message.content, message.tags, message.metadata_json, limits, field)
        return replace(draft, namespace=shape.namespace(message.namespace, f"{field}.namespace"))
