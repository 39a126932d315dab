"""The agent service's handlers: the only implementation of guardian.v1.AgentService.

Each handler checks its request's shape against the caller's limits and
returns the work to run inside the pipeline's transaction; the pipeline
(guardian/pipeline.py) has already resolved the session and will check the
policy and write the audit row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guardian import shape
from guardian.core import GuardianCore
from guardian.database import Connection
from guardian.memories import StoredMemory
from guardian.pipeline import Call
from guardian.policy import Limits
from shared.errors import InvalidArgument, Unauthenticated
from shared.rpc.guardian.v1 import agent_pb2 as pb

__all__ = ["AgentHandlers"]

Work = Callable[[Connection], Any]


def memory_message(memory: StoredMemory) -> pb.Memory:
    """The wire form of a verified memory."""
    return pb.Memory(
        id=memory.id,
        content=memory.content,
        tags=list(memory.tags),
        metadata_json=memory.metadata_json,
        created_at_ms=memory.created_at_ms,
        updated_at_ms=memory.updated_at_ms,
        sha256=memory.sha256,
    )


def limits_message(limits: Limits) -> pb.Limits:
    """The wire form of a profile's limits."""
    return pb.Limits(
        max_content_bytes=limits.max_content_bytes,
        max_metadata_bytes=limits.max_metadata_bytes,
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
        token = request.agent_token
        if not token:
            raise Unauthenticated("no agent token: pass the token `guardianctl agents add` printed")

        def work(connection: Connection) -> pb.OpenSessionResponse:
            agent = self._core.agents.authenticate(connection, token)
            if agent is None:
                raise Unauthenticated("the agent token was not accepted (wrong or revoked)")
            call.agent = agent
            rules = call.policy.sessions
            session = self._core.sessions.open(agent, call.now_ms, rules.idle_timeout_ms, rules.max_lifetime_ms)
            call.session = session
            return pb.OpenSessionResponse(
                session_id=session.id,
                agent=agent,
                expires_at_ms=session.expires_at_ms,
                idle_timeout_ms=session.idle_timeout_ms,
                limits=limits_message(call.policy.profile_for(agent).limits),
            )

        return work

    def CloseSession(self, call: Call, request: pb.CloseSessionRequest) -> Work:
        def work(_: Connection) -> pb.CloseSessionResponse:
            self._core.sessions.close(call.required_session.id)
            return pb.CloseSessionResponse()

        return work

    def Store(self, call: Call, request: pb.StoreRequest) -> Work:
        limits = call.required_profile.limits
        draft = shape.draft(request.memory.content, request.memory.tags, request.memory.metadata_json, limits, "memory")

        def work(connection: Connection) -> pb.StoreResponse:
            [memory] = self._core.memories.insert(connection, call.agent, [draft], call.now_ms)
            call.object_id = memory.id
            return pb.StoreResponse(memory=memory_message(memory))

        return work

    def StoreBatch(self, call: Call, request: pb.StoreBatchRequest) -> Work:
        limits = call.required_profile.limits
        if not request.memories:
            raise InvalidArgument("memories: needs at least one memory")
        if len(request.memories) > limits.max_batch:
            raise InvalidArgument(f"memories: {len(request.memories)} is over the batch limit of {limits.max_batch}")
        drafts = [
            shape.draft(item.content, item.tags, item.metadata_json, limits, f"memories[{index}]")
            for index, item in enumerate(request.memories)
        ]

        def work(connection: Connection) -> pb.StoreBatchResponse:
            memories = self._core.memories.insert(connection, call.agent, drafts, call.now_ms)
            call.object_id = ",".join(memory.id for memory in memories)
            return pb.StoreBatchResponse(memories=[memory_message(memory) for memory in memories])

        return work

    def Get(self, call: Call, request: pb.GetRequest) -> Work:
        memory_id = call.object_id = shape.memory_id(request.id)

        def work(connection: Connection) -> pb.GetResponse:
            return pb.GetResponse(memory=memory_message(self._core.memories.get(connection, call.agent, memory_id)))

        return work

    def Search(self, call: Call, request: pb.SearchRequest) -> Work:
        limits = call.required_profile.limits
        query = shape.query(request.query, limits)
        limit = shape.page_size(request.limit, limits, "limit")

        def work(connection: Connection) -> pb.SearchResponse:
            hits = self._core.memories.search(connection, call.agent, query, limit)
            call.object_id = ",".join(memory.id for memory, _ in hits)
            return pb.SearchResponse(
                hits=[pb.SearchHit(memory=memory_message(memory), score=score) for memory, score in hits]
            )

        return work

    def List(self, call: Call, request: pb.ListRequest) -> Work:
        limits = call.required_profile.limits
        page_size = shape.page_size(request.page_size, limits, "page_size")

        def work(connection: Connection) -> pb.ListResponse:
            memories, next_cursor = self._core.memories.list_page(connection, call.agent, page_size, request.cursor)
            call.object_id = ",".join(memory.id for memory in memories)
            return pb.ListResponse(memories=[memory_message(memory) for memory in memories], next_cursor=next_cursor)

        return work

    def Update(self, call: Call, request: pb.UpdateRequest) -> Work:
        limits = call.required_profile.limits
        memory_id = call.object_id = shape.memory_id(request.id)
        changes: dict[str, Any] = {}
        if request.HasField("content"):
            changes["content"] = shape.content(request.content, limits)
        if request.HasField("tags"):
            changes["tags"] = shape.tags(request.tags.tags, limits)
        if request.HasField("metadata_json"):
            changes["metadata_json"] = shape.metadata_json(request.metadata_json, limits)
        if not changes:
            raise InvalidArgument("update: set at least one of content, tags or metadata")

        def work(connection: Connection) -> pb.UpdateResponse:
            memory = self._core.memories.update(connection, call.agent, memory_id, changes, call.now_ms)
            return pb.UpdateResponse(memory=memory_message(memory))

        return work

    def Delete(self, call: Call, request: pb.DeleteRequest) -> Work:
        memory_id = call.object_id = shape.memory_id(request.id)

        def work(connection: Connection) -> pb.DeleteResponse:
            self._core.memories.delete(connection, call.agent, memory_id)
            return pb.DeleteResponse()

        return work
