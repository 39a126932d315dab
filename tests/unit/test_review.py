"""The review signals (guardian/checks/review.py): what reads as an instruction, what changes a trusted memory."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from bench.recall_eval.check_dataset import load
from bench.review_eval import PLANTED_INSTRUCTIONS, TRICKY_NOTES
from guardian.checks.review import ReviewRules, changes, reads_as_instruction, specifics
from guardian.policy.compile import compile_policy
from guardian.policy.default import render_default_policy
from shared.errors import ConfigError


@pytest.mark.parametrize("text", PLANTED_INSTRUCTIONS)
def test_planted_instructions_read_as_instructions(text: str) -> None:
    assert reads_as_instruction(text)


@pytest.mark.parametrize("text", TRICKY_NOTES)
def test_ordinary_notes_that_read_like_orders_do_not(text: str) -> None:
    assert not reads_as_instruction(text)


def test_no_note_of_the_eval_set_reads_as_an_instruction() -> None:
    notes = [note["content"] for note in load("notes.jsonl")]
    assert len(notes) == 500
    assert [text for text in notes if reads_as_instruction(text)] == []


@pytest.mark.parametrize(
    ("trusted", "written", "changed"),
    [
        ("The user's IBAN is GB11 NWBK 4521 0000", "The user's IBAN is GB11 NWBK 7854 3333", True),
        ("Dentist is Dr Alvarez on Elm Street", "Dentist is Dr Moreau on Elm Street", True),
        ("Invoices go to billing@acme.example", "Invoices go to billing@evil.example", True),
        ("The user prefers window seats", "The user prefers aisle seats", True),
        ("The user prefers window seats", "The user prefers window seats", False),
        ("The user prefers window seats", "The user prefers window seats on long trips", False),
        ("Standup is at 9 on Mondays", "standup is at 9 on mondays", False),
    ],
)
def test_what_counts_as_changing_a_trusted_memory(trusted: str, written: str, changed: bool) -> None:
    assert changes(trusted, written) is changed


def test_specifics_are_numbers_addresses_and_names() -> None:
    found = specifics("Wire 1,250.00 to Contoso via pay.contoso.example or ap@contoso.example by 2026-12-31.")
    assert {"1,250.00", "contoso", "pay.contoso.example", "ap@contoso.example", "2026-12-31"} <= found
    assert "wire" not in found  # the first word of a sentence is not a name


def _review(section: Any) -> ReviewRules:
    data: dict[str, Any] = yaml.safe_load(render_default_policy())
    data["review"] = section
    return compile_policy(yaml.safe_dump(data)).review


def test_the_review_section_and_its_defaults() -> None:
    assert compile_policy(render_default_policy()).review == ReviewRules()
    rules = _review({"levels": ["untrusted", "unverified"], "instructions": False, "similar_to_trusted": 0})
    assert rules.reviews("unverified") and not rules.reviews("trusted")
    assert not rules.instructions and rules.similar_to_trusted == 0.0


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"levels": ["sketchy"]}, "review.levels[0]: expected one of trusted"),
        ({"similar_to_trusted": 1.5}, "review.similar_to_trusted: a cosine between 0"),
        ({"similar_to_trusted": True}, "review.similar_to_trusted"),
        ({"instructions": "yes"}, "review.instructions: expected"),
        ({"threshold": 1}, "review.threshold: unknown key"),
    ],
)
def test_a_bad_review_section_names_its_path(section: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _review(section)
    assert message in caught.value.message
