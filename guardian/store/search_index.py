"""The full-text index, partitioned by namespace: no agent's search can see another's words.

One FTS5 table, ``memory_terms``, contentless (it holds the index only, never
the text). The guardian tokenises a memory itself and indexes each word as a
*term* that carries its namespace: ``n`` + the first 12 hex digits of
sha256(namespace) + the word, casefolded, with diacritics removed. A search
asks only for the terms of the caller's namespaces, so:

- a search matches only memories the caller may read (the rows are still
  checked: the index decides nothing alone);
- ranking (bm25) counts only the caller's namespaces for how common a word is,
  so neither a search's scores, nor its order, nor its cost tells whether
  some other agent ever wrote a word. What bm25 does share across namespaces
  is the total number of indexed memories and their average length.

Only active memories are indexed: a quarantined memory has no terms until it
is released. :class:`guardian.store.memories.MemoryStore` is the only writer of
memories and keeps this index in step in the same transaction (there are no
triggers: the terms are made here, in Python).

Words are maximal runs of letters, numbers and private-use characters (Unicode
L*, N*, Co; in ASCII, letters and digits) in the text's scan form
(:mod:`guardian.store.scan_form`: NFKC, invisible characters removed, linear in the
text's size) after casefolding, NFD and removal of combining marks: only
characters FTS5's unicode61 tokenizer keeps in a token, so each term is one
FTS5 token, and a query term (made the same way) matches only the indexed
term it names.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, Final

from guardian.store.scan_form import ScanForm

__all__ = ["MAX_QUERY_WORDS", "index", "match_query", "query_words", "rebuild", "terms", "unindex"]

#: Words of a query that are searched for (the rest are ignored).
MAX_QUERY_WORDS: Final = 32
_TAG_HEX: Final = 12
_REBUILD_BATCH: Final = 2000


def _namespace_tag(namespace: str) -> str:
    return "n" + hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:_TAG_HEX]


def _is_word_char(char: str) -> bool:
    if char.isascii():
        return char.isalnum()
    category = unicodedata.category(char)
    return category[0] in "LN" or category == "Co"


def words(text: str) -> list[str]:
    """The words of text as the index knows them (see the module docstring)."""
    # Casefold first: folding can yield a combining mark (İ -> i + U+0307), which NFD then exposes. The scan
    # form has its compatibility characters mapped already (NFKD would expand the ones it keeps, e.g. U+FDFA).
    decomposed = unicodedata.normalize("NFD", ScanForm.of(text).text.casefold())
    plain = "".join(char for char in decomposed if not unicodedata.combining(char))
    found: list[str] = []
    current: list[str] = []
    for char in plain:
        if _is_word_char(char):
            current.append(char)
        elif current:
            found.append("".join(current))
            current = []
    if current:
        found.append("".join(current))
    return found


def terms(namespace: str, text: str) -> str:
    """The indexed text for text in namespace: its words as namespaced terms, space-separated."""
    tag = _namespace_tag(namespace)
    return " ".join(tag + word for word in words(text))


def _stored_tags(tags_json: str) -> list[str]:
    """The tags of a stored row (its canonical JSON array)."""
    try:
        tags = json.loads(tags_json)
    except ValueError:
        return []
    return [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else []


def index(connection: Any, rowid: int, namespace: str, content: str, tags: Sequence[str]) -> None:
    """Index one active memory (inside the caller's transaction)."""
    connection.execute(
        "INSERT INTO memory_terms (rowid, content, tags) VALUES (?, ?, ?)",
        (rowid, terms(namespace, content), terms(namespace, " ".join(tags))),
    )


def unindex(connection: Any, rowids: Iterable[int]) -> None:
    """Remove memories from the index (a no-op for one that is not indexed)."""
    connection.executemany("DELETE FROM memory_terms WHERE rowid = ?", [(rowid,) for rowid in rowids])


def query_words(text: str) -> list[str]:
    """The distinct words of a query that are searched for, in order."""
    return list(dict.fromkeys(words(text)))[:MAX_QUERY_WORDS]


def match_query(query: Sequence[str], namespaces: Sequence[str]) -> str:
    """The FTS5 query for query's words in any of namespaces: quoted terms joined by OR.

    Every term is a quoted string of letters and digits only, so agent text is never FTS syntax.
    """
    tags = [_namespace_tag(namespace) for namespace in namespaces]
    return " OR ".join(f'"{tag}{word}"' for word in query for tag in tags)


def rebuild(connection: Any) -> int:
    """Index every active memory again from scratch (schema migration 5); how many."""
    connection.execute("DELETE FROM memory_terms")
    after, total = -1, 0
    while True:
        rows = connection.execute(
            "SELECT rowid, namespace, content, tags FROM memories WHERE rowid > ? AND status = 'active'"
            " ORDER BY rowid LIMIT ?",
            (after, _REBUILD_BATCH),
        ).fetchall()
        if not rows:
            return total
        for rowid, namespace, content, tags_json in rows:
            index(connection, rowid, namespace, content, _stored_tags(tags_json))
        total += len(rows)
        after = int(rows[-1][0])
