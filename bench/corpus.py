"""The synthetic workload: memories, search queries and the ids that get reads.

Memories are sentences of pseudo-words (consonant-vowel syllables, lowercase
letters only, so no content filter matches them) drawn uniformly from a fixed
vocabulary, with two tags and a small metadata object, about 200 bytes of
content each: the size of a note an agent keeps. A query is
:data:`QUERY_WORDS` words from the same vocabulary, so at N memories each
query matches about ``N * QUERY_WORDS * WORDS_PER_MEMORY / VOCABULARY``
memories (the guardian joins query words with OR), and the share of matching
memories stays the same as N grows. Every memory also starts with
:data:`COMMON_WORDS`, the query of ``search_common``: words every memory holds,
whose search must still cost what a selective one costs (issue 15).

Everything is seeded, so two runs store and ask the same things.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "BATCH_SIZE",
    "COMMON_WORDS",
    "LIST_PAGE_SIZE",
    "QUERY_WORDS",
    "SEARCH_LIMIT",
    "VOCABULARY",
    "WORDS_PER_MEMORY",
    "Corpus",
    "MemoryText",
]

VOCABULARY: Final = 10_000
WORDS_PER_MEMORY: Final = 24
QUERY_WORDS: Final = 2
#: Words every memory starts with: the query of ``search_common`` (a search whose words are everywhere).
COMMON_WORDS: Final = "project memo"
#: Hits a search asks for, and memories a list page holds: what an agent reads at once.
SEARCH_LIMIT: Final = 10
LIST_PAGE_SIZE: Final = 10
#: Memories per store_batch call in the measurements (the default policy's max_batch).
BATCH_SIZE: Final = 20
#: Pages a list client follows (by cursor) before it starts again from the newest.
LIST_DEPTH: Final = 20
_TOPICS: Final = 50
_SYLLABLES: Final = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


def _word(index: int) -> str:
    """The index-th vocabulary word: three syllables, unique for every index below 70**3."""
    count = len(_SYLLABLES)
    return _SYLLABLES[index % count] + _SYLLABLES[(index // count) % count] + _SYLLABLES[(index // count**2) % count]


@dataclass(frozen=True)
class MemoryText:
    """One memory to store: content, tags and metadata (as an object; callers encode it)."""

    content: str
    tags: tuple[str, ...]
    metadata: dict[str, Any]


@dataclass
class Corpus:
    """Seeded generator of memories and queries, and the ids of the memories prefilled."""

    seed: int = 5
    #: Ids of the memories the prefill stored, which get reads pick from.
    ids: list[str] = field(default_factory=list)
    _rng: random.Random = field(init=False, repr=False)
    _words: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 - a workload, not a secret
        self._words = tuple(_word(index) for index in range(VOCABULARY))

    def memory(self, number: int) -> MemoryText:
        """A fresh memory; number only labels it (the words are random)."""
        words = self._rng.choices(self._words, k=WORDS_PER_MEMORY)
        return MemoryText(
            content=f"{COMMON_WORDS.capitalize()}: " + " ".join(words) + ".",
            tags=("bench", f"topic-{number % _TOPICS}"),
            metadata={"source": "bench", "n": number},
        )

    def batch(self, number: int, size: int = BATCH_SIZE) -> list[MemoryText]:
        """size fresh memories."""
        return [self.memory(number * size + offset) for offset in range(size)]

    def query(self) -> str:
        """A search: QUERY_WORDS vocabulary words."""
        return " ".join(self._rng.choices(self._words, k=QUERY_WORDS))

    def common_query(self) -> str:
        """A search whose words every memory holds."""
        return COMMON_WORDS

    def memory_id(self) -> str:
        """The id of a random prefilled memory."""
        if not self.ids:
            raise RuntimeError("no memory was prefilled, so get has nothing to read")
        return self._rng.choice(self.ids)

    def pick(self, items: Sequence[str]) -> str:
        """A random one of items."""
        return self._rng.choice(items)

    def describe(self) -> dict[str, Any]:
        """The workload's parameters, for the JSON."""
        return {
            "vocabulary": VOCABULARY,
            "words_per_memory": WORDS_PER_MEMORY,
            "query_words": QUERY_WORDS,
            "query_joined_by": "OR (the guardian's rule)",
            "search_limit": SEARCH_LIMIT,
            "list_page_size": LIST_PAGE_SIZE,
            "list_depth_pages": LIST_DEPTH,
            "store_batch_size": BATCH_SIZE,
            "seed": self.seed,
        }
