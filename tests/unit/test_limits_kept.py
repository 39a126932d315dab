"""Limits kept across a restart: what the rate limiter and the anomaly monitor export, and how they restore it."""

from __future__ import annotations

import pytest

from guardian.checks.anomaly import AnomalyMonitor, AnomalySpec, DetectorSpec
from guardian.checks.ratelimit import RateLimiter
from shared.errors import PermissionDenied, RateLimited
from tests.unit.test_ratelimit import FakeClock, make_spec

WALL = 1_800_000_000_000


def test_a_drained_budget_and_its_cooldown_come_back_refilled_only_for_the_time_down() -> None:
    clock = FakeClock()
    before = RateLimiter(clock=clock)
    spec = make_spec(agent_writes=(3, 0.5), session_writes=(100, 100.0), cooldown_ms=30_000)
    for _ in range(3):
        before.check(agent="a", session_key="s1", kind="write", spec=spec)
    with pytest.raises(RateLimited):
        before.check(agent="a", session_key="s1", kind="write", spec=spec)
    assert before.take_changed() == {"a"} and before.take_changed() == set()
    kept = before.export_agent("a", WALL)
    assert kept.cooldown_until_ms == WALL + 30_000
    assert kept.buckets["writes"][0] < 1

    after = RateLimiter(clock=FakeClock(start_ms=9_000))  # a new process: another monotonic origin
    after.restore_agents({"a": kept}, WALL + 2_000)  # down for 2 s: one token refilled, cooldown has 28 s left
    assert 27_000 < after.in_cooldown("a", None) <= 28_000
    assert after.take_changed() == set()


def test_after_the_cooldown_the_refill_is_what_the_policy_gives_not_a_new_burst() -> None:
    before = RateLimiter(clock=FakeClock())
    spec = make_spec(agent_writes=(3, 0.5), session_writes=(100, 100.0), cooldown_ms=0)
    for _ in range(3):
        before.check(agent="a", session_key="s1", kind="write", spec=spec)
    kept = before.export_agent("a", WALL)
    clock = FakeClock()
    after = RateLimiter(clock=clock)
    after.restore_agents({"a": kept}, WALL + 2_000)  # 2 s down at 0.5 a second: one token
    after.check(agent="a", session_key="s2", kind="write", spec=spec)
    with pytest.raises(RateLimited):
        after.check(agent="a", session_key="s2", kind="write", spec=spec)


def test_an_agent_never_charged_exports_a_fresh_budget() -> None:
    kept = RateLimiter(clock=FakeClock()).export_agent("nobody", WALL)
    assert (kept.buckets, kept.cooldown_until_ms) == ({}, 0)


def test_an_anomaly_lock_and_windows_come_back() -> None:
    spec = AnomalySpec(
        detectors=(
            DetectorSpec("unknown_ids", threshold=3, window_ms=60_000, response="lock_agent", lock_ms=600_000),
            DetectorSpec("denials", threshold=5, window_ms=60_000, response="log", lock_ms=0),
        )
    )
    before = AnomalyMonitor()
    for at in range(3):
        before.record("unknown_ids", agent="a", session_key=None, session_ref="", now_ms=WALL + at, spec=spec)
    for at in range(2):
        before.record("denials", agent="b", session_key=None, session_ref="", now_ms=WALL + at, spec=spec)
    assert before.take_changed() == {"a", "b"}
    kept = {agent: before.export_agent(agent) for agent in ("a", "b")}
    assert kept["a"].locked_until_ms == WALL + 2 + 600_000
    assert kept["b"].windows == {"denials": (60_000, [WALL, WALL + 1])}

    after = AnomalyMonitor()
    after.restore_agents(kept)
    with pytest.raises(PermissionDenied, match="locked by the anomaly detector"):
        after.check_locked(agent="a", session_key=None, now_ms=WALL + 60_000)
    # b's two denials still count: three more within the window make five.
    events = [
        after.record("denials", agent="b", session_key=None, session_ref="", now_ms=WALL + 10 + n, spec=spec)
        for n in range(3)
    ]
    assert events[-1] is not None and events[-1].count == 5
    assert after.unlock_agent("a") and after.take_changed() >= {"a"}
    after.check_locked(agent="a", session_key=None, now_ms=WALL + 60_000)
