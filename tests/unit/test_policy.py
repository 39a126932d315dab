"""Compiling the policy: the strict schema, its error paths, defaults and versions."""

from __future__ import annotations

import datetime
import time
from typing import Any

import pytest
import yaml

from guardian.policy.compile import AllowedHours, Policy, compile_policy
from guardian.policy.default import render_default_policy
from shared.errors import ConfigError


def default_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(render_default_policy())
    return data


def compile_data(data: dict[str, Any]) -> Policy:
    return compile_policy(yaml.safe_dump(data))


def test_the_shipped_policy_compiles_with_its_default_filters() -> None:
    policy = compile_policy(render_default_policy())
    assert policy.default_profile == "default"
    assert "store" not in policy.profiles["read-only"].operations
    assert len(policy.filters) >= 10
    assert {d.kind for d in policy.anomaly.detectors} == {
        "denials",
        "filter_hits",
        "burst",
        "unknown_ids",
        "outside_hours",
    }
    assert policy.webhook_url is None


def test_leaving_defaulted_sections_out_gives_the_same_decisions() -> None:
    full = compile_policy(render_default_policy())
    data = default_data()
    for key in ("sessions", "limits", "rate_limits", "anomaly", "filters", "retention", "alerts"):
        data.pop(key)
    bare = compile_data(data)
    assert bare.sessions == full.sessions
    assert bare.profiles["default"].limits == full.profiles["default"].limits
    assert bare.profiles["default"].rates == full.profiles["default"].rates
    assert bare.anomaly == full.anomaly
    assert bare.filters.names == full.filters.names
    assert bare.retention == full.retention


def test_version_ignores_formatting_and_comments_but_not_meaning() -> None:
    text = render_default_policy()
    assert compile_policy(text).version == compile_policy("# a comment\n" + text.replace("  ", "  ")).version
    assert compile_policy(text).version == compile_data(default_data()).version
    changed = default_data()
    changed["sessions"]["max_per_agent"] = 9
    assert compile_data(changed).version != compile_policy(text).version


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node: Any = data  # a dict, or a list where a key is an index
    for key in keys[:-1]:
        node = node.setdefault(key, {}) if not key.isdigit() else node[int(key)]
    node[keys[-1]] = value


BAD = [
    ("unknown top-level key", "colour", "blue", "colour: unknown key"),
    ("unknown profile key", "profiles.default.color", 1, "profiles.default.color: unknown key"),
    ("unknown operation", "profiles.default.operations", ["store", "drop"], "profiles.default.operations[1]"),
    ("wrong type", "limits.max_tags", "many", "limits.max_tags: expected an integer"),
    ("limit above its ceiling", "limits.max_content_bytes", 10**9, "limits.max_content_bytes: must be between"),
    ("bad duration", "sessions.idle_timeout", "soon", "sessions.idle_timeout: expected a positive duration"),
    ("zero burst", "rate_limits.session.reads", {"burst": 0}, "rate_limits.session.reads.burst"),
    ("batch above the write burst", "limits.max_batch", 100, "max_batch: 100 is over the write burst"),
    ("unknown detector", "anomaly.stampede", {"threshold": 1, "response": "log"}, "anomaly.stampede"),
    ("bad response", "anomaly.denials", {"threshold": 1, "response": "panic"}, "anomaly.denials.response"),
    ("webhook not http", "alerts.webhook_url", "ftp://x.example", "alerts.webhook_url"),
    ("unknown time zone", "profiles.default.allowed_hours", {"timezone": "Mars/Base", "from": "08:00", "to": "09:00"},
     "profiles.default.allowed_hours.timezone"),
    ("bad clock time", "profiles.default.allowed_hours", {"from": "8am", "to": "09:00"},
     "profiles.default.allowed_hours.from"),
    ("bad namespace", "profiles.default.namespaces", {"read": ["a b"]}, "profiles.default.namespaces.read[0]"),
    ("agent on a missing profile", "agents", {"bob": "admin"}, "agents.bob: no profile named 'admin'"),
    ("bad regex", "filters", [{"name": "x", "pattern": "(", "action": "reject"}], "filters[0].pattern"),
    ("bad filter action", "filters", [{"name": "x", "pattern": "a", "action": "drop"}], "filters[0].action"),
    ("bad filter field", "filters", [{"name": "x", "pattern": "a", "action": "flag", "fields": ["body"]}],
     "filters[0].fields[0]"),
    ("unknown filter key", "filters", [{"name": "x", "pattern": "a", "action": "flag", "when": 1}],
     "filters[0].when: unknown key"),
    ("version 2", "version", 2, "version"),
    ("bad trust level", "provenance.sources.web", "sketchy", "provenance.sources.web: expected one of trusted"),
    ("bad source name", "provenance.sources", {"Web Pages": "untrusted"}, "provenance.sources.Web Pages"),
    ("reserved source name", "provenance.sources", {"unrecorded": "trusted"}, "'unrecorded' is reserved"),
    ("default source not a source", "provenance.default_source", "rumour", "provenance.default_source"),
    ("unknown provenance key", "provenance.trust", "all", "provenance.trust: unknown key"),
    ("profile source not a source", "profiles.default.sources", ["user", "rumour"], "profiles.default.sources[1]"),
    ("bad recall action", "profiles.default.recall", {"untrusted": "hide"}, "profiles.default.recall.untrusted"),
    ("unknown trust level in recall", "profiles.default.recall", {"shady": "label"}, "recall.shady: unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "path", "value", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_policies_name_the_offending_path(case: str, path: str, value: Any, message: str) -> None:
    data = default_data()
    _set(data, path, value)
    with pytest.raises(ConfigError) as caught:
        compile_data(data)
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "mapping at the top level"),
        ("version: 1\nprofiles: {a: {operations: []}}\n: :", "not valid YAML"),
        ("x" * 1_048_577, "over 1048576 bytes"),
    ],
)
def test_unparseable_policies(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        compile_policy(text)
    assert message in caught.value.message


def _ms(day: int, hour: int, minute: int = 0) -> int:
    # 2026-11-23 is a Monday.
    moment = datetime.datetime(2026, 11, 23 + day, hour, minute, tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


@pytest.mark.parametrize(
    ("start", "end", "days", "at", "allowed"),
    [
        (8 * 60, 18 * 60, {0, 1, 2, 3, 4}, _ms(0, 9), True),
        (8 * 60, 18 * 60, {0, 1, 2, 3, 4}, _ms(0, 18), False),
        (8 * 60, 18 * 60, {0, 1, 2, 3, 4}, _ms(5, 9), False),  # Saturday
        (22 * 60, 6 * 60, {4}, _ms(4, 23), True),  # Friday night
        (22 * 60, 6 * 60, {4}, _ms(5, 3), True),  # ... into Saturday morning
        (22 * 60, 6 * 60, {4}, _ms(4, 3), False),  # Friday early morning belongs to Thursday
        (22 * 60, 6 * 60, {4}, _ms(5, 6), False),
    ],
)
def test_allowed_hours(start: int, end: int, days: set[int], at: int, allowed: bool) -> None:
    assert AllowedHours("UTC", frozenset(days), start, end).allows(at) is allowed


# --- what the YAML parser refuses before the policy schema sees it -----------------------------------------------


def _alias_bomb(levels: int, width: int) -> str:
    lines = ["l0: &l0 [x]"]
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_alias_bomb(8, 9), "expands to more than 100000 values"),
        ("a: &a [*a]\n", "is recursive"),
        ("x: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
        ("version: 1" + "0" * 5000 + "\n", "is not valid YAML: ValueError"),
        ("a: \x8e\n", "is not valid YAML: unacceptable character"),
    ],
    ids=["alias-bomb", "recursive", "deep", "huge-int", "control-character"],
)
def test_hostile_yaml_is_refused_quickly_with_a_reason(text: str, message: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        compile_policy(text)
    assert message in caught.value.message
    assert time.monotonic() - started < 1.0


def test_anchors_and_aliases_of_ordinary_size_still_work() -> None:
    shared = yaml.safe_dump({"rate_limits": {"session": {"reads": {"burst": 5, "per_minute": 60}}}})
    text = (
        "version: 1\nprofiles:\n  default:\n    operations: &ops [store, get]\n  other:\n    operations: *ops\n"
        + shared
    )
    policy = compile_policy(text)
    assert policy.profiles["other"].operations == policy.profiles["default"].operations
