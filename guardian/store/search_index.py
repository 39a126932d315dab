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
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, Final

from guardian.store.scan_form import ASCII_INVISIBLE_RE, ScanForm

__all__ = [
    "COMMON_TERM_ROWS",
    "MAX_QUERY_WORDS",
    "STOPWORDS",
    "QueryTerm",
    "coverage",
    "index",
    "lexical_plan",
    "match_query",
    "optimize",
    "query_terms",
    "rebuild",
    "terms",
    "unindex",
]

#: English words too common to tell memories apart: a query's words are searched for without them
#: (unless it has no other word). NLTK's English stopword list, plus a few modal verbs and "also".
# fmt: off
STOPWORDS: Final[frozenset[str]] = frozenset({
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "your", "yours", "yourself", "yourselves",
    "he", "him", "his", "himself", "she", "her", "hers", "herself", "it", "its", "itself", "they", "them", "their",
    "theirs", "themselves", "what", "which", "who", "whom", "this", "that", "these", "those", "am", "is", "are",
    "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does", "did", "doing", "a", "an",
    "the", "and", "but", "if", "or", "because", "as", "until", "while", "of", "at", "by", "for", "with", "about",
    "against", "between", "into", "through", "during", "before", "after", "above", "below", "to", "from", "up",
    "down", "in", "out", "on", "off", "over", "under", "again", "further", "then", "once", "here", "there", "when",
    "where", "why", "how", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "no",
    "nor", "not", "only", "own", "same", "so", "than", "too", "very", "s", "t", "can", "will", "just", "don",
    "should", "now", "d", "ll", "m", "o", "re", "ve", "y", "ain", "aren", "couldn", "didn", "doesn", "hadn", "hasn",
    "haven", "isn", "ma", "mightn", "mustn", "needn", "shan", "shouldn", "wasn", "weren", "won", "wouldn", "would",
    "could", "might", "must", "shall", "also",
})
# fmt: on
#: Words of a query that are searched for (the rest are ignored).
MAX_QUERY_WORDS: Final = 32
_TAG_HEX: Final = 12
_REBUILD_BATCH: Final = 2000
_ASCII_WORD_RE: Final = re.compile(r"[a-z0-9]+")


def _namespace_tag(namespace: str) -> str:
    return "n" + hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:_TAG_HEX]


def _is_word_char(char: str) -> bool:
    if char.isascii():
        return char.isalnum()
    category = unicodedata.category(char)
    return category[0] in "LN" or category == "Co"


def words(text: str) -> list[str]:
    """The words of text as the index knows them (see the module docstring)."""
    if text.isascii():
        # The same words, by one regex: ASCII's scan form only drops its control characters (all but
        # tab, newline and return), casefolding is lowering, and NFD and the marks change nothing.
        return _ASCII_WORD_RE.findall(ASCII_INVISIBLE_RE.sub("", text).lower())
    return unicode_words(text)


def unicode_words(text: str) -> list[str]:
    """words() of any text, character by character (words() takes a shortcut for ASCII)."""
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


#: How many of a caller's memories may hold a query term before it counts as common (lexical_plan).
COMMON_TERM_ROWS: Final = 2000
#: One term of a query: the words of one whitespace-separated token of it. One word is matched as
#: such; several (``ERR_CONN_RESET``, ``24.0.4``, a path) as a phrase, those words in that order.
QueryTerm = tuple[str, ...]


def query_terms(text: str) -> list[QueryTerm]:
    """The distinct terms of a query that are searched for, in order: all but stopwords, unless all are.

    At most MAX_QUERY_WORDS words in all.
    """
    found = list(dict.fromkeys(term for token in text.split() if (term := tuple(words(token)))))
    telling = [term for term in found if len(term) > 1 or term[0] not in STOPWORDS]
    kept: list[QueryTerm] = []
    budget = MAX_QUERY_WORDS
    for term in telling or found:
        if len(term) > budget:
            break
        kept.append(term)
        budget -= len(term)
    return kept


def match_query(terms: Sequence[QueryTerm], namespaces: Sequence[str]) -> str:
    """The FTS5 query for terms in any of namespaces: each term quoted (a phrase), and a phrase's words
    alone too (a memory with the words in a row ranks above one with them apart), joined by OR.

    Every term is a quoted string of letters and digits only, so agent text is never FTS syntax.
    """
    tags = [_namespace_tag(namespace) for namespace in namespaces]
    wanted = dict.fromkeys([*terms, *((word,) for term in terms if len(term) > 1 for word in term)])
    return " OR ".join('"' + " ".join(tag + word for word in term) + '"' for term in wanted for tag in tags)


def lexical_plan(connection: Any, terms: Sequence[QueryTerm], namespaces: Sequence[str]) -> tuple[str, bool]:
    """The FTS5 query for a search's lexical leg, and whether FTS5 may rank all it matches.

    A term that COMMON_TERM_ROWS or more of the caller's memories hold (counted only that
    far, so finding out costs at most that many postings) would make ranking cost as many
    rows as it matches (bm25 reads every posting of a term to count them), and tells little:
    its idf is small. The query is the other terms, ranked by bm25 as usual (True); when every
    term is that common, it is all of them together (AND), not ranked (False: the caller takes
    the newest matches). Either way the cost is bounded by the terms and the depth asked for,
    not by how many memories hold the words.
    """
    telling = [
        term
        for term in terms
        if connection.execute(
            "SELECT count(*) FROM (SELECT 1 FROM memory_terms WHERE memory_terms MATCH ? LIMIT ?)",
            (match_query([term], namespaces), COMMON_TERM_ROWS),
        ).fetchone()[0]
        < COMMON_TERM_ROWS
    ]
    if telling:
        return match_query(telling, namespaces), True
    return " AND ".join(f"({match_query([term], namespaces)})" for term in terms), False


def coverage(terms: Sequence[QueryTerm], text: str) -> float:
    """The share of terms that text holds (a phrase term: its words in a row)."""
    if not terms:
        return 0.0
    held = words(text)
    present = set(held)
    found = 0
    for term in terms:
        if len(term) == 1:
            found += term[0] in present
        elif all(word in present for word in term):
            width = len(term)
            found += any(tuple(held[at : at + width]) == term for at in range(len(held) - width + 1))
    return found / len(terms)


def optimize(connection: Any) -> None:
    """Merge the whole index into one segment (FTS5's 'optimize'), in the caller's transaction.

    FTS5 writes each transaction's terms as a new segment and merges segments a few pages
    at a time as later writes come. A bulk write (the index rebuilt on an upgrade, or
    thousands of memories a transaction) leaves many large segments, which each later
    write then pays for: on bare SQLCipher with this table, a single-memory insert takes
    654 us of CPU at 1M memories after a fill of 10,000 a transaction, and 328 us once the
    index is optimized (327 us at 1k). At 200k: 669 us after a bulk fill, 362 us optimized,
    409 us for a table grown one memory a transaction. FTS5's positive 'merge' command does
    not help there: it finds no level with enough segments to merge (one step, no change).
    At 1M memories it takes about 3 s.
    """
    connection.execute("INSERT INTO memory_terms (memory_terms) VALUES ('optimize')")


def rebuild(connection: Any) -> int:
    """Index every active memory again from scratch (schema migration 5), optimized; how many."""
    connection.execute("DELETE FROM memory_terms")
    after, total = -1, 0
    while True:
        rows = connection.execute(
            "SELECT rowid, namespace, content, tags FROM memories WHERE rowid > ? AND status = 'active'"
            " ORDER BY rowid LIMIT ?",
            (after, _REBUILD_BATCH),
        ).fetchall()
        if not rows:
            optimize(connection)
            return total
        for rowid, namespace, content, tags_json in rows:
            index(connection, rowid, namespace, content, _stored_tags(tags_json))
        total += len(rows)
        after = int(rows[-1][0])
