"""Check the recall-by-meaning evaluation set; exit 1 listing every violation.

    python -m bench.recall_eval.check_dataset      (or: python bench/recall_eval/check_dataset.py)

Rules:
- notes.jsonl: at least 500 notes, ids n001..nNNN unique and contiguous, content 40-400
  characters, tags a non-empty list of strings, no two notes near-duplicates (content-word
  Jaccard or character 5-gram Jaccard at or above 0.5);
- paraphrase.jsonl: at least 200 unique queries whose answer exists and that share NO content
  word with the target note's content or tags after casefolding, removing diacritics and
  English stopwords, and crude stemming (see textnorm.stem);
- own_words.jsonl: at least 60 unique queries whose answer exists and that share at least two
  content words (same normalisation and stemming) with the target note's content;
- exact.jsonl: 30 unique queries whose answer exists and whose text occurs verbatim
  (case-insensitive) in exactly one note's content: the answer;
- no query appears in two of the three query files.
"""

from __future__ import annotations

import json
import re
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.recall_eval.textnorm import content_stems, content_words, stem

HERE = Path(__file__).resolve().parent
MIN_NOTES, MIN_PARAPHRASE, MIN_OWN_WORDS, N_EXACT = 500, 200, 60, 30
MIN_SHARED_OWN_WORDS = 2
MIN_CHARS, MAX_CHARS = 40, 400
NEAR_DUP = 0.5


def load(name: str) -> list[dict[str, Any]]:
    rows = []
    with open(HERE / name, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{name}:{number}: not JSON: {exc}") from None
    return rows


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _shingles(text: str, k: int = 5) -> set[str]:
    s = re.sub(r"\s+", " ", text.casefold())
    return {s[i : i + k] for i in range(max(1, len(s) - k + 1))}


def check_notes(notes: list[dict[str, Any]]) -> tuple[list[str], str]:
    problems: list[str] = []
    if len(notes) < MIN_NOTES:
        problems.append(f"notes: {len(notes)} notes, expected at least {MIN_NOTES}")
    ids = [n.get("id") for n in notes]
    dup_ids = sorted({str(i) for i in ids if ids.count(i) > 1})
    if dup_ids:
        problems.append(f"notes: duplicate ids {dup_ids}")
    for n in notes:
        nid, content, tags = n.get("id"), n.get("content"), n.get("tags")
        if set(n) != {"id", "content", "tags"}:
            problems.append(f"{nid}: keys {sorted(n)} != ['content', 'id', 'tags']")
        if not isinstance(nid, str) or not re.fullmatch(r"n\d{3}", nid):
            problems.append(f"{nid!r}: id is not of the form n001")
        if not isinstance(content, str) or not MIN_CHARS <= len(content) <= MAX_CHARS:
            size = len(content) if isinstance(content, str) else "?"
            problems.append(f"{nid}: content length {size} outside {MIN_CHARS}-{MAX_CHARS}")
        if not (isinstance(tags, list) and tags and all(isinstance(t, str) and t for t in tags)):
            problems.append(f"{nid}: tags must be a non-empty list of strings")
    if sorted(str(i) for i in ids) != [f"n{i:03d}" for i in range(1, len(notes) + 1)]:
        problems.append("notes: ids are not exactly n001..nNNN")
    texts = {str(n.get("id")): str(n.get("content", "")) for n in notes}
    wordsets = {i: set(content_words(t)) for i, t in texts.items()}
    shingles = {i: _shingles(t) for i, t in texts.items()}
    worst = (0.0, "", "")
    for a, b in combinations(texts, 2):
        jw, js = _jaccard(wordsets[a], wordsets[b]), _jaccard(shingles[a], shingles[b])
        worst = max(worst, (max(jw, js), a, b))
        if max(jw, js) >= NEAR_DUP:
            problems.append(f"{a}/{b}: near-duplicates (word Jaccard {jw:.2f}, 5-gram Jaccard {js:.2f})")
    return problems, f"{worst[1]}/{worst[2]} ({worst[0]:.2f})"


def check_paraphrase(para: list[dict[str, Any]], by_id: dict[str, dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    if len(para) < MIN_PARAPHRASE:
        problems.append(f"paraphrase: {len(para)} queries, expected at least {MIN_PARAPHRASE}")
    queries = [p.get("query") for p in para]
    if len(set(queries)) != len(queries):
        problems.append("paraphrase: duplicate queries")
    for p in para:
        q, ans = str(p.get("query", "")), p.get("answer")
        if ans not in by_id:
            problems.append(f"paraphrase {q!r}: answer {ans!r} is not a note id")
            continue
        note = by_id[ans]
        shared = content_stems(q) & content_stems(note["content"] + " " + " ".join(note["tags"]))
        if shared:
            qwords = sorted(w for w in content_words(q) if stem(w) in shared)
            problems.append(f"paraphrase {q!r} -> {ans}: shares content words {qwords} (stems {sorted(shared)})")
        if not content_words(q):
            problems.append(f"paraphrase {q!r}: no content words at all")
    return problems


def check_own_words(own: list[dict[str, Any]], by_id: dict[str, dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    if len(own) < MIN_OWN_WORDS:
        problems.append(f"own_words: {len(own)} queries, expected at least {MIN_OWN_WORDS}")
    queries = [o.get("query") for o in own]
    if len(set(queries)) != len(queries):
        problems.append("own_words: duplicate queries")
    for o in own:
        q, ans = str(o.get("query", "")), o.get("answer")
        if ans not in by_id:
            problems.append(f"own_words {q!r}: answer {ans!r} is not a note id")
            continue
        shared = content_stems(q) & content_stems(by_id[ans]["content"])
        if len(shared) < MIN_SHARED_OWN_WORDS:
            problems.append(
                f"own_words {q!r} -> {ans}: shares {len(shared)} content word(s) {sorted(shared)}, "
                f"expected at least {MIN_SHARED_OWN_WORDS}"
            )
    return problems


def check_across(sets: dict[str, list[dict[str, Any]]]) -> list[str]:
    """No query text in two query files."""
    seen: dict[str, str] = {}
    problems: list[str] = []
    for name, rows in sets.items():
        for q in {str(r.get("query", "")) for r in rows}:
            if q in seen:
                problems.append(f"query {q!r} is in both {seen[q]} and {name}")
            seen.setdefault(q, name)
    return problems


def check_exact(
    exact: list[dict[str, Any]], notes: list[dict[str, Any]], by_id: dict[str, dict[str, Any]]
) -> list[str]:
    problems: list[str] = []
    if len(exact) != N_EXACT:
        problems.append(f"exact: {len(exact)} queries, expected {N_EXACT}")
    queries = [e.get("query") for e in exact]
    if len(set(queries)) != len(queries):
        problems.append("exact: duplicate queries")
    for e in exact:
        q, ans = str(e.get("query", "")), e.get("answer")
        if ans not in by_id:
            problems.append(f"exact {q!r}: answer {ans!r} is not a note id")
            continue
        holders = [n["id"] for n in notes if q.casefold() in str(n.get("content", "")).casefold()]
        if holders != [ans]:
            problems.append(f"exact {q!r} -> {ans}: occurs verbatim in {holders or 'no note'}")
    return problems


def check() -> tuple[list[str], dict[str, object]]:
    notes = load("notes.jsonl")
    para, own, exact = load("paraphrase.jsonl"), load("own_words.jsonl"), load("exact.jsonl")
    problems, most_similar = check_notes(notes)
    by_id = {n["id"]: n for n in notes if isinstance(n.get("id"), str)}
    problems += check_paraphrase(para, by_id)
    problems += check_own_words(own, by_id)
    problems += check_exact(exact, notes, by_id)
    problems += check_across({"paraphrase": para, "own_words": own, "exact": exact})
    stats: dict[str, object] = {
        "notes": len(notes),
        "paraphrase": len(para),
        "own_words": len(own),
        "exact": len(exact),
        "content chars min/median/max": _lengths(notes),
        "most similar pair": most_similar,
    }
    return problems, stats


def _lengths(notes: list[dict[str, Any]]) -> str:
    ls = sorted(len(str(n.get("content", ""))) for n in notes) or [0]
    return f"{ls[0]}/{ls[len(ls) // 2]}/{ls[-1]}"


def main() -> int:
    problems, stats = check()
    for key, value in stats.items():
        print(f"{key}: {value}")
    if problems:
        print(f"\nFAILED: {len(problems)} violation(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print("OK: all dataset rules hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
