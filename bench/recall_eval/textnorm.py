"""Text normalisation shared by the dataset checker and the measurement (standard library only).

Words are maximal runs of Unicode letters and digits after casefolding and removal of
diacritics (close to FTS5's unicode61 tokenizer with remove_diacritics); content words are
those words minus English stopwords; ``stem`` is the crude suffix stripper the dataset
rule is defined with.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from guardian.store import search_index

#: The stopwords the guardian's search drops from a query (NLTK's English list, plus a few).
STOPWORDS: Final[frozenset[str]] = search_index.STOPWORDS

_WORD = re.compile(r"[^\W_]+")


def fold(text: str) -> str:
    """Casefolded text without combining marks (é -> e)."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def words(text: str) -> list[str]:
    """All words of text, folded, in order."""
    return _WORD.findall(fold(text))


def content_words(text: str) -> list[str]:
    """Words of text that are not stopwords, in order."""
    return [w for w in words(text) if w not in STOPWORDS]


def stem(word: str) -> str:
    """Crude stem: strip one of -ing/-ed/-es/-s (not -ss), then a final -e.

    The final-e step makes "use", "uses", "used" and "using" meet, which makes the
    "shares no content word" rule stricter than plain suffix stripping.
    """
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 2:
            if suffix == "s" and word.endswith("ss"):
                break
            word = word[: -len(suffix)]
            break
    if word.endswith("e") and len(word) > 2:
        word = word[:-1]
    return word


def content_stems(text: str) -> set[str]:
    return {stem(w) for w in content_words(text)}
