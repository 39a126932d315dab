"""Recall quality of a real guardian on the eval set: recall@1, recall@5 and MRR@10 per search mode.

    python -m bench.recall_eval.quality [--json PATH]

A guardian on a fresh state dir (the bench policy) gets the 500 notes of
notes.jsonl as one agent's memories (StoreBatch over gRPC), then every question of
paraphrase.jsonl (other words than the note), own_words.jsonl (the note's words)
and exact.jsonl (ids, codes, paths, versions) is asked with each mode (hybrid,
lexical, semantic) through the agent socket, as an agent would. ``make bench``
prints this table beside the latency figures.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import grpc

from bench.procs import BenchGuardian
from bench.recall_eval.check_dataset import load
from bench.report import measure_and_print
from shared.rpc.guardian.v1 import agent_pb2 as pb
from shared.rpc.guardian.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["QUERY_SETS", "measure_recall", "render_recall"]

QUERY_SETS: Final = ("paraphrase", "own_words", "exact")
MODES: Final = {"hybrid": pb.SEARCH_MODE_HYBRID, "lexical": pb.SEARCH_MODE_LEXICAL, "semantic": pb.SEARCH_MODE_SEMANTIC}
_BATCH: Final = 50
_DEPTH: Final = 10


def metrics(rankings: Sequence[Sequence[int]], answers: Sequence[int]) -> dict[str, float]:
    """recall@1, recall@5 and MRR@10 of rankings (note indexes, best first) against each query's answer."""
    r1 = r5 = reciprocal = 0.0
    for ranking, answer in zip(rankings, answers, strict=True):
        top = list(ranking[:10])
        if answer in top:
            rank = top.index(answer) + 1
            reciprocal += 1.0 / rank
            r1 += rank == 1
            r5 += rank <= 5
    return {"r@1": r1 / len(answers), "r@5": r5 / len(answers), "mrr@10": reciprocal / len(answers)}


def measure_recall(temp_root: Path) -> dict[str, Any]:
    """{mode: {query set: {r@1, r@5, mrr@10}}} and the counts, measured on a guardian under temp_root."""
    notes = load("notes.jsonl")
    sets = {name: load(f"{name}.jsonl") for name in QUERY_SETS}
    guardian = BenchGuardian(temp_root / "recall")
    try:
        guardian.prepare()
        guardian.start()
        token = guardian.add_agent("recall")
        with grpc.insecure_channel(f"unix:{guardian.agent_socket}") as channel:
            stub = pb_grpc.AgentServiceStub(channel)
            sid = stub.OpenSession(pb.OpenSessionRequest(agent_token=token), timeout=15).session_id
            note_of: dict[str, int] = {}
            for start in range(0, len(notes), _BATCH):
                chunk = notes[start : start + _BATCH]
                drafts = [pb.MemoryDraft(content=n["content"], tags=n.get("tags", [])) for n in chunk]
                stored = stub.StoreBatch(pb.StoreBatchRequest(session_id=sid, memories=drafts), timeout=60).memories
                note_of.update({memory.id: start + index for index, memory in enumerate(stored)})
            answer_of = {note["id"]: index for index, note in enumerate(notes)}
            results: dict[str, Any] = {}
            for mode, value in MODES.items():
                results[mode] = {}
                for name, questions in sets.items():
                    rankings = [
                        [
                            note_of[hit.memory.id]
                            for hit in stub.Search(
                                pb.SearchRequest(session_id=sid, query=q["query"], limit=_DEPTH, mode=value), timeout=15
                            ).hits
                        ]
                        for q in questions
                    ]
                    results[mode][name] = metrics(rankings, [answer_of[q["answer"]] for q in questions])
    finally:
        guardian.stop()
        shutil.rmtree(temp_root / "recall", ignore_errors=True)
    return {"notes": len(notes), "questions": {name: len(qs) for name, qs in sets.items()}, "modes": results}


def render_recall(recall: dict[str, Any]) -> str:
    """The recall figures as a table: a row per mode, recall@1, recall@5 and MRR@10 per query set."""
    counts = recall["questions"]
    head = f"{'search mode':<12}" + "".join(f" | {f'{name} ({counts[name]})':<22}" for name in QUERY_SETS)
    sub = f"{'':<12}" + "".join(f" | {'r@1':>6} {'r@5':>6} {'mrr':>6}  " for _ in QUERY_SETS)
    lines = [f"recall on the eval set (bench/recall_eval: {recall['notes']} notes)", head, sub, "-" * len(sub)]
    for mode, by_set in recall["modes"].items():
        cells = "".join(
            f" | {by_set[name]['r@1']:>6.3f} {by_set[name]['r@5']:>6.3f} {by_set[name]['mrr@10']:>6.3f}  "
            for name in QUERY_SETS
        )
        lines.append(f"{mode:<12}{cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; write the JSON when asked."""
    return measure_and_print(
        argv,
        prog="python -m bench.recall_eval.quality",
        description=__doc__,
        measure=measure_recall,
        render=render_recall,
    )


if __name__ == "__main__":
    raise SystemExit(main())
