"""Trust from provenance (guardian/recall/trust.py) as the policy compiles it: levels, lowest wins, recall actions."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from guardian.policy.compile import Policy, compile_policy
from guardian.policy.default import render_default_policy
from guardian.recall.trust import lowest
from shared.errors import ConfigError


def policy_with(**changes: Any) -> Policy:
    data: dict[str, Any] = yaml.safe_load(render_default_policy())
    data.update(changes)
    return compile_policy(yaml.safe_dump(data))


PROFILES: dict[str, Any] = {
    "default": {"operations": ["store", "get"]},
    "browser": {"operations": ["store", "get"], "sources": ["agent", "web", "tool"]},
    "assistant": {"operations": ["store", "get"], "sources": {"user": "trusted", "tool:calendar": "trusted"}},
    "strict": {"operations": ["get"], "recall": {"unverified": "label", "untrusted": "withhold"}},
}
AGENTS = {"crawler": "browser", "helper": "assistant", "judge": "strict"}


def test_lowest_wins_and_none_is_trusted() -> None:
    assert lowest(["trusted", "untrusted", "unverified"]) == "untrusted"
    assert lowest(["trusted", "unverified"]) == "unverified"
    assert lowest([]) == "trusted"


def test_the_shipped_sources_and_recall() -> None:
    view = compile_policy(render_default_policy()).trust_view("anyone")
    assert view.default_source == "agent"
    assert view.own.level_of("user") == "trusted"
    assert view.own.level_of("tool:search") == "untrusted"  # a named tool takes its kind's level
    assert view.own.level_of("rumour") is None  # not a source this profile may declare
    assert [view.action(level) for level in ("trusted", "unverified", "untrusted")] == ["recall", "recall", "label"]


def test_a_profile_declares_only_its_sources_at_its_levels() -> None:
    policy = policy_with(profiles=PROFILES, agents=AGENTS)
    crawler = policy.trust_view("crawler").own
    assert crawler.level_of("user") is None
    assert crawler.level_of("web") == "untrusted"
    helper = policy.trust_view("helper").own
    assert helper.level_of("tool:calendar") == "trusted"  # its own entry beats the kind's
    assert helper.level_of("tool:search") is None
    assert helper.level_of("web") is None


@pytest.mark.parametrize(
    ("author", "source", "stored", "expected"),
    [
        ("helper", "user", "trusted", "trusted"),
        ("helper", "user", "untrusted", "untrusted"),  # derived from something untrusted when stored
        ("crawler", "user", "trusted", "untrusted"),  # a source the writer's profile does not name now
        ("helper", "tool:calendar", "trusted", "trusted"),
        ("someone", "web", "trusted", "untrusted"),  # the default profile's level of web, now
        ("someone", "", "", "unverified"),  # stored before sources were recorded
        ("someone", "", "untrusted", "untrusted"),
        ("helper", "user", "bogus", "untrusted"),  # a damaged level is not trusted
    ],
)
def test_the_level_in_force_never_rises_above_what_was_stored(
    author: str, source: str, stored: str, expected: str
) -> None:
    view = policy_with(profiles=PROFILES, agents=AGENTS).trust_view("judge")
    assert view.level_now(author, source, stored) == expected


def test_lowering_a_source_in_the_policy_lowers_what_is_stored_from_it() -> None:
    before = policy_with(profiles=PROFILES, agents=AGENTS).trust_view("judge")
    sources = {"user": "trusted", "agent": "untrusted", "web": "untrusted", "tool": "untrusted"}
    after = policy_with(profiles=PROFILES, agents=AGENTS, provenance={"sources": sources}).trust_view("judge")
    assert before.level_now("someone", "agent", "unverified") == "unverified"
    assert after.level_now("someone", "agent", "unverified") == "untrusted"
    assert after.level_now("someone", "agent", "untrusted") == "untrusted"


def test_recall_actions_per_profile() -> None:
    policy = policy_with(profiles=PROFILES, agents=AGENTS)
    strict = policy.trust_view("judge")
    assert [strict.action(level) for level in ("trusted", "unverified", "untrusted")] == [
        "recall",
        "label",
        "withhold",
    ]
    assert policy.trust_view("crawler").action("untrusted") == "label"


def test_a_write_that_declares_no_source_gets_its_profiles_default() -> None:
    profiles = {
        **PROFILES,
        "reader": {"operations": ["store"], "sources": ["web", "tool"]},
        "mailer": {"operations": ["store"], "sources": ["agent", "email"], "default_source": "email"},
    }
    policy = policy_with(profiles=profiles, agents={**AGENTS, "r": "reader", "m": "mailer"})
    assert policy.trust_view("someone").default_source == "agent"  # the policy's
    assert policy.trust_view("crawler").default_source == "agent"  # it may declare agent
    assert policy.trust_view("r").default_source == "web"  # its least trusted (web and tool tie: first)
    assert policy.trust_view("m").default_source == "email"  # its own
    assert policy.trust_view("helper").default_source == "tool:calendar"  # both trusted: the first listed


def test_a_profile_default_source_it_may_not_declare_is_refused() -> None:
    profiles = {**PROFILES, "reader": {"operations": ["store"], "sources": ["web"], "default_source": "user"}}
    with pytest.raises(ConfigError) as caught:
        policy_with(profiles=profiles)
    assert "profiles.reader.default_source: 'user' is not one of this profile's sources" in caught.value.message
