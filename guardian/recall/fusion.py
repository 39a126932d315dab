"""Reciprocal rank fusion: one ranking from the lexical and the semantic legs of a search.

A memory's fused score is the sum over the legs that found it of
``weight / (k + rank)`` (rank from 1). Ranks, not scores, are fused: BM25 and
cosine are on scales that cannot be compared.

A lexical hit counts by how much of the query it holds (its *coverage*, from 0 to
1: the share of the query's terms in it): one holding less than half is not a
match by words at all, and the others weigh coverage squared. Without this, a
question in other words than its memory's is drowned by memories that share one
common word with it (on the eval set: recall@5 0.27 fused against 0.50 for the
semantic leg alone); with it, fusion loses nothing there, and exact lookups
(names, ids, paths, error codes), which the lexical leg finds fully, keep their
rank. ``k`` and the rest were chosen on bench/recall_eval (``make bench`` prints
recall@5 and MRR for each mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = ["FUSION_K", "LEXICAL_WEIGHT", "MIN_COVERAGE", "SEMANTIC_WEIGHT", "Fused", "fuse"]

FUSION_K: Final = 10
LEXICAL_WEIGHT: Final = 1.0
SEMANTIC_WEIGHT: Final = 1.0
#: A lexical hit holding less of the query than this is not a match by words.
MIN_COVERAGE: Final = 0.5


@dataclass(frozen=True)
class Fused:
    """One memory in the fused ranking: its score and its rank in each leg (0: that leg did not find it)."""

    rowid: int
    score: float
    lexical_rank: int = 0
    semantic_rank: int = 0


def fuse(
    lexical: Sequence[tuple[int, float]],
    semantic: Sequence[int],
    *,
    k: int = FUSION_K,
    lexical_weight: float = LEXICAL_WEIGHT,
    semantic_weight: float = SEMANTIC_WEIGHT,
) -> list[Fused]:
    """Both rankings fused, best first; ties by lexical rank.

    lexical: (rowid, coverage) best first; semantic: rowids, best first.
    """
    matched = [(rowid, share) for rowid, share in lexical if share >= MIN_COVERAGE]
    lexical_rank = {rowid: rank for rank, (rowid, _) in enumerate(matched, 1)}
    lexical_share = dict(matched)
    semantic_rank = {rowid: rank for rank, rowid in enumerate(semantic, 1)}
    fused = [
        Fused(
            rowid,
            (lexical_weight * lexical_share[rowid] ** 2 / (k + lexical_rank[rowid]) if rowid in lexical_rank else 0.0)
            + (semantic_weight / (k + semantic_rank[rowid]) if rowid in semantic_rank else 0.0),
            lexical_rank.get(rowid, 0),
            semantic_rank.get(rowid, 0),
        )
        for rowid in dict.fromkeys([*lexical_rank, *semantic])
    ]
    fused.sort(key=lambda hit: (-hit.score, hit.lexical_rank or len(matched) + 1, hit.semantic_rank))
    return fused
