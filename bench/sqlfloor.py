"""The storage floor: bare SQLCipher doing each operation's SQL on a table of the same size.

A database of its own beside the guardian's, opened as ``guardian.store.database``
opens its own (a raw 32-byte key as the first statement, ``cipher_version``
checked, ``foreign_keys`` on, WAL, ``synchronous = NORMAL``), with the
guardian's ``memories`` table, indexes and contentless FTS5 table of namespaced
terms (guardian/store/search_index.py; without the audit table), filled with the same
seeded corpus as the guardian, each row indexed as the guardian indexes it.
What is left out is exactly what the guardian adds: the pipeline, the sha256
and HMACs (the columns hold fixed strings of the same length), the audit row
and its chain, the policy and gRPC.

Operations, one call each:

- ``insert``: one row in its own ``BEGIN IMMEDIATE ... COMMIT`` (the floor of store);
- ``insert_batch``: corpus.BATCH_SIZE rows in one transaction (of store_batch);
- ``get``: one row by id, scoped like the guardian's query (of get);
- ``fts``: the guardian's search query (guardian/store/memories.py): FTS5 ranks the
  matches of the words joined by OR by bm25 and keeps the best LIMIT, and only
  those are joined to their rows and scoped (of search);
- ``fts_join_first``: a diagnostic, the plan the guardian used before: every
  match joined to its row and scoped, then ranked, so it reads a row per match;
- ``list``: one page newest first by keyset, following the cursor like the clients (of list).

Always one caller: SQLite has one writer, and the guardian serves every request,
reads too, on its single writer connection (the audit row shares the transaction).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import sqlcipher3

from bench.corpus import BATCH_SIZE, LIST_DEPTH, LIST_PAGE_SIZE, SEARCH_LIMIT, Corpus, MemoryText
from guardian.store import search_index

__all__ = ["FLOOR_OF", "SqlFloor"]

#: Which floor operation stands beside which measured operation.
FLOOR_OF: Final = {
    "store": "insert",
    "store_batch": "insert_batch",
    "get": "get",
    "search": "fts",
    "search_common": "fts",
    "list": "list",
}

# guardian/store/schema.py after its migrations, less the audit, policy and idempotency tables.
_SCHEMA: Final = (
    """CREATE TABLE agents (
        name TEXT PRIMARY KEY, token_key_id TEXT NOT NULL, token_hash TEXT NOT NULL UNIQUE,
        created_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER)""",
    """CREATE TABLE memories (
        rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, agent TEXT NOT NULL REFERENCES agents(name),
        created_at_ms INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL, content TEXT NOT NULL,
        tags TEXT NOT NULL, metadata TEXT NOT NULL, sha256 TEXT NOT NULL, key_id TEXT NOT NULL,
        hmac TEXT NOT NULL, namespace TEXT NOT NULL DEFAULT '', status TEXT NOT NULL DEFAULT 'active',
        filter_hits TEXT NOT NULL DEFAULT '', sig_format INTEGER NOT NULL DEFAULT 1)""",
    "CREATE INDEX memories_by_namespace_newest ON memories(namespace, status, created_at_ms DESC, rowid DESC)",
    "CREATE INDEX memories_by_age ON memories(created_at_ms)",
    "CREATE INDEX memories_held ON memories(status, created_at_ms) WHERE status <> 'active'",
    """CREATE VIRTUAL TABLE memory_terms USING fts5(
        content, tags, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 0')""",
)
_COLUMNS: Final = (
    "rowid, id, namespace, agent, created_at_ms, updated_at_ms, content, tags, metadata, sha256,"
    " key_id, hmac, sig_format, status, filter_hits"
)
_M_COLUMNS: Final = ", ".join("m." + column for column in _COLUMNS.split(", "))
_INSERT: Final = (
    "INSERT INTO memories (id, namespace, agent, created_at_ms, updated_at_ms, content, tags, metadata,"
    " sha256, key_id, hmac, sig_format, status, filter_hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Every match joined to its row and scoped, then ranked (FTS5 as the outer loop: CROSS JOIN
# fixes the order in SQLite): a row read per match. A diagnostic, not a floor.
_SEARCH_JOIN_FIRST: Final = (
    f"SELECT {_M_COLUMNS}, bm25(memory_terms) AS rank"  # noqa: S608 - constants only
    " FROM memory_terms CROSS JOIN memories AS m ON m.rowid = memory_terms.rowid"
    " WHERE memory_terms MATCH ? AND m.namespace IN (?) AND m.status = 'active' AND m.created_at_ms >= ?"
    " ORDER BY rank LIMIT ?"
)
# The guardian's search (guardian/store/memories.py): FTS5 ranks the caller's namespaced terms and keeps
# the best, then only those rows are read and scoped (here in SQL; the guardian checks the scope on
# the rows it reads, and with a read window asks for more). The floor of search.
_SEARCH: Final = (
    f"SELECT {_M_COLUMNS}, hits.rank FROM ("  # noqa: S608 - constants only
    "SELECT rowid, bm25(memory_terms) AS rank FROM memory_terms WHERE memory_terms MATCH ? ORDER BY rank LIMIT ?"
    ") AS hits CROSS JOIN memories AS m ON m.rowid = hits.rowid"
    " WHERE m.namespace IN (?) AND m.status = 'active' AND m.created_at_ms >= ? ORDER BY hits.rank"
)
_INDEX: Final = "INSERT INTO memory_terms (rowid, content, tags) VALUES (last_insert_rowid(), ?, ?)"
_GET: Final = (
    f"SELECT {_COLUMNS} FROM memories WHERE id = ? AND namespace IN (?)"  # noqa: S608 - constants only
    " AND status = 'active' AND created_at_ms >= ?"
)
_LIST: Final = (
    f"SELECT {_COLUMNS} FROM memories WHERE namespace IN (?)"  # noqa: S608 - constants only
    " AND status = 'active' AND created_at_ms >= ?"
    " AND (created_at_ms < ? OR (created_at_ms = ? AND rowid < ?))"
    " ORDER BY created_at_ms DESC, rowid DESC LIMIT ?"
)
_HEX64: Final = "0" * 64
_FILL_CHUNK: Final = 10_000
_NAMESPACE: Final = "bench"


def _connect(path: Path, key_hex: str) -> Any:
    connection = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    connection.execute(f"PRAGMA key = \"x'{key_hex}'\"")  # random hex made below, never input
    if not connection.execute("PRAGMA cipher_version").fetchone()[0]:
        raise RuntimeError("sqlcipher3 is not a SQLCipher build")
    connection.execute("PRAGMA foreign_keys = ON")
    connection.execute("PRAGMA busy_timeout = 30000")
    return connection


class SqlFloor:
    """A SQLCipher database with the guardian's schema, filled to a size."""

    def __init__(self, path: Path, corpus: Corpus) -> None:
        self._corpus = corpus
        self._key = secrets.token_hex(32)
        self._db = _connect(path, self._key)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._db.execute(
            "INSERT INTO agents VALUES (?, 'k1', ?, ?, NULL)", (_NAMESPACE, secrets.token_hex(32), _now_ms())
        )
        self._ids: list[str] = []
        self._cursor: tuple[int, int] | None = None
        self._pages = 0
        self.memories = 0

    def _row(self, text: MemoryText, now_ms: int) -> tuple[Any, ...]:
        memory_id = "mem_" + secrets.token_hex(16)
        tags = json.dumps(list(text.tags), separators=(",", ":"))
        metadata = json.dumps(text.metadata, sort_keys=True, separators=(",", ":"))
        return (memory_id, _NAMESPACE, _NAMESPACE, now_ms, now_ms, text.content, tags, metadata,
                _HEX64, "k1", _HEX64, 2, "active", "")  # fmt: skip

    def fill(self, count: int) -> float:
        """Insert count rows of the corpus in large transactions, the search index optimized; the seconds it took."""
        started = time.perf_counter()
        for start in range(0, count, _FILL_CHUNK):
            now = _now_ms()
            rows = [self._row(self._corpus.memory(start + i), now) for i in range(min(_FILL_CHUNK, count - start))]
            self._db.execute("BEGIN IMMEDIATE")
            self._insert(rows)
            self._db.execute("COMMIT")
            self._ids.extend(row[0] for row in rows[:: max(1, count // 100_000)])
        search_index.optimize(self._db)  # as the guardian's prefill is (bench/runner.py)
        self.memories += count
        return time.perf_counter() - started

    def insert(self) -> None:
        """One row, one transaction."""
        row = self._row(self._corpus.memory(self.memories), _now_ms())
        self._db.execute("BEGIN IMMEDIATE")
        self._insert([row])
        self._db.execute("COMMIT")
        self.memories += 1

    def insert_batch(self) -> None:
        """BATCH_SIZE rows, one transaction."""
        now = _now_ms()
        rows = [self._row(text, now) for text in self._corpus.batch(self.memories)]
        self._db.execute("BEGIN IMMEDIATE")
        self._insert(rows)
        self._db.execute("COMMIT")
        self.memories += BATCH_SIZE

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows into memories, each indexed as the guardian indexes it (its namespaced terms)."""
        for row in rows:
            self._db.execute(_INSERT, row)
            content, tags = row[5], " ".join(json.loads(row[6]))
            self._db.execute(_INDEX, (search_index.terms(_NAMESPACE, content), search_index.terms(_NAMESPACE, tags)))

    def get(self) -> None:
        """One row by id."""
        memory_id = self._corpus.pick(self._ids)
        if self._db.execute(_GET, (memory_id, _NAMESPACE, 0)).fetchone() is None:
            raise RuntimeError("the floor lost a row")

    def _match(self) -> str:
        return search_index.match_query(search_index.query_terms(self._corpus.query()), (_NAMESPACE,))

    def fts(self) -> None:
        """The guardian's search query: rank in FTS5, then read the best rows (the floor of search)."""
        self._db.execute(_SEARCH, (self._match(), SEARCH_LIMIT, _NAMESPACE, 0)).fetchall()

    def fts_join_first(self) -> None:
        """Every match joined to its row before ranking (a diagnostic, not a floor)."""
        self._db.execute(_SEARCH_JOIN_FIRST, (self._match(), _NAMESPACE, 0, SEARCH_LIMIT)).fetchall()

    def plans(self) -> dict[str, list[str]]:
        """EXPLAIN QUERY PLAN of the floor's search and of the join-first diagnostic."""
        plans: dict[str, list[str]] = {}
        for name, query, parameters in (
            ("fts", _SEARCH, ('"x"', SEARCH_LIMIT, _NAMESPACE, 0)),
            ("fts_join_first", _SEARCH_JOIN_FIRST, ('"x"', _NAMESPACE, 0, SEARCH_LIMIT)),
        ):
            rows = self._db.execute("EXPLAIN QUERY PLAN " + query, parameters).fetchall()
            plans[name] = [str(row[-1]) for row in rows]
        return plans

    def list(self) -> None:
        """One page newest first, following the cursor LIST_DEPTH pages deep."""
        before_ms, before_rowid = self._cursor or (2**62, 2**62)
        rows = self._db.execute(
            _LIST, (_NAMESPACE, 0, before_ms, before_ms, before_rowid, LIST_PAGE_SIZE + 1)
        ).fetchall()
        self._pages += 1
        more = len(rows) > LIST_PAGE_SIZE and self._pages < LIST_DEPTH
        self._cursor = (rows[LIST_PAGE_SIZE - 1][4], rows[LIST_PAGE_SIZE - 1][0]) if more else None
        if self._cursor is None:
            self._pages = 0

    def trim(self, keep: int) -> None:
        """Delete the rows stored after the first keep (what insert measurements added)."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM memory_terms WHERE rowid > ?", (keep,))
        self._db.execute("DELETE FROM memories WHERE rowid > ?", (keep,))
        self._db.execute("COMMIT")
        self.memories = keep

    def operation(self, name: str) -> Callable[[], None]:
        """The floor operation called name (see FLOOR_OF)."""
        operations: dict[str, Callable[[], None]] = {
            "insert": self.insert,
            "insert_batch": self.insert_batch,
            "get": self.get,
            "fts": self.fts,
            "fts_join_first": self.fts_join_first,
            "list": self.list,
        }
        return operations[name]

    def close(self) -> None:
        """Close the connection."""
        self._db.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
