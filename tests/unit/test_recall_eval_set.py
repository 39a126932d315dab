"""The eval set of recall by meaning (bench/recall_eval) keeps its rules: a question in other words shares no
content word with its note, exact lookups occur in exactly one note, enough of each (the checker's rules)."""

from __future__ import annotations

from bench.recall_eval.check_dataset import check


def test_the_eval_set_keeps_every_rule_of_its_checker() -> None:
    problems, stats = check()
    assert problems == []
    counts = {name: stats[name] for name in ("paraphrase", "own_words", "exact")}
    assert counts == {"paraphrase": 230, "own_words": 60, "exact": 30}
