"""Trust: how far a memory is believed, from where it came from, and what recall does with it.

A memory's *source* is what its writer declared it came from: ``user`` (the person
told the agent), ``agent`` (the agent's own conclusion), or external content the
policy names (``web``, ``email``, ``document``, ``tool:NAME``, ...). The policy gives
each source a *trust level*, globally and per profile, and says which sources each
profile may declare (a browsing agent cannot claim ``user``). A memory's level is
the lowest of its source's and of every memory it was derived from (``derived_from``),
through any chain: each stored memory already holds the lowest of its own chain, so
taking the lowest of the direct parents is enough.

At recall the level in force is the lowest of the stored level and the level the
policy in force now gives the writer's source (so a policy that lowers a source's
trust applies to what is stored at once; it never raises a stored level). Each
profile says, per level, whether its agents get such memories plainly (``recall``),
labelled as data that is not an instruction (``label``), or not at all
(``withhold``). Memories stored before sources were recorded have the source
``unrecorded`` and the policy's ``unrecorded`` level.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "RECALL_ACTIONS",
    "TRUST_LEVELS",
    "UNRECORDED",
    "RecallAction",
    "SourceRules",
    "TrustLevel",
    "TrustView",
    "as_level",
    "frozen_levels",
    "lowest",
    "source_kind",
]

#: Trust levels, most trusted first.
TrustLevel = Literal["trusted", "unverified", "untrusted"]
TRUST_LEVELS: Final[tuple[TrustLevel, ...]] = ("trusted", "unverified", "untrusted")
#: What recall does with a memory of a level: return it, return it labelled, or leave it out.
RecallAction = Literal["recall", "label", "withhold"]
RECALL_ACTIONS: Final[tuple[RecallAction, ...]] = ("recall", "label", "withhold")
#: The source of a memory stored before sources were recorded (never declared).
UNRECORDED: Final = "unrecorded"


def lowest(levels: Iterable[TrustLevel]) -> TrustLevel:
    """The least trusted of levels (``trusted`` for none)."""
    return max(levels, key=TRUST_LEVELS.index, default="trusted")


def as_level(text: str) -> TrustLevel:
    """text as a trust level; anything else (a damaged or unknown value) is untrusted."""
    for level in TRUST_LEVELS:
        if text == level:
            return level
    return "untrusted"


def source_kind(source: str) -> str:
    """The kind of a source: ``tool`` for ``tool:calendar``, the source itself otherwise."""
    return source.partition(":")[0]


@dataclass(frozen=True)
class SourceRules:
    """One profile's sources: which it may declare, at what level, and what its recall does per level."""

    #: Source (or kind) -> the level of what this profile's agents store from it.
    levels: Mapping[str, TrustLevel]
    #: Level -> what recall does with such memories for this profile's agents.
    actions: Mapping[TrustLevel, RecallAction]
    #: The source of a write by this profile's agents that declares none.
    default_source: str

    def level_of(self, source: str) -> TrustLevel | None:
        """The level a memory declared from source gets; None if this profile may not declare it.

        A named source (``tool:calendar``) takes its own entry if the policy has one, else its kind's.
        """
        level = self.levels.get(source)
        if level is None and ":" in source:
            level = self.levels.get(source_kind(source))
        return level


@dataclass(frozen=True)
class TrustView:
    """Trust as one agent's requests see it: its own profile's rules, and every writer's (for recall)."""

    #: The rules of the caller's profile (what it may declare, what its recall does).
    own: SourceRules
    #: Agent -> the rules of that agent's profile (writers not named: the default profile's).
    writers: Mapping[str, SourceRules]
    default_writer: SourceRules
    #: The level of memories stored before sources were recorded.
    unrecorded: TrustLevel

    @property
    def default_source(self) -> str:
        """The source a write by the caller that declares none gets (its profile's default)."""
        return self.own.default_source

    def level_now(self, author: str, source: str, stored: str) -> TrustLevel:
        """A stored memory's level in force: the lowest of the stored one and its writer's source's now.

        A source the writer's profile no longer names is untrusted.
        """
        if source in ("", UNRECORDED):
            return lowest([self.unrecorded, as_level(stored or self.unrecorded)])
        rules = self.writers.get(author, self.default_writer)
        return lowest([rules.level_of(source) or "untrusted", as_level(stored)])

    def action(self, level: TrustLevel) -> RecallAction:
        """What the caller's recall does with a memory of level."""
        return self.own.actions[level]


def frozen_levels(levels: Mapping[str, TrustLevel]) -> Mapping[str, TrustLevel]:
    """An immutable copy."""
    return MappingProxyType(dict(levels))
