"""The scan form (guardian/store/scan_form.py): what the filters see, how a match maps back to the text as sent,
and that building it costs at most a constant times the text's size."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardian.store.scan_form import MAX_GROWTH, ScanForm


@pytest.mark.parametrize(
    ("raw", "scanned"),
    [
        ("\uff21\uff2b\uff29\uff21\uff11\uff12", "AKIA12"),  # fullwidth letters and digits
        ("\ufb01le", "file"),  # ligature
        ("x\u00a0y\u3000z", "x y z"),  # no-break and ideographic space
        ("e\u0301", "\u00e9"),  # composed
        ("bell\x07 nul\x00 esc\x1b del\x7f c1\x85", "bell nul esc del c1"),
        ("keep\nlines\tand tabs\r\n", "keep\nlines\tand tabs\r\n"),
        ("tag\U000e0041\U000e0042chars", "tagchars"),  # Unicode tag characters (ASCII smuggling)
        ("vs\ufe0fsel\U000e0100ector", "vsselector"),  # variation selectors
        ("cgj\u034fhangul\u3164fill", "cgjhangulfill"),
        ("\U0001f468\u200d\U0001f469", "\U0001f468\U0001f469"),  # a joined emoji loses its joiner
        ("plain text stays", "plain text stays"),
    ],
)
def test_the_scan_form(raw: str, scanned: str) -> None:
    form = ScanForm.of(raw)
    assert form.text == scanned
    assert form.original == raw


INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e"]
INVISIBLE += [chr(code) for code in range(0x202A, 0x202F)] + [chr(code) for code in range(0x2066, 0x206A)]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_zero_width_and_bidi_characters_are_not_in_the_scan_form(char: str) -> None:
    assert ScanForm.of(f"a{char}b{char}").text == "ab"


def test_a_match_maps_back_to_what_it_came_from() -> None:
    form = ScanForm.of("ab\u200bcd \uff50\uff41\uff53\uff53=x \U0001f468\u200d\U0001f469!")
    assert form.text == "abcd pass=x \U0001f468\U0001f469!"
    assert form.original_span(0, 4) == (0, 5)  # the zero-width space inside is part of the match
    assert form.original_span(5, 9) == (6, 10)  # four fullwidth letters
    start = form.text.index("\U0001f468")
    assert form.original_span(start, start + 1) == (start + 1, start + 4)  # the whole joined emoji
    assert form.replaced([(5, 9)], "[x]") == "ab\u200bcd [x]=x \U0001f468\u200d\U0001f469!"


def test_two_matches_in_one_cluster_get_one_marker() -> None:
    form = ScanForm.of("\ufb01")  # the ligature is "fi": two characters of the scan form from one of the original
    assert form.replaced([(0, 1), (1, 2)], "[x]") == "[x]"


def test_a_character_that_expands_too_much_is_scanned_as_written() -> None:
    bomb = "\ufdfa" * 21_845  # 65,535 bytes; NFKC would make it 393,210 characters
    form = ScanForm.of(bomb)
    assert form.text == bomb
    assert len(unicodedata.normalize("NFKC", bomb)) == 18 * len(bomb)


@given(st.text(max_size=200))
def test_any_text_round_trips_and_its_scan_form_is_bounded(text: str) -> None:
    form = ScanForm.of(text)
    assert form.original == text
    assert form.replaced([], "[x]") == text
    assert len(form.text) <= MAX_GROWTH * len(text)
    for start in range(len(form.text)):
        original_start, original_end = form.original_span(start, start + 1)
        assert 0 <= original_start < original_end <= len(text)


@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=100))
def test_a_redaction_of_everything_leaves_only_the_marker_and_invisible_edges(text: str) -> None:
    form = ScanForm.of(text)
    if not form.text:
        return
    redacted = form.replaced([(0, len(form.text))], "[x]")
    before, marker, after = redacted.partition("[x]")
    assert marker == "[x]"
    assert ScanForm.of(before).text == "" and ScanForm.of(after).text == ""
