"""Review signals: an untrusted write that looks like planting is held for the security team, not stored active.

Part of the content stage (guardian/service/pipeline.py), for writes whose trust
(guardian/recall/trust.py) is one the policy's ``review.levels`` names (shipped:
``untrusted``). Two signals, each named in the memory's filter hits and the audit
row when it holds a write:

``review:instruction``
    The text (its scan form: content and metadata strings) reads as an instruction
    to future turns rather than a note: "from now on ...", "ignore previous
    instructions", "when the user asks about X, recommend Y", "do not tell the
    user", "the assistant must ...", "always respond ...". Patterns address an
    assistant or a future conversation, never a person's own to-do ("remind them
    to ...", "always back up before ..." pass).
``review:changes-trusted``
    The write is close by meaning (cosine at least ``review.similar_to_trusted``) to
    a trusted memory the writer can read, and changes it: a specific detail
    differs (a number, an address, a name, an account), or words of the trusted
    one are replaced. The "update the user's payment details" pattern. Only the
    writer's own namespaces are compared, so the verdict tells it nothing about
    memories it cannot read.

Measured on bench/recall_eval's 500 ordinary notes (``python -m bench.review_eval``,
README): how many ordinary notes each signal holds, and how many planted changes
of trusted notes it catches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from guardian.recall.trust import TRUST_LEVELS, TrustLevel

__all__ = [
    "CHANGES_TRUSTED",
    "INSTRUCTION",
    "ReviewRules",
    "changes",
    "reads_as_instruction",
    "specifics",
]

#: The signals' names, as the filter hits and the audit row record them.
INSTRUCTION: Final = "review:instruction"
CHANGES_TRUSTED: Final = "review:changes-trusted"


@dataclass(frozen=True)
class ReviewRules:
    """The policy's ``review`` section."""

    #: Trust levels of the writes that are reviewed.
    levels: frozenset[TrustLevel] = frozenset({"untrusted"})
    instructions: bool = True
    #: The least cosine with a trusted memory at which a change to it is held; 0 turns the signal off.
    similar_to_trusted: float = 0.80

    def reviews(self, level: TrustLevel) -> bool:
        """Whether a write of this trust level is reviewed."""
        return level in self.levels and level in TRUST_LEVELS


_ADDRESSEE: Final = r"(?:the\s+|any\s+|all\s+|every\s+)?(?:ai\s+)?(?:assistant|agent|ai|llm|chatbot)s?"
_REFERENT: Final = r"(?:the\s+user|users?|someone|anyone|anybody|they|he|she|people|customers?|clients?)"
_INSTRUCTION_PATTERNS: Final = (
    # Overriding what the agent was told.
    r"\b(?:ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}\b(?:previous|prior|earlier|above|all|any|your|"
    r"system|original|safety)\b[^.\n]{0,20}\b(?:instructions?|prompts?|rules?|guidelines?|directions?|policies)\b",
    r"\b(?:new|updated|hidden|real|true|secret|additional)\s+(?:system\s+prompt|instructions)\b",
    r"(?:^|\n)\s*(?:system(?:\s+prompt)?|developer(?:\s+message)?|instructions?)\s*:",
    r"\b(?:note|message|instructions?|reminder)\s+(?:to|for)\s+" + _ADDRESSEE + r"\b",
    # Redirecting future turns.
    r"\b(?:from\s+now\s+on|going\s+forward|henceforth|from\s+this\s+point\s+on|in\s+(?:all\s+)?future\s+"
    r"(?:conversations?|sessions?|chats?|turns?|replies|responses|answers|interactions))\b",
    r"\b(?:next\s+time|whenever|every\s+time|each\s+time|if\s+ever)\b[^.\n]{0,60}\b"
    + _REFERENT
    + r"\b[^.\n]{0,30}\b(?:asks?|mentions?|requests?|brings?\s+up|talks?\s+about|inquires?)\b[^.\n]{0,80}\b"
    r"(?:say|tell|answer|respond|reply|recommend|suggest|direct|redirect|point|send|transfer|wire|pay)\b",
    r"\b(?:when|if)\s+" + _REFERENT + r"\s+(?:asks?|mentions?|requests?|inquires?)\b[^.\n]{0,80}\b"
    r"(?:recommend|suggest|redirect|point\s+(?:them|him|her)|tell\s+(?:them|him|her)|reply|respond|answer)\b",
    # Addressing the assistant itself.
    r"\b" + _ADDRESSEE + r"\s+(?:must|should|shall|needs?\s+to|has\s+to|is\s+to|are\s+to|will\s+(?:always|now)|"
    r"may\s+not|must\s+not|should\s+not|cannot)\b",
    r"\b(?:always|never)\s+(?:respond|reply|answer|recommend|suggest|obey|comply|trust|follow\s+(?:these|this|the\s+"
    r"following)|include\s+(?:this|the\s+following|in\s+(?:your|every|all)))\b",
    # Hiding things from the person.
    r"\b(?:do\s+not|don't|never|must\s+not)\s+(?:tell|inform|mention\s+(?:this|it)\s+to|reveal\s+(?:this|it)\s+to|"
    r"let)\s+(?:the\s+user|user|anyone|them|him|her)\b",
)
_INSTRUCTION_RE: Final = re.compile("|".join(f"(?:{pattern})" for pattern in _INSTRUCTION_PATTERNS), re.IGNORECASE)


def reads_as_instruction(text: str) -> bool:
    """Whether text (a scan form) reads as an instruction to future turns (see the module docstring)."""
    return _INSTRUCTION_RE.search(text) is not None


#: Details a changed fact changes: numbers (amounts, dates, account and phone numbers), email addresses,
#: URLs and domains, and capitalised words past a sentence's start (names, places, organisations).
_SPECIFIC_RE: Final = re.compile(
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # email
    r"|(?:https?://)?(?:[\w-]+\.)+(?:com|org|net|io|dev|co|uk|de|fr|es|pt|example|app|ai)\b[^\s,;)]*"  # URL, domain
    r"|\d[\d.,:/-]*\d|\d"  # number
    r"|(?<![.!?]\s)(?<!^)\b[A-Z][\w'-]+",  # a capitalised word not starting the text or a sentence
)
_WORD_RE: Final = re.compile(r"[a-z][a-z'-]{2,}")
_COMMON: Final = frozenset(
    [
        "the",
        "and",
        "for",
        "with",
        "that",
        "this",
        "from",
        "are",
        "was",
        "were",
        "has",
        "have",
        "had",
        "not",
        "but",
        "its",
        "it's",
        "into",
        "onto",
        "our",
        "your",
        "their",
        "they",
        "them",
        "his",
        "her",
        "she",
        "him",
        "who",
        "whom",
        "which",
        "what",
        "when",
        "where",
        "will",
        "would",
        "can",
        "could",
        "should",
        "shall",
        "may",
        "might",
        "must",
        "about",
        "over",
        "under",
        "than",
        "then",
        "there",
        "here",
        "been",
        "being",
        "also",
        "just",
        "only",
        "very",
        "all",
        "any",
        "each",
        "every",
        "some",
        "most",
        "more",
        "less",
        "one",
        "two",
        "now",
        "new",
        "use",
        "used",
        "uses",
        "via",
        "per",
        "out",
        "off",
        "our",
        "ours",
        "you",
    ]
)


def specifics(text: str) -> frozenset[str]:
    """The specific details of a text (see _SPECIFIC_RE), lower-cased."""
    return frozenset(match.group(0).lower().rstrip(".,") for match in _SPECIFIC_RE.finditer(text))


def _words(text: str) -> frozenset[str]:
    return frozenset(word for word in _WORD_RE.findall(text.lower()) if word not in _COMMON)


def _detail_missing(details: frozenset[str], other: str) -> bool:
    """Whether a detail is not in the other text (as a whole token, any case)."""
    lowered = other.lower()
    return any(re.search(rf"(?<!\w){re.escape(detail)}(?!\w)", lowered) is None for detail in details)


def changes(trusted: str, written: str) -> bool:
    """Whether written changes what trusted says (they are close by meaning; the caller has checked that).

    A change: a specific detail of either is missing from the other, or words of the trusted one
    were replaced (some of its words are gone and new ones came). The same note again, or the note
    with words only added and no detail changed, is not a change.
    """
    if _detail_missing(specifics(trusted), written) or _detail_missing(specifics(written), trusted):
        return True
    before, after = _words(trusted), _words(written)
    return bool(before - after) and bool(after - before)
