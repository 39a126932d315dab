"""The scan form of agent text: what the content filters and the search index read, mapped back to the original.

A memory is stored exactly as it was sent. The filters must still see through the
usual evasions (fullwidth letters, ligatures, a key split by a zero-width space), so
they scan a normalised copy, the *scan form*, and never store it.

The scan form is built one extended grapheme cluster at a time: each cluster becomes
its Unicode NFKC form with the invisible characters removed (controls and format
characters except newline, carriage return and tab: zero-width spaces and joiners,
soft hyphen, bidi controls, BOM, tag characters; lone surrogates; the combining
grapheme joiner, Hangul fillers and variation selectors). Every character of the
scan form therefore comes from exactly one cluster of the original, and a match in
the scan form maps back to the original (:meth:`ScanForm.original_span`), to whole
clusters wherever the scan form changed one: that is what a redaction replaces, so a
redaction never leaves half of a letter and its accents, or of a joined emoji.

Cost is linear in the original: a cluster whose NFKC form is more than
:data:`MAX_GROWTH` times its length (U+FDFA is 18 characters in NFKC) is scanned as
written, so the scan form is never more than :data:`MAX_GROWTH` times as long as the
original. Text that is already NFKC with nothing invisible (most text) is its own scan
form, found by two C-speed checks.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import regex

__all__ = ["ASCII_INVISIBLE_RE", "MAX_GROWTH", "ScanForm"]

#: A cluster's scan form is at most this many times its length (else the cluster is scanned as written).
MAX_GROWTH: Final = 3

#: Removed from the scan form: controls and format characters (but newline, carriage return and tab),
#: lone surrogates, and invisible characters outside Cf (combining grapheme joiner, Hangul fillers,
#: variation selectors).
_INVISIBLE: Final = r"(?![\n\r\t])[\p{Cc}\p{Cf}\p{Cs}\u034f\u115f\u1160\u3164\uffa0\ufe00-\ufe0f\U000e0100-\U000e01ef]"
_INVISIBLE_RE: Final = regex.compile(_INVISIBLE)
#: A character that the scan form changes or drops, or that may compose with the one before it.
_TROUBLE_RE: Final = regex.compile(r"[\p{NFKC_QC=N}\p{NFKC_QC=M}]|" + _INVISIBLE)
#: The only troublesome characters in ASCII text (a quicker check for the common case): the scan form
#: drops them (search_index.words relies on it).
ASCII_INVISIBLE_RE: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CLUSTER_RE: Final = regex.compile(r"\X")


def _is_extending(char: str) -> bool:
    """Whether char continues the cluster before it (a mark or a joiner), so the cluster starts earlier."""
    return unicodedata.category(char)[0] == "M" or char in "\u200c\u200d" or "\ufe00" <= char <= "\ufe0f"


@dataclass(frozen=True, slots=True)
class _Segment:
    """A piece of the original and the scan form it became."""

    scan_start: int
    original_start: int
    original_end: int
    #: Whether the piece is its own scan form (then each character maps to itself).
    identity: bool


class ScanForm:
    """The scan form of one text, and the way back from a span of it to a span of the original."""

    __slots__ = ("_scan_starts", "_segments", "original", "text")

    def __init__(self, original: str, text: str, segments: Sequence[_Segment]) -> None:
        #: The text as it was sent (and is stored).
        self.original = original
        #: The scan form: what the filters match and the search index reads.
        self.text = text
        self._segments = tuple(segments)
        self._scan_starts = [segment.scan_start for segment in self._segments]

    @classmethod
    def of(cls, original: str) -> ScanForm:
        """The scan form of original (linear time; see the module docstring)."""
        if original.isascii() and ASCII_INVISIBLE_RE.search(original) is None:
            return cls(original, original, [_Segment(0, 0, len(original), identity=True)])
        trouble = _TROUBLE_RE.search(original)
        if trouble is None:
            return cls(original, original, [_Segment(0, 0, len(original), identity=True)])
        pieces: list[str] = []
        segments: list[_Segment] = []
        scan_at = done = 0
        while trouble is not None:
            # Back up to the start of the cluster holding the troublesome character: over the marks
            # and joiners before it, then their base.
            start = trouble.start()
            while start > done and _is_extending(original[start]):
                start -= 1
            if start > done:
                segments.append(_Segment(scan_at, done, start, identity=True))
                pieces.append(original[done:start])
                scan_at += start - done
            done = start
            while done <= trouble.start():
                cluster_match = _CLUSTER_RE.match(original, done)
                cluster_end = cluster_match.end() if cluster_match is not None else done + 1
                cluster = original[done:cluster_end]
                composed = unicodedata.normalize("NFKC", cluster)
                if len(composed) > MAX_GROWTH * len(cluster):
                    composed = cluster
                scanned = _INVISIBLE_RE.sub("", composed)
                segments.append(_Segment(scan_at, done, cluster_end, identity=False))
                pieces.append(scanned)
                scan_at += len(scanned)
                done = cluster_end
            trouble = _TROUBLE_RE.search(original, done)
        if done < len(original):
            segments.append(_Segment(scan_at, done, len(original), identity=True))
            pieces.append(original[done:])
        return cls(original, "".join(pieces), segments)

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The span of the original that scan-form span [start, end) came from (whole clusters; end > start)."""
        first = self._segments[bisect.bisect_right(self._scan_starts, start) - 1]
        last = self._segments[bisect.bisect_right(self._scan_starts, end - 1) - 1]
        original_start = first.original_start + (start - first.scan_start if first.identity else 0)
        original_end = last.original_start + (end - last.scan_start) if last.identity else last.original_end
        return original_start, original_end

    def replaced(self, spans: Sequence[tuple[int, int]], marker: str) -> str:
        """The original with the clusters under each scan-form span replaced by marker (spans in order).

        Two matches that fall in one cluster of the original get one marker.
        """
        merged: list[list[int]] = []
        for start, end in spans:
            original_start, original_end = self.original_span(start, end)
            if merged and original_start < merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], original_end)
            else:
                merged.append([original_start, original_end])
        pieces: list[str] = []
        kept_from = 0
        for original_start, original_end in merged:
            pieces += [self.original[kept_from:original_start], marker]
            kept_from = original_end
        pieces.append(self.original[kept_from:])
        return "".join(pieces)
