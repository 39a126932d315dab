"""The memories table: the data stage of the pipeline.

Parameterised SQL only. Every query is scoped to one agent, so an agent can
never reach another's memories, and every row read is verified (content
digest and HMAC) before it leaves this module: a mismatch raises DataLoss.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from guardian.keys.ring import KeyRing
from guardian.recall.fusion import fuse
from guardian.recall.model import Vector
from guardian.recall.trust import UNRECORDED, TrustLevel, TrustView, lowest
from guardian.store import provenance, search_index
from guardian.store.database import Connection
from guardian.store.integrity import CURRENT_FORMAT, SignedFields, canonical_json, content_sha256
from guardian.store.vectors import MemoryVectors
from shared.errors import DataLoss, InvalidArgument, NotFound, PermissionDenied

__all__ = [
    "ACTIVE",
    "QUARANTINED",
    "WITHHELD",
    "Draft",
    "Found",
    "Hit",
    "MemoryStore",
    "Recalled",
    "Scope",
    "SearchMode",
    "SearchQuery",
    "StoredMemory",
    "draft_field",
]

security_log = logging.getLogger("agent_guardian.security")

#: A memory's status: agents see only active ones; quarantined ones wait for the security team.
ACTIVE: Final = "active"
QUARANTINED: Final = "quarantined"

# Interpolated into SQL: a constant of this module, never input.
_COLUMNS: Final = (
    "rowid, id, namespace, agent, created_at_ms, updated_at_ms, content, tags, metadata, sha256,"
    " key_id, hmac, sig_format, status, filter_hits, source, session, derived_from, trust"
)
_M_COLUMNS: Final = ", ".join("m." + column for column in _COLUMNS.split(", "))
#: Where a column is in a row of _COLUMNS.
_AT: Final = {column: index for index, column in enumerate(_COLUMNS.split(", "))}
_CURSOR_RE: Final = re.compile(r"[A-Za-z0-9_-]{22}\.[0-9a-f]{32}")
_MAX_NAMESPACES: Final = 64
#: Candidates a search asks each leg for, at least.
_MIN_DEPTH: Final = 20
#: What an agent is told of a memory its profile withholds at its trust level.
WITHHELD: Final = "that memory is withheld: the policy does not let this agent recall memories of its trust level"


@dataclass(frozen=True)
class Draft:
    """A memory to store, validated by the shape stage and passed through the content filters."""

    content: str
    tags: tuple[str, ...]
    metadata_json: str
    #: The namespace to store into; "" is the author's own.
    namespace: str = ""
    status: str = ACTIVE
    #: Names of the filter rules that matched (redact, quarantine, flag).
    filter_hits: tuple[str, ...] = ()
    #: Names of the rules that redacted part of this write (the reply says so; not stored).
    redacted_by: tuple[str, ...] = ()
    #: The content's vector, when it was embedded before the transaction (else the recall thread embeds it).
    vector: Vector | None = field(default=None, compare=False, repr=False)
    #: What the writer declared the content came from ("": the policy's default source).
    source: str = ""
    #: Ids of memories it was built from (each must be one the writer can recall).
    derived_from: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredMemory:
    """A memory read back and verified."""

    id: str
    namespace: str
    author: str
    content: str
    tags: tuple[str, ...]
    metadata_json: str
    created_at_ms: int
    updated_at_ms: int
    sha256: str
    status: str = ACTIVE
    filter_hits: tuple[str, ...] = ()
    #: Provenance (guardian/recall/trust.py): the declared source ("" before sources were recorded),
    #: the writing session's audit reference, what it was derived from and the trust it was stored with.
    source: str = ""
    session: str = ""
    derived_from: tuple[str, ...] = ()
    trust: str = ""

    @property
    def declared_source(self) -> str:
        """The source as shown: ``unrecorded`` for a memory stored before sources were recorded."""
        return self.source or UNRECORDED


@dataclass(frozen=True)
class Recalled:
    """A memory as an agent's read returns it: with its trust level in force and whether it goes labelled."""

    memory: StoredMemory
    trust: TrustLevel
    #: The caller's profile recalls this level only labelled (quoted data, not an instruction).
    labelled: bool


@dataclass(frozen=True)
class Scope:
    """What one agent may reach: its namespaces and how far back.

    Every agent query goes through a Scope, so no SQL statement here can reach
    a namespace the policy did not give the caller.
    """

    agent: str
    #: Namespaces it may read, its own first.
    namespaces: tuple[str, ...]
    #: Namespaces it may store into, update and delete from (its own included).
    writable: frozenset[str]
    #: How far memories are trusted and what the agent's recall does with each level.
    trust: TrustView
    #: Memories created before this (Unix ms) are out of its read window; 0 for none.
    not_before_ms: int = 0
    #: The session's reference (the audit trail's), recorded as the writer of what it stores.
    session: str = ""

    def recalled(self, memory: StoredMemory) -> Recalled | None:
        """memory as this agent's recall returns it, or None when its profile withholds that trust level."""
        level = self.trust.level_now(memory.author, memory.source, memory.trust)
        action = self.trust.action(level)
        return None if action == "withhold" else Recalled(memory, level, labelled=action == "label")

    def __post_init__(self) -> None:
        if not self.namespaces or len(self.namespaces) > _MAX_NAMESPACES:
            raise InvalidArgument("a scope needs between 1 and 64 namespaces")

    @property
    def placeholders(self) -> str:
        """One SQL parameter placeholder per namespace, for ``namespace IN (...)``."""
        return ", ".join("?" for _ in self.namespaces)


#: Which legs a search runs: both, fused (guardian/recall/fusion.py), or one.
SearchMode = Literal["hybrid", "lexical", "semantic"]


@dataclass(frozen=True)
class SearchQuery:
    """A search, checked: its terms (for the lexical leg) and its vector (for the semantic leg)."""

    terms: tuple[search_index.QueryTerm, ...]
    mode: SearchMode = "hybrid"
    vector: Vector | None = field(default=None, compare=False, repr=False)
    #: The semantic leg's first candidates, found before the transaction (MemoryStore.nearest).
    nearest: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class Hit:
    """A memory a search found: its score (higher is better) and its rank in each leg (0: not found there)."""

    recalled: Recalled
    score: float
    lexical_rank: int
    semantic_rank: int

    @property
    def memory(self) -> StoredMemory:
        """The memory found."""
        return self.recalled.memory


@dataclass(frozen=True)
class Found:
    """A search's hits, and the ids of the matches the caller's profile withholds at their trust level."""

    hits: list[Hit]
    withheld: list[str]


class MemoryStore:
    """Reads and writes memories within a caller's scope, signing and verifying each."""

    def __init__(self, ring: KeyRing, vectors: MemoryVectors | None = None) -> None:
        """vectors: where memories' vectors go (None: none are kept, e.g. to verify a backup)."""
        self.vectors = vectors
        self.use_ring(ring)

    def use_ring(self, ring: KeyRing) -> None:
        """Sign with ring's primary and verify with any of its keys from now on (a key rotation)."""
        # Separate keys for list cursors, derived so they never sign anything else; a cursor made
        # before a rotation still opens.
        signing_first = [ring.primary, *(key for key_id, key in ring.keys.items() if key_id != ring.primary_id)]
        cursor_keys = tuple(
            hmac.new(key, b"agent-guardian/cursor-key/v1", hashlib.sha256).digest() for key in signing_first
        )
        self._ring, self._cursor_keys = ring, cursor_keys
        if self.vectors is not None:
            self.vectors.use_ring(ring)

    @property
    def ring(self) -> KeyRing:
        """The memory key ring in use."""
        return self._ring

    # -- agent operations ------------------------------------------------------------------

    def insert(self, connection: Connection, scope: Scope, drafts: Sequence[Draft], now_ms: int) -> list[StoredMemory]:
        """Store drafts written by scope.agent in scope.session (inside the caller's transaction).

        Each gets its provenance here: the writer and session from the scope, the source the
        draft declares (one the writer's profile may declare), the memories it derives from
        (each one the writer can recall) and the trust that follows from them.
        """
        stored: list[StoredMemory] = []
        for index, draft in enumerate(drafts):
            prefix = draft_field(index, len(drafts))
            namespace = draft.namespace or scope.agent
            if namespace not in scope.writable:
                # Not echoed: the name is the agent's own text (a content filter never saw it).
                raise PermissionDenied("the policy does not let this agent write to that namespace")
            source = draft.source or scope.trust.default_source
            trust = self._trust_of(connection, scope, source, draft.derived_from, prefix)
            memory = StoredMemory(
                id="mem_" + secrets.token_hex(16),
                namespace=namespace,
                author=scope.agent,
                content=draft.content,
                tags=draft.tags,
                metadata_json=draft.metadata_json,
                created_at_ms=now_ms,
                updated_at_ms=now_ms,
                sha256=content_sha256(draft.content),
                status=draft.status,
                filter_hits=draft.filter_hits,
                source=source,
                session=scope.session,
                derived_from=draft.derived_from,
                trust=trust,
            )
            key_id, digest = _signed_fields(memory).sign(self._ring)
            cursor = connection.execute(
                "INSERT INTO memories (id, namespace, agent, created_at_ms, updated_at_ms, content, tags, metadata,"
                " sha256, key_id, hmac, sig_format, status, filter_hits, source, session, derived_from, trust)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    memory.id,
                    memory.namespace,
                    memory.author,
                    now_ms,
                    now_ms,
                    memory.content,
                    canonical_json(list(memory.tags)),
                    memory.metadata_json,
                    memory.sha256,
                    key_id,
                    digest,
                    CURRENT_FORMAT,
                    memory.status,
                    ",".join(memory.filter_hits),
                    memory.source,
                    memory.session,
                    ",".join(memory.derived_from),
                    memory.trust,
                ),
            )
            provenance.record_derivations(connection, memory.id, memory.derived_from)
            if memory.status == ACTIVE:
                self._index(connection, int(cursor.lastrowid), memory, draft.vector)
            stored.append(memory)
        return stored

    def _trust_of(
        self, connection: Connection, scope: Scope, source: str, derived_from: Sequence[str], prefix: str
    ) -> TrustLevel:
        """The trust of a write by scope.agent declaring source, built from derived_from.

        PermissionDenied if the writer's profile may not declare source; NotFound naming the
        first id of derived_from that is not a memory the writer can recall. prefix: where the
        fields are in the request, for the error (``memory.``, ``memories[2].``, or ``""``).
        """
        level = scope.trust.own.level_of(source)
        if level is None:
            raise PermissionDenied(f"{prefix}source: the policy does not let this agent declare the source {source!r}")
        levels: list[TrustLevel] = [level]
        for at, parent_id in enumerate(derived_from):
            try:
                levels.append(self.get(connection, scope, parent_id).trust)
            except (NotFound, PermissionDenied):
                raise NotFound(f"{prefix}derived_from[{at}]: no memory {parent_id} that this agent can read") from None
        return lowest(levels)

    def write_trust(
        self,
        connection: Connection,
        scope: Scope,
        draft: Draft,
        *,
        prefix: str,
        memory_id: str = "",
        changed: frozenset[str] = frozenset(),
    ) -> TrustLevel:
        """The trust a write will be stored with: a new memory's (memory_id ""), or an update's of memory_id.

        Raises what the write itself would (a source the writer may not declare, a derived_from it
        cannot read, a memory it cannot recall); prefix: the draft's place in the request
        (:func:`draft_field`; "" for an update).
        """
        if not memory_id:
            source = draft.source or scope.trust.default_source
            return self._trust_of(connection, scope, source, draft.derived_from, prefix)
        return self._updated_trust(connection, scope, self.get(connection, scope, memory_id), draft, changed)

    def _updated_trust(
        self, connection: Connection, scope: Scope, recalled: Recalled, changes: Draft, changed: frozenset[str]
    ) -> TrustLevel:
        """An update's trust: the lowest of the memory's and what the update brings (its source, derived_from)."""
        source = _updated_source(scope, recalled.memory, changes, changed)
        brought = self._trust_of(
            connection, scope, source, changes.derived_from if "derived_from" in changed else (), ""
        )
        return lowest([brought, recalled.trust])

    def by_rowids(self, connection: Connection, rowids: Sequence[int]) -> list[StoredMemory]:
        """The memories at these rowids that exist, verified, in rowid order."""
        return [self._verified(row) for _, row in sorted(self._rows(connection, rowids).items())]

    def get(self, connection: Connection, scope: Scope, memory_id: str) -> Recalled:
        """The memory with this id as scope's recall returns it.

        NotFound if scope may not see it, PermissionDenied if its profile withholds the memory's
        trust level, DataLoss if it fails verification.
        """
        recalled = self.recall(connection, scope, memory_id)
        if recalled is None:
            raise PermissionDenied(WITHHELD)
        return recalled

    def recall(self, connection: Connection, scope: Scope, memory_id: str) -> Recalled | None:
        """The memory with this id as scope's recall returns it; None if its profile withholds its trust level.

        NotFound if scope may not see it, DataLoss if it fails verification.
        """
        return scope.recalled(self._visible(connection, scope, memory_id))

    def _visible(self, connection: Connection, scope: Scope, memory_id: str) -> StoredMemory:
        """The memory with this id if scope may see it (whatever its trust); NotFound otherwise."""
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE id = ? AND namespace IN ({scope.placeholders})"  # noqa: S608
            " AND status = 'active' AND created_at_ms >= ?",
            (memory_id, *scope.namespaces, scope.not_before_ms),
        ).fetchone()
        if row is None:
            raise NotFound("no memory with that id")
        return self._verified(row)

    def search(self, connection: Connection, scope: Scope, query: SearchQuery, limit: int) -> Found:
        """The limit memories in scope that best match query, best first.

        Each leg asks its index for the best candidates of the caller's namespaces only:
        the lexical leg FTS5 (guardian/store/search_index.py, ranked by bm25), the semantic
        leg the vector index (cosine with the query's vector); hybrid fuses their ranks,
        each lexical hit weighed by how much of the query it holds (guardian/recall/fusion.py).
        The candidates' rows are read once; the scope is checked again on them, the read
        window applied and each row verified; when too few pass and a leg may hold more, the
        legs are asked for four times as many. The cost follows the candidates asked for,
        never the size of the table.
        """
        depth = first = _depth(limit)
        while True:
            lexical = self._lexical(connection, scope, query.terms, depth) if query.mode != "semantic" else []
            semantic: Sequence[tuple[int, float]] = []
            if query.mode != "lexical":
                nearest = query.nearest if depth == first else None
                semantic = nearest if nearest is not None else self._semantic(scope, query.vector, depth)
            rows = self._rows(connection, [rowid for rowid, _ in lexical] + [rowid for rowid, _ in semantic])
            if query.mode == "hybrid":
                shares = [
                    (rowid, search_index.coverage(query.terms, _searchable(rows[rowid])) if rowid in rows else 0.0)
                    for rowid, _ in lexical
                ]
                fused = fuse(shares, [rowid for rowid, _ in semantic])
                ranked = [(hit.rowid, hit.score, hit.lexical_rank, hit.semantic_rank) for hit in fused]
            elif query.mode == "lexical":
                ranked = [(rowid, -bm25, rank, 0) for rank, (rowid, bm25) in enumerate(lexical, 1)]
            else:
                ranked = [(rowid, cosine, 0, rank) for rank, (rowid, cosine) in enumerate(semantic, 1)]
            visible = self._visible_hits(scope, rows, ranked, limit)
            if len(visible.hits) >= limit or (len(lexical) < depth and len(semantic) < depth):
                return visible
            depth *= 4

    def _lexical(
        self, connection: Connection, scope: Scope, terms: Sequence[search_index.QueryTerm], depth: int
    ) -> list[tuple[int, float]]:
        """The lexical leg: up to depth (rowid, bm25) of the caller's namespaces, best (lowest bm25) first.

        Its cost is bounded by depth and the query's terms, not by how many memories hold them
        (search_index.lexical_plan).
        """
        if not terms:
            return []
        match, ranked = search_index.lexical_plan(connection, terms, scope.namespaces)
        if not ranked:  # every term is common: the newest memories holding them all, unscored (bm25 would
            # read every posting of every term to count them)
            rows = connection.execute(
                "SELECT rowid FROM memory_terms WHERE memory_terms MATCH ? ORDER BY rowid DESC LIMIT ?",
                (match, depth),
            ).fetchall()
            return [(int(row[0]), 0.0) for row in rows]
        rows = connection.execute(
            "SELECT rowid, bm25(memory_terms) AS rank FROM memory_terms WHERE memory_terms MATCH ?"
            " ORDER BY rank LIMIT ?",
            (match, depth),
        ).fetchall()
        return [(int(rowid), float(rank)) for rowid, rank in rows]

    def nearest(self, scope: Scope, vector: Vector, limit: int) -> tuple[tuple[int, float], ...]:
        """The semantic leg's first candidates for a search of limit hits, for :attr:`SearchQuery.nearest`.

        Run before the search's transaction: the vector scan never holds the writer.
        """
        return tuple(self._semantic(scope, vector, _depth(limit)))

    def _semantic(self, scope: Scope, vector: Vector | None, depth: int) -> list[tuple[int, float]]:
        """The semantic leg: up to depth (rowid, cosine) of the caller's namespaces, nearest first."""
        if self.vectors is None or vector is None:
            return []
        return self.vectors.index.search(scope.namespaces, vector, depth)

    @staticmethod
    def _rows(connection: Connection, rowids: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        """The memories rows of these rowids (those that exist)."""
        unique = list(dict.fromkeys(rowids))
        if not unique:
            return {}
        placeholders = ", ".join("?" for _ in unique)
        return {
            int(row[0]): row
            for row in connection.execute(
                f"SELECT {_COLUMNS} FROM memories WHERE rowid IN ({placeholders})",  # noqa: S608 - placeholders
                unique,
            ).fetchall()
        }

    def _visible_hits(
        self,
        scope: Scope,
        rows: dict[int, tuple[Any, ...]],
        ranked: list[tuple[int, float, int, int]],
        limit: int,
    ) -> Found:
        """The first limit of ranked (rowid, score, lexical rank, semantic rank) that scope may recall, verified.

        Those passed over because the caller's profile withholds their trust level are named in
        :attr:`Found.withheld`.
        """
        hits: list[Hit] = []
        withheld: list[str] = []
        for rowid, score, lexical_rank, semantic_rank in ranked:
            row = rows.get(rowid)
            if (
                row is not None
                and row[_AT["namespace"]] in scope.namespaces
                and row[_AT["status"]] == ACTIVE
                and row[_AT["created_at_ms"]] >= scope.not_before_ms
            ):
                memory = self._verified(row)
                recalled = scope.recalled(memory)
                if recalled is None:
                    withheld.append(memory.id)
                    continue
                hits.append(Hit(recalled, score, lexical_rank, semantic_rank))
                if len(hits) == limit:
                    break
        return Found(hits, withheld)

    def list_page(
        self, connection: Connection, scope: Scope, page_size: int, cursor: str
    ) -> tuple[list[Recalled], list[str], str]:
        """One page of memories in scope, newest first: those its recall returns, the ids of those its
        profile withholds at their trust level, and the cursor of the next page ('' at the end).

        Withheld memories take their place in the page (so a page may hold fewer than page_size).
        """
        before_ms, before_rowid = self._open_cursor(scope.agent, cursor) if cursor else (2**62, 2**62)
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE namespace IN ({scope.placeholders})"  # noqa: S608
            " AND status = 'active' AND created_at_ms >= ?"
            " AND (created_at_ms < ? OR (created_at_ms = ? AND rowid < ?))"
            " ORDER BY created_at_ms DESC, rowid DESC LIMIT ?",
            (*scope.namespaces, scope.not_before_ms, before_ms, before_ms, before_rowid, page_size + 1),
        ).fetchall()
        page = rows[:page_size]
        recalled: list[Recalled] = []
        withheld: list[str] = []
        for row in page:
            memory = self._verified(row)
            shown = scope.recalled(memory)
            if shown is None:
                withheld.append(memory.id)
            else:
                recalled.append(shown)
        next_cursor = self._make_cursor(scope.agent, page[-1][4], page[-1][0]) if len(rows) > page_size else ""
        return recalled, withheld, next_cursor

    def update(
        self,
        connection: Connection,
        scope: Scope,
        memory_id: str,
        changes: Draft,
        *,
        changed: frozenset[str],
        now_ms: int,
    ) -> StoredMemory:
        """Apply the changed fields of changes to a memory scope can recall, and re-sign it.

        changed names what the update sets: content, tags, metadata, source, derived_from. The
        memory's provenance becomes this write's (its writer and session; the source it declares,
        else the memory's own, which the writer's profile must be able to declare), and its trust
        the lowest of what it was and what this write brings: an update never raises trust.
        A quarantine hit in the changes moves the memory to quarantine; filter hits accumulate.
        """
        recalled = self.get(connection, scope, memory_id)
        current = recalled.memory
        if current.namespace not in scope.writable:
            raise PermissionDenied("that memory is in a namespace this agent may only read")
        source = _updated_source(scope, current, changes, changed)
        derived_from = changes.derived_from if "derived_from" in changed else current.derived_from
        trust = self._updated_trust(connection, scope, recalled, changes, changed)
        content = changes.content if "content" in changed else current.content
        updated = StoredMemory(
            id=current.id,
            namespace=current.namespace,
            author=scope.agent,
            content=content,
            tags=changes.tags if "tags" in changed else current.tags,
            metadata_json=changes.metadata_json if "metadata" in changed else current.metadata_json,
            created_at_ms=current.created_at_ms,
            updated_at_ms=max(now_ms, current.updated_at_ms),
            sha256=content_sha256(content),
            status=changes.status,
            filter_hits=tuple(dict.fromkeys(current.filter_hits + changes.filter_hits)),
            source=source,
            session=scope.session,
            derived_from=derived_from,
            trust=trust,
        )
        self._rewrite(connection, updated, changes.vector if "content" in changed else None)
        if "derived_from" in changed:
            provenance.record_derivations(connection, updated.id, updated.derived_from, replace=True)
        return updated

    def delete(self, connection: Connection, scope: Scope, memory_id: str) -> None:
        """Delete a memory scope can recall, in a namespace it may write; NotFound if it sees none with this id."""
        current = self.get(connection, scope, memory_id).memory
        if current.namespace not in scope.writable:
            raise PermissionDenied("that memory is in a namespace this agent may only read")
        self._delete(connection, [memory_id])

    # -- the security team's and the daemon's operations ------------------------------------

    def count(self, connection: Connection, namespace: str) -> int:
        """How many memories a namespace holds (any status)."""
        row = connection.execute("SELECT count(*) FROM memories WHERE namespace = ?", (namespace,)).fetchone()
        return int(row[0])

    def held(self, connection: Connection, limit: int, before_id: str = "") -> list[StoredMemory]:
        """Quarantined memories, oldest first (verified; a row failing verification raises DataLoss)."""
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE status = ? AND id > ?"  # noqa: S608 - constant columns
            " ORDER BY created_at_ms, id LIMIT ?",
            (QUARANTINED, before_id, limit),
        ).fetchall()
        return [self._verified(row) for row in rows]

    def get_held(self, connection: Connection, memory_id: str) -> StoredMemory:
        """One quarantined memory, whatever its namespace; NotFound if no quarantined memory has this id."""
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE id = ? AND status = ?",  # noqa: S608 - constant columns
            (memory_id, QUARANTINED),
        ).fetchone()
        if row is None:
            raise NotFound("no quarantined memory with that id")
        return self._verified(row)

    def release(self, connection: Connection, memory_id: str, now_ms: int) -> StoredMemory:
        """Make a quarantined memory visible to agents again (re-signed with its new status)."""
        held = self.get_held(connection, memory_id)
        released = dataclasses.replace(held, status=ACTIVE, updated_at_ms=max(now_ms, held.updated_at_ms))
        self._rewrite(connection, released)
        return released

    def purge_held(self, connection: Connection, memory_id: str) -> StoredMemory:
        """Delete a quarantined memory for good."""
        held = self.get_held(connection, memory_id)
        self._delete(connection, [memory_id])
        return held

    def hold(self, connection: Connection, memory_id: str, now_ms: int, caught_by: tuple[str, ...] = ()) -> str | None:
        """Quarantine a memory whatever its namespace (an incident, a rescan); the status it had, or None if gone.

        An active memory leaves the search and vector indexes and is re-signed with its new
        status (and caught_by added to its filter hits); one already quarantined stays as it is.
        """
        row = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE id = ?",  # noqa: S608 - constant columns
            (memory_id,),
        ).fetchone()
        if row is None:
            return None
        memory = self._verified(row)
        if memory.status == ACTIVE:
            held = dataclasses.replace(
                memory,
                status=QUARANTINED,
                updated_at_ms=max(now_ms, memory.updated_at_ms),
                filter_hits=tuple(dict.fromkeys(memory.filter_hits + caught_by)),
            )
            self._rewrite(connection, held)
        return memory.status

    def active_after(self, connection: Connection, after_rowid: int, limit: int) -> list[tuple[int, StoredMemory]]:
        """Up to limit active memories after after_rowid, in rowid order, verified (a rescan)."""
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE rowid > ? AND status = ? ORDER BY rowid LIMIT ?",  # noqa: S608
            (after_rowid, ACTIVE, limit),
        ).fetchall()
        return [(int(row[0]), self._verified(row)) for row in rows]

    def by_ids(self, connection: Connection, memory_ids: Sequence[str]) -> dict[str, StoredMemory]:
        """The memories with these ids, any status, verified (for the security team's reports)."""
        found: dict[str, StoredMemory] = {}
        unique = list(dict.fromkeys(memory_ids))
        for start in range(0, len(unique), 500):
            batch = unique[start : start + 500]
            placeholders = ", ".join("?" for _ in batch)
            for row in connection.execute(
                f"SELECT {_COLUMNS} FROM memories WHERE id IN ({placeholders})",  # noqa: S608 - placeholders
                batch,
            ).fetchall():
                memory = self._verified(row)
                found[memory.id] = memory
        return found

    def purge(self, connection: Connection, memory_ids: Sequence[str]) -> None:
        """Delete memories by id for good, whatever their status (an incident closed by deletion)."""
        self._delete(connection, list(memory_ids))

    def purge_older_than(self, connection: Connection, cutoff_ms: int, limit: int) -> list[str]:
        """Delete up to limit memories created before cutoff_ms (retention); their ids."""
        ids = [
            str(row[0])
            for row in connection.execute(
                "SELECT id FROM memories WHERE created_at_ms < ? ORDER BY created_at_ms LIMIT ?", (cutoff_ms, limit)
            ).fetchall()
        ]
        self._delete(connection, ids)
        return ids

    # -- signing, verifying, cursors ---------------------------------------------------------

    def _delete(self, connection: Connection, ids: list[str]) -> None:
        """Delete memories by id, and their terms from the search index."""
        rowids = [
            int(row[0])
            for memory_id in ids
            for row in connection.execute("SELECT rowid FROM memories WHERE id = ?", (memory_id,)).fetchall()
        ]
        search_index.unindex(connection, rowids)
        if self.vectors is not None:
            self.vectors.drop(connection, rowids)
        connection.executemany("DELETE FROM memories WHERE rowid = ?", [(rowid,) for rowid in rowids])
        provenance.forget_children(connection, ids)

    def _rewrite(self, connection: Connection, memory: StoredMemory, vector: Vector | None = None) -> None:
        """Store memory's new fields and signature, and index it again (only an active memory is indexed).

        vector: the new content's, if it was embedded already.
        """
        row = connection.execute("SELECT rowid, sha256 FROM memories WHERE id = ?", (memory.id,)).fetchone()
        if row is None:
            raise NotFound("no memory with that id")
        rowid = int(row[0])
        search_index.unindex(connection, [rowid])
        if memory.status == ACTIVE:
            same_content = row[1] == memory.sha256 and self.vectors is not None and self.vectors.has(connection, rowid)
            self._index(connection, rowid, memory, vector, terms_only=same_content)
        elif self.vectors is not None:
            self.vectors.drop(connection, [rowid])
        key_id, digest = _signed_fields(memory).sign(self._ring)
        connection.execute(
            "UPDATE memories SET agent = ?, content = ?, tags = ?, metadata = ?, updated_at_ms = ?, sha256 = ?,"
            " key_id = ?, hmac = ?, sig_format = ?, status = ?, filter_hits = ?, source = ?, session = ?,"
            " derived_from = ?, trust = ? WHERE id = ?",
            (
                memory.author,
                memory.content,
                canonical_json(list(memory.tags)),
                memory.metadata_json,
                memory.updated_at_ms,
                memory.sha256,
                key_id,
                digest,
                CURRENT_FORMAT,
                memory.status,
                ",".join(memory.filter_hits),
                memory.source,
                memory.session,
                ",".join(memory.derived_from),
                memory.trust,
                memory.id,
            ),
        )

    def _index(
        self,
        connection: Connection,
        rowid: int,
        memory: StoredMemory,
        vector: Vector | None,
        *,
        terms_only: bool = False,
    ) -> None:
        """Index an active memory: its terms, and its vector when given (else the recall thread embeds it).

        No model runs here, inside the writer: a write's vector is made before its transaction
        when its review needs it (guardian/service/pipeline.py); any other is queued once this
        transaction commits and made in the background, a few milliseconds later
        (guardian/store/vectors.py).
        """
        search_index.index(connection, rowid, memory.namespace, memory.content, memory.tags)
        if self.vectors is None or terms_only:
            return
        if vector is None:
            self.vectors.drop(connection, [rowid])
            self.vectors.queue(memory.namespace, rowid)
        else:
            self.vectors.put(connection, rowid, memory.id, memory.namespace, vector)

    def unembedded(
        self, connection: Connection, after_rowid: int, limit: int
    ) -> tuple[list[tuple[int, StoredMemory]], int]:
        """Up to limit active memories after after_rowid with no vector of the model in use.

        Returns (rowid, memory) pairs of those that verify (one that does not is withheld from
        every read, so it gets no vector), and the last rowid looked at (-1: none was left).
        """
        if self.vectors is None:
            return [], -1
        rowids = self.vectors.missing(connection, after_rowid, limit)
        if not rowids:
            return [], -1
        return self.embeddable(connection, rowids), rowids[-1]

    def embeddable(self, connection: Connection, rowids: Sequence[int]) -> list[tuple[int, StoredMemory]]:
        """(rowid, memory) of the active memories at rowids that verify, in rowid order: what may be embedded."""
        placeholders = ", ".join("?" for _ in rowids)
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE rowid IN ({placeholders}) AND status = 'active'"  # noqa: S608
            " ORDER BY rowid",
            list(rowids),
        ).fetchall()
        found = [(int(row[0]), self._check(row)) for row in rows]
        return [(rowid, memory) for rowid, memory in found if memory is not None]

    def attach_vectors(self, connection: Connection, embedded: Sequence[tuple[int, StoredMemory, Vector]]) -> int:
        """Store vectors made outside the writer, for the memories still as they were read; how many."""
        if self.vectors is None:
            return 0
        attached = 0
        for rowid, memory, vector in embedded:
            row = connection.execute("SELECT sha256, status FROM memories WHERE rowid = ?", (rowid,)).fetchone()
            if row is None or row[0] != memory.sha256 or row[1] != ACTIVE or self.vectors.has(connection, rowid):
                continue  # deleted, changed (and embedded then), or held since it was read
            self.vectors.put(connection, rowid, memory.id, memory.namespace, vector)
            attached += 1
        return attached

    def verify_all(self, connection: Connection) -> tuple[int, list[str]]:
        """Check every memory's digest and HMAC: (how many were checked, the ids that fail)."""
        checked, after = 0, -1
        failed: list[str] = []
        while True:
            rows = connection.execute(
                f"SELECT {_COLUMNS} FROM memories WHERE rowid > ? ORDER BY rowid LIMIT 1000",  # noqa: S608
                (after,),
            ).fetchall()
            if not rows:
                return checked, failed
            for row in rows:
                checked += 1
                if self._check(row) is None:
                    failed.append(str(row[_AT["id"]]))
            after = int(rows[-1][0])

    def resign_batch(self, connection: Connection, after_rowid: int, limit: int) -> tuple[int, list[str], int]:
        """Re-sign up to limit memories after after_rowid not signed with the primary key.

        Only rows that verify are re-signed (a tampered row must never be laundered by a
        fresh HMAC); returns (how many were re-signed, the ids that fail verification, the
        last rowid looked at, or -1 when none was left).
        """
        rows = connection.execute(
            f"SELECT {_COLUMNS} FROM memories WHERE rowid > ? AND (key_id <> ? OR sig_format <> ?)"  # noqa: S608
            " ORDER BY rowid LIMIT ?",
            (after_rowid, self._ring.primary_id, CURRENT_FORMAT, limit),
        ).fetchall()
        if not rows:
            return 0, [], -1
        resigned = 0
        failed: list[str] = []
        for row in rows:
            if self._check(row) is None:
                failed.append(str(row[_AT["id"]]))
                continue
            # The stored text of every field is what is signed, exactly as _check verifies it.
            key_id, digest = _fields_of(row).sign(self._ring)
            connection.execute(
                "UPDATE memories SET key_id = ?, hmac = ?, sig_format = ? WHERE rowid = ?",
                (key_id, digest, CURRENT_FORMAT, row[0]),
            )
            resigned += 1
        return resigned, failed, int(rows[-1][0])

    def signed_with(self, connection: Connection, key_id: str) -> int:
        """How many memories carry an HMAC made with key_id."""
        return int(connection.execute("SELECT count(*) FROM memories WHERE key_id = ?", (key_id,)).fetchone()[0])

    def _verified(self, row: tuple[Any, ...]) -> StoredMemory:
        """The memory of row, verified; DataLoss (and a security event) if it fails."""
        memory = self._check(row)
        if memory is None:
            security_log.error(
                "memory failed its integrity check",
                extra={"event": "integrity_failure", "memory_id": row[_AT["id"]], "namespace": row[_AT["namespace"]]},
            )
            raise DataLoss("that memory failed its integrity check and is withheld; the security team is alerted")
        return memory

    def _check(self, row: tuple[Any, ...]) -> StoredMemory | None:
        """The memory of row if its digest and HMAC verify, else None."""
        (_, memory_id, namespace, author, created, updated, content, tags_json, metadata, digest, key_id, mac,
         sig_format, status, hits, source, session, derived_from, trust) = row  # fmt: skip
        memory = StoredMemory(
            id=memory_id,
            namespace=namespace,
            author=author,
            content=content,
            tags=tuple(json.loads(tags_json)) if _is_json_list(tags_json) else (),
            metadata_json=metadata,
            created_at_ms=created,
            updated_at_ms=updated,
            sha256=digest,
            status=status,
            filter_hits=_split(hits),
            source=source,
            session=session,
            derived_from=_split(derived_from),
            trust=trust,
        )
        if content_sha256(content) != digest or not _fields_of(row).verify(self._ring, key_id, mac, sig_format):
            return None
        return memory

    def _make_cursor(self, agent: str, created_at_ms: int, rowid: int) -> str:
        payload = base64.urlsafe_b64encode(struct.pack(">qq", created_at_ms, rowid)).decode().rstrip("=")
        return f"{payload}.{self._cursor_mac(agent, payload)}"

    def _open_cursor(self, agent: str, cursor: str) -> tuple[int, int]:
        if _CURSOR_RE.fullmatch(cursor) is None:
            raise InvalidArgument("cursor: not a cursor this guardian issued; pass next_cursor unchanged")
        payload, mac = cursor.split(".")
        if not any(hmac.compare_digest(self._cursor_mac(agent, payload, key), mac) for key in self._cursor_keys):
            raise InvalidArgument("cursor: not a cursor this guardian issued; pass next_cursor unchanged")
        created_at_ms, rowid = struct.unpack(">qq", base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return int(created_at_ms), int(rowid)

    def _cursor_mac(self, agent: str, payload: str, key: bytes | None = None) -> str:
        message = agent.encode() + b"\0" + payload.encode()
        return hmac.new(key or self._cursor_keys[0], message, hashlib.sha256).hexdigest()[:32]


def _fields_of(row: tuple[Any, ...]) -> SignedFields:
    """The signed fields of a stored row, as stored."""
    at = _AT
    return SignedFields(
        row[at["id"]],
        row[at["namespace"]],
        row[at["agent"]],
        row[at["created_at_ms"]],
        row[at["updated_at_ms"]],
        row[at["sha256"]],
        row[at["tags"]],
        row[at["metadata"]],
        row[at["status"]],
        row[at["filter_hits"]],
        row[at["source"]],
        row[at["session"]],
        row[at["derived_from"]],
        row[at["trust"]],
    )


def _signed_fields(memory: StoredMemory) -> SignedFields:
    return SignedFields(
        memory.id,
        memory.namespace,
        memory.author,
        memory.created_at_ms,
        memory.updated_at_ms,
        memory.sha256,
        canonical_json(list(memory.tags)),
        memory.metadata_json,
        memory.status,
        ",".join(memory.filter_hits),
        memory.source,
        memory.session,
        ",".join(memory.derived_from),
        memory.trust,
    )


def draft_field(index: int, count: int) -> str:
    """Where a draft's fields are in a write of count drafts, for errors: ``memory.`` or ``memories[2].``."""
    return f"memories[{index}]." if count > 1 else "memory."


def _updated_source(scope: Scope, current: StoredMemory, changes: Draft, changed: frozenset[str]) -> str:
    """The source of a memory once updated: the one the update declares, else its own (else the default)."""
    return changes.source if "source" in changed else current.source or scope.trust.default_source


def _split(joined: str) -> tuple[str, ...]:
    """A comma-joined column (rule names, memory ids) as a tuple."""
    return tuple(part for part in joined.split(",") if part)


def _depth(limit: int) -> int:
    """How many candidates a search of limit hits asks each leg for, first."""
    return max(2 * limit, _MIN_DEPTH)


def _searchable(row: tuple[Any, ...]) -> str:
    """The text of a row that the full-text index holds: its content, then its tags."""
    tags = json.loads(row[_AT["tags"]]) if _is_json_list(row[_AT["tags"]]) else []
    return str(row[_AT["content"]]) + "\n" + " ".join(tag for tag in tags if isinstance(tag, str))


def _is_json_list(text: str) -> bool:
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False
