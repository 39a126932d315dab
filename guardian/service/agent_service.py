"""The agent service's handlers: the only implementation of guardian.v1.AgentService.

For each RPC, a check (the shape stage: the request against the caller's limits,
made into what the handler takes) and a handler (the work, inside the transaction
that also writes the audit row). The pipeline (guardian/service/pipeline.py) has
resolved the session before the check, and runs the policy, rate and content
stages between the two; the dispatch table (guardian/service/rules.py) pairs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

from guardian.policy.compile import Limits
from guardian.service import shape
from guardian.service.call import Call, Writes
from guardian.state.core import GuardianCore
from guardian.store import search_index
from guardian.store.database import Connection
from guardian.store.memories import WITHHELD, Draft, Recalled, SearchMode, SearchQuery, StoredMemory
from shared.errors import InvalidArgument, PermissionDenied, RateLimited, Unauthenticated, Unavailable
from shared.rpc.guardian.v1 import agent_pb2 as pb

__all__ = [
    "Page",
    "Query",
    "check_delete",
    "check_get",
    "check_list",
    "check_search",
    "check_store",
    "check_store_batch",
    "check_update",
    "close_session",
    "delete",
    "get",
    "limits_message",
    "list_page",
    "memory_message",
    "open_session",
    "search",
    "store",
    "store_batch",
    "update",
]


def memory_message(
    memory: StoredMemory, redacted_by: tuple[str, ...] = (), recalled: Recalled | None = None
) -> pb.Memory:
    """The wire form of a verified memory.

    redacted_by: the rules that redacted the write that returns it; recalled: how a read
    returns it (its trust in force, labelled or not); a write's reply gives the stored trust.
    """
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
        provenance=pb.Provenance(
            source=memory.declared_source,
            session=memory.session,
            derived_from=list(memory.derived_from),
            filter_hits=list(memory.filter_hits),
        ),
        trust=recalled.trust if recalled is not None else memory.trust,
        labelled=recalled.labelled if recalled is not None else False,
    )


def _recalled_message(recalled: Recalled) -> pb.Memory:
    return memory_message(recalled.memory, recalled=recalled)


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


# -- sessions ------------------------------------------------------------------------------------


def open_session(
    core: GuardianCore, call: Call, request: pb.OpenSessionRequest, connection: Connection
) -> pb.OpenSessionResponse:
    """Open a session for the agent the session stage authenticated."""
    # A revocation that committed since the session stage must win: checked again under the writer lock.
    if call.oauth is not None:  # the token was verified; the agent it maps to must be one, and not revoked
        if not core.agents.is_active(connection, call.agent):
            raise Unauthenticated(f"the agent this token maps to ({call.agent}) is not registered or is revoked")
    elif core.agents.authenticate(connection, request.agent_token, call.now_ms) != call.agent:
        raise Unauthenticated("the agent token was not accepted (wrong or revoked)")
    rules = call.policy.sessions
    # Counted here, in the writer's one transaction at a time, so concurrent opens cannot all see room.
    if core.sessions.count(call.agent, call.now_ms) >= rules.max_per_agent:
        raise RateLimited(
            f"this agent already has {rules.max_per_agent} open sessions, the policy's limit; close one or let one"
            " expire",
            retry_after_ms=core.sessions.next_expiry_ms(call.agent, call.now_ms),
        )
    session = call.session = core.sessions.open(
        call.agent,
        call.now_ms,
        rules.idle_timeout_ms,
        rules.max_lifetime_ms,
        until_ms=call.oauth.expires_at_ms if call.oauth else None,
        operations=call.oauth.operations if call.oauth else None,
    )
    profile = call.required_profile
    return pb.OpenSessionResponse(
        session_id=session.id,
        agent=call.agent,
        expires_at_ms=session.expires_at_ms,
        idle_timeout_ms=session.idle_timeout_ms,
        limits=limits_message(profile.limits),
        namespaces=list(call.required_scope.namespaces),
        read_window_ms=profile.read_window_ms or 0,
        operations=sorted(profile.operations & session.operations if session.operations else profile.operations),
    )


def close_session(
    core: GuardianCore, call: Call, request: pb.CloseSessionRequest, connection: Connection
) -> pb.CloseSessionResponse:
    """End the caller's session and forget its rate and anomaly state."""
    session_id = call.required_session.id
    core.sessions.close(session_id)
    core.rates.forget_session(session_id)
    core.anomalies.forget_session(session_id)
    return pb.CloseSessionResponse()


# -- writes --------------------------------------------------------------------------------------


def check_store(core: GuardianCore, call: Call, request: pb.StoreRequest) -> Writes:
    """One memory draft within the caller's limits."""
    return Writes((_draft(request.memory, call.required_profile.limits, "memory"),))


def store(core: GuardianCore, call: Call, request: Writes, connection: Connection) -> pb.StoreResponse:
    """Store the (filtered) draft."""
    [memory] = core.memories.insert(connection, call.required_scope, request.drafts, call.now_ms)
    call.object_id = memory.id
    return pb.StoreResponse(memory=memory_message(memory, request.drafts[0].redacted_by))


def check_store_batch(core: GuardianCore, call: Call, request: pb.StoreBatchRequest) -> Writes:
    """One to max_batch memory drafts, each within the caller's limits."""
    limits = call.required_profile.limits
    if not request.memories:
        raise InvalidArgument("memories: needs at least one memory")
    if len(request.memories) > limits.max_batch:
        raise InvalidArgument(f"memories: {len(request.memories)} is over the batch limit of {limits.max_batch}")
    return Writes(tuple(_draft(item, limits, f"memories[{index}]") for index, item in enumerate(request.memories)))


def store_batch(core: GuardianCore, call: Call, request: Writes, connection: Connection) -> pb.StoreBatchResponse:
    """Store every (filtered) draft, all or none."""
    memories = core.memories.insert(connection, call.required_scope, request.drafts, call.now_ms)
    call.object_id = ",".join(memory.id for memory in memories)
    pairs = zip(memories, request.drafts, strict=True)
    return pb.StoreBatchResponse(memories=[memory_message(memory, draft.redacted_by) for memory, draft in pairs])


def check_update(core: GuardianCore, call: Call, request: pb.UpdateRequest) -> Writes:
    """The memory's id and the fields the update sets (at least one), within the caller's limits."""
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
    source = ""
    derived_from: tuple[str, ...] = ()
    if request.HasField("source"):
        source = shape.source(request.source)
        changed.add("source")
    if request.HasField("derived_from"):
        derived_from = shape.derived_from(request.derived_from.ids)
        changed.add("derived_from")
    draft = Draft(content=content, tags=tags, metadata_json=metadata, source=source, derived_from=derived_from)
    return Writes((draft,), changed=frozenset(changed), memory_id=memory_id)


def update(core: GuardianCore, call: Call, request: Writes, connection: Connection) -> pb.UpdateResponse:
    """Change the (filtered) fields of one of the caller's memories."""
    [changes] = request.drafts
    memory = core.memories.update(
        connection,
        call.required_scope,
        request.memory_id,
        changes,
        changed=request.changed or frozenset(),
        now_ms=call.now_ms,
    )
    return pb.UpdateResponse(memory=memory_message(memory, changes.redacted_by))


def check_delete(core: GuardianCore, call: Call, request: pb.DeleteRequest) -> str:
    """The id of the memory to delete."""
    memory_id = call.object_id = shape.memory_id(request.id)
    return memory_id


def delete(core: GuardianCore, call: Call, memory_id: str, connection: Connection) -> pb.DeleteResponse:
    """Delete one of the caller's memories."""
    core.memories.delete(connection, call.required_scope, memory_id)
    return pb.DeleteResponse()


# -- reads ---------------------------------------------------------------------------------------


def check_get(core: GuardianCore, call: Call, request: pb.GetRequest) -> str:
    """The id of the memory to get."""
    memory_id = call.object_id = shape.memory_id(request.id)
    return memory_id


def get(core: GuardianCore, call: Call, memory_id: str, connection: Connection) -> pb.GetResponse:
    """One memory the caller may recall, verified; PermissionDenied if its profile withholds its trust level."""
    recalled = core.memories.recall(connection, call.required_scope, memory_id)
    if recalled is None:
        call.withheld = (memory_id,)
        raise PermissionDenied(WITHHELD)
    call.recalled = (memory_id,)
    call.labelled = (memory_id,) if recalled.labelled else ()
    return pb.GetResponse(memory=_recalled_message(recalled))


@dataclass(frozen=True)
class Query:
    """A search, checked."""

    query: SearchQuery
    limit: int
    #: Whether a hybrid search runs on words alone because recall by meaning is not available now
    #: (the vector index is loading, or agent-embedder is not answering).
    semantic_pending: bool = False


#: The wire's search modes, by value.
_MODES: Final[dict[int, SearchMode]] = {
    pb.SEARCH_MODE_HYBRID: "hybrid",
    pb.SEARCH_MODE_LEXICAL: "lexical",
    pb.SEARCH_MODE_SEMANTIC: "semantic",
}


def check_search(core: GuardianCore, call: Call, request: pb.SearchRequest) -> Query:
    """The query's words and, unless lexical, its vector; the number of hits; within the caller's limits.

    The query is embedded, and the vector index asked for its nearest memories, here, before the
    transaction: neither the model's work nor the vector scan ever holds the writer.
    """
    limits = call.required_profile.limits
    text = shape.query(request.query, limits)
    mode = _MODES.get(request.mode)
    if mode is None:
        raise InvalidArgument("mode: expected hybrid, lexical or semantic")
    terms = tuple(search_index.query_terms(text))
    if not terms:
        raise InvalidArgument("query: needs at least one word (letters or digits) to search for")
    limit = shape.page_size(request.limit, limits, "limit")
    vectors = core.memories.vectors
    if mode == "lexical" or vectors is None:
        return Query(SearchQuery(terms, "lexical"), limit)
    if not vectors.index.ready:
        if mode == "semantic":
            raise Unavailable(
                "the vector index is still loading after a restart; retry in a few seconds, or search with mode lexical"
            )
        return Query(SearchQuery(terms, "lexical"), limit, semantic_pending=True)
    try:
        vector = vectors.embed(text)
    except Unavailable:
        if mode == "semantic":
            raise
        return Query(SearchQuery(terms, "lexical"), limit, semantic_pending=True)
    # What the caller itself just stored is found by meaning too: its vectors follow its writes by milliseconds.
    vectors.wait_embedded(call.required_scope.namespaces)
    nearest = core.memories.nearest(call.required_scope, vector, limit)
    return Query(SearchQuery(terms, mode, vector, nearest), limit)


def search(core: GuardianCore, call: Call, query: Query, connection: Connection) -> pb.SearchResponse:
    """The memories the caller may read that best match the query, each with its score and its legs' ranks."""
    found = core.memories.search(connection, call.required_scope, query.query, query.limit)
    call.recalled = tuple(hit.memory.id for hit in found.hits)
    call.labelled = tuple(hit.memory.id for hit in found.hits if hit.recalled.labelled)
    call.withheld = tuple(found.withheld)
    call.object_id = ",".join(call.recalled)
    return pb.SearchResponse(
        hits=[
            pb.SearchHit(
                memory=_recalled_message(hit.recalled),
                score=hit.score,
                lexical_rank=hit.lexical_rank,
                semantic_rank=hit.semantic_rank,
            )
            for hit in found.hits
        ],
        semantic_pending=query.semantic_pending,
        withheld=len(found.withheld),
    )


@dataclass(frozen=True)
class Page:
    """A page of a listing, checked."""

    size: int
    cursor: str


def check_list(core: GuardianCore, call: Call, request: pb.ListRequest) -> Page:
    """The page size, within the caller's limits (the cursor is checked where it is opened)."""
    return Page(shape.page_size(request.page_size, call.required_profile.limits, "page_size"), request.cursor)


def list_page(core: GuardianCore, call: Call, page: Page, connection: Connection) -> pb.ListResponse:
    """One page of the memories the caller may read, newest first."""
    recalled, withheld, next_cursor = core.memories.list_page(connection, call.required_scope, page.size, page.cursor)
    call.recalled = tuple(item.memory.id for item in recalled)
    call.labelled = tuple(item.memory.id for item in recalled if item.labelled)
    call.withheld = tuple(withheld)
    call.object_id = ",".join(call.recalled)
    return pb.ListResponse(
        memories=[_recalled_message(item) for item in recalled], next_cursor=next_cursor, withheld=len(withheld)
    )


def _draft(message: pb.MemoryDraft, limits: Limits, field: str) -> Draft:
    draft = shape.draft(message.content, message.tags, message.metadata_json, limits, field)
    return replace(
        draft,
        namespace=shape.namespace(message.namespace, f"{field}.namespace"),
        source=shape.source(message.source, f"{field}.source") if message.source else "",
        derived_from=shape.derived_from(message.derived_from, f"{field}.derived_from"),
    )
