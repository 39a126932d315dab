"""The rate limiter: token buckets per session and per agent, cooldowns, bounds; driven by a fake clock."""

from __future__ import annotations

import logging
import threading

import pytest

from guardian.checks.ratelimit import TABLE_FULL_RETRY_MS, BucketSpec, RateKind, RateLimiter, RateSpec
from shared.errors import RateLimited
from shared.jsonlog import JsonFormatter

SESSION = "ses_secret-session-key-aaaaaaaaaaaaaaaaaaaa"
OTHER_SESSION = "ses_secret-session-key-bbbbbbbbbbbbbbbbbbbb"


class FakeClock:
    """Monotonic seconds, kept as whole milliseconds so tests are exact."""

    def __init__(self, start_ms: int = 5_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


def make_spec(
    *,
    session_reads: tuple[int, float] = (5, 1.0),
    session_writes: tuple[int, float] = (3, 1.0),
    agent_reads: tuple[int, float] = (100, 10.0),
    agent_writes: tuple[int, float] = (100, 10.0),
    session_opens: tuple[int, float] = (3, 0.1),
    cooldown_ms: int = 0,
) -> RateSpec:
    return RateSpec(
        session_reads=BucketSpec(*session_reads),
        session_writes=BucketSpec(*session_writes),
        agent_reads=BucketSpec(*agent_reads),
        agent_writes=BucketSpec(*agent_writes),
        session_opens=BucketSpec(*session_opens),
        cooldown_ms=cooldown_ms,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> RateLimiter:
    return RateLimiter(clock=clock)


def granted(limiter: RateLimiter, n: int, **kwargs: object) -> int:
    """How many of n checks passed."""
    passed = 0
    for _ in range(n):
        try:
            limiter.check(**kwargs)  # type: ignore[arg-type]
        except RateLimited:
            continue
        passed += 1
    return passed


# -- buckets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "noun"),
    [("read", "reads"), ("write", "writes")],
)
def test_burst_allowed_then_refused(limiter: RateLimiter, kind: RateKind, noun: str) -> None:
    spec = make_spec(session_reads=(5, 1.0), session_writes=(5, 1.0))
    for _ in range(5):
        limiter.check(agent="bot", session_key=SESSION, kind=kind, spec=spec)
    with pytest.raises(RateLimited) as refused:
        limiter.check(agent="bot", session_key=SESSION, kind=kind, spec=spec)
    assert refused.value.retry_after_ms == 1000
    assert (str(refused.value), refused.value.retry_after_ms) == (f"too many {noun} from this session", 1000)


def test_refill_over_time_up_to_capacity_only(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = make_spec(session_reads=(5, 2.0))  # a token every 500 ms
    check = {"agent": "bot", "session_key": SESSION, "kind": "read", "spec": spec}
    assert granted(limiter, 10, **check) == 5
    clock.advance(499)
    assert granted(limiter, 1, **check) == 0
    clock.advance(1)
    assert granted(limiter, 3, **check) == 1
    clock.advance(60_000)  # a minute refills to the burst, never beyond
    assert granted(limiter, 10, **check) == 5


def test_reads_and_writes_are_independent(limiter: RateLimiter) -> None:
    spec = make_spec(session_reads=(2, 1.0), session_writes=(2, 1.0))
    assert granted(limiter, 5, agent="bot", session_key=SESSION, kind="read", spec=spec) == 2
    assert granted(limiter, 5, agent="bot", session_key=SESSION, kind="write", spec=spec) == 2


def test_new_sessions_do_not_reset_the_agent_budget(limiter: RateLimiter) -> None:
    spec = make_spec(session_reads=(5, 1.0), agent_reads=(12, 1.0), session_opens=(10, 1.0))
    total = 0
    for index in range(6):
        limiter.check(agent="bot", session_key=None, kind="open", spec=spec)
        total += granted(limiter, 5, agent="bot", session_key=f"ses_{index}", kind="read", spec=spec)
    assert total == 12
    with pytest.raises(RateLimited, match="too many reads from this agent"):
        limiter.check(agent="bot", session_key="ses_fresh", kind="read", spec=spec)
    # Another agent has its own budget.
    limiter.check(agent="other", session_key="ses_other", kind="read", spec=spec)


def test_open_uses_only_the_agents_session_opens_bucket(limiter: RateLimiter) -> None:
    spec = make_spec(session_opens=(2, 0.5), cooldown_ms=0)
    assert granted(limiter, 2, agent="bot", session_key=None, kind="open", spec=spec) == 2
    with pytest.raises(RateLimited) as refused:
        limiter.check(agent="bot", session_key=None, kind="open", spec=spec)
    assert (str(refused.value), refused.value.retry_after_ms) == ("too many session opens from this agent", 2000)
    # Reads were not charged for the opens.
    assert granted(limiter, 5, agent="bot", session_key=SESSION, kind="read", spec=spec) == 5


def test_a_refused_check_takes_nothing(limiter: RateLimiter) -> None:
    spec = make_spec(session_reads=(3, 0.001), agent_reads=(10, 0.001))
    limiter.check(agent="bot", session_key="ses_1", kind="read", spec=spec, cost=3)  # agent: 7 left
    with pytest.raises(RateLimited, match="from this session"):
        limiter.check(agent="bot", session_key="ses_1", kind="read", spec=spec)  # the session is dry
    limiter.check(agent="bot", session_key="ses_2", kind="read", spec=spec, cost=3)  # agent: 4 left
    limiter.check(agent="bot", session_key="ses_3", kind="read", spec=spec, cost=3)  # agent: 1 left
    with pytest.raises(RateLimited, match="from this agent"):
        limiter.check(agent="bot", session_key="ses_4", kind="read", spec=spec, cost=2)
    limiter.check(agent="bot", session_key="ses_4", kind="read", spec=spec, cost=1)  # the last token is still there


def test_batch_cost(limiter: RateLimiter) -> None:
    spec = make_spec(session_writes=(5, 1.0))
    limiter.check(agent="bot", session_key=SESSION, kind="write", spec=spec, cost=3)
    with pytest.raises(RateLimited) as refused:
        limiter.check(agent="bot", session_key=SESSION, kind="write", spec=spec, cost=3)
    assert refused.value.retry_after_ms == 1000  # one token short
    limiter.check(agent="bot", session_key=SESSION, kind="write", spec=spec, cost=2)


def test_cost_larger_than_capacity_never_succeeds(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = make_spec(session_writes=(5, 1.0), cooldown_ms=3000)
    for _ in range(2):
        with pytest.raises(RateLimited) as refused:
            limiter.check(agent="bot", session_key=SESSION, kind="write", spec=spec, cost=6)
        assert "larger than the burst allowance of 5" in str(refused.value)
        assert refused.value.retry_after_ms == 3000
        clock.advance(60_000)
    # Not a breach: no cooldown, nothing taken.
    assert limiter.in_cooldown("bot", SESSION) == 0
    limiter.check(agent="bot", session_key=SESSION, kind="write", spec=spec, cost=5)


@pytest.mark.parametrize(
    ("cooldown_ms", "refill_per_s", "cost", "expected_ms"),
    [
        (0, 1.0, 1, 1000),  # no cooldown: the time to refill one token
        (500, 1.0, 1, 1000),  # the refill is longer than the cooldown
        (3000, 1.0, 1, 3000),  # the cooldown is longer than the refill
        (0, 4.0, 1, 250),
        (0, 3.0, 1, 334),  # rounded up: a client waiting this long is never early
        (0, 1.0, 3, 1000),  # 2 tokens left after cost 3 of 5: one short
    ],
)
def test_retry_after_ms(
    limiter: RateLimiter, cooldown_ms: int, refill_per_s: float, cost: int, expected_ms: int
) -> None:
    spec = make_spec(session_reads=(5, refill_per_s), cooldown_ms=cooldown_ms)
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec, cost=5 - (cost - 1))
    with pytest.raises(RateLimited) as refused:
        limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec, cost=cost)
    assert refused.value.retry_after_ms == expected_ms
    assert refused.value.retry_after_ms == expected_ms


# -- cooldowns ------------------------------------------------------------------------------------


def test_session_cooldown_refuses_every_kind_for_its_length(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = make_spec(session_reads=(2, 10.0), cooldown_ms=2000)
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec, cost=2)
    with pytest.raises(RateLimited) as breach:
        limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
    assert breach.value.retry_after_ms == 2000
    assert limiter.in_cooldown("bot", SESSION) == 2000
    clock.advance(1500)
    for kind in ("read", "write"):
        with pytest.raises(RateLimited) as refused:
            limiter.check(agent="bot", session_key=SESSION, kind=kind, spec=spec)
        assert refused.value.retry_after_ms == 500
        assert str(refused.value) == "this session is cooling down after exceeding its rate limit"
        assert refused.value.retry_after_ms == 500
    # The agent's other sessions and its session opens are not affected.
    limiter.check(agent="bot", session_key=OTHER_SESSION, kind="read", spec=spec)
    limiter.check(agent="bot", session_key=None, kind="open", spec=spec)
    clock.advance(499)
    with pytest.raises(RateLimited) as last:
        limiter.check(agent="bot", session_key=SESSION, kind="write", spec=spec)
    assert last.value.retry_after_ms == 1  # never 0 while cooling
    clock.advance(1)
    assert limiter.in_cooldown("bot", SESSION) == 0
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)


def test_agent_cooldown_refuses_every_session_and_kind(limiter: RateLimiter, clock: FakeClock) -> None:
    spec = make_spec(agent_writes=(3, 10.0), cooldown_ms=5000)
    limiter.check(agent="bot", session_key=SESSION, kind="write", spec=spec, cost=3)
    with pytest.raises(RateLimited) as breach:
        limiter.check(agent="bot", session_key=OTHER_SESSION, kind="write", spec=spec)
    assert (str(breach.value), breach.value.retry_after_ms) == ("too many writes from this agent", 5000)
    checks: list[tuple[str | None, RateKind]] = [(SESSION, "read"), (OTHER_SESSION, "write"), ("ses_new", "read")]
    checks.append((None, "open"))
    for session_key, kind in checks:
        with pytest.raises(RateLimited, match="this agent is cooling down") as refused:
            limiter.check(agent="bot", session_key=session_key, kind=kind, spec=spec)
        assert refused.value.retry_after_ms == 5000
    limiter.check(agent="other", session_key="ses_x", kind="write", spec=spec)
    clock.advance(5000)
    limiter.check(agent="bot", session_key="ses_new", kind="write", spec=spec)


def test_a_breach_of_both_buckets_cools_the_agent(limiter: RateLimiter) -> None:
    spec = make_spec(session_reads=(2, 1.0), agent_reads=(2, 1.0), cooldown_ms=1000)
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec, cost=2)
    with pytest.raises(RateLimited, match="from this agent"):
        limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
    with pytest.raises(RateLimited, match="this agent is cooling down"):
        limiter.check(agent="bot", session_key=OTHER_SESSION, kind="write", spec=spec)


def test_reset_agent_clears_its_cooldowns_and_buckets(limiter: RateLimiter) -> None:
    spec = make_spec(session_reads=(2, 0.001), agent_writes=(1, 0.001), cooldown_ms=60_000)
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec, cost=2)
    with pytest.raises(RateLimited):
        limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)  # session cooldown
    limiter.check(agent="bot", session_key=OTHER_SESSION, kind="write", spec=spec)
    with pytest.raises(RateLimited):
        limiter.check(agent="bot", session_key=OTHER_SESSION, kind="write", spec=spec)  # agent cooldown
    limiter.check(agent="other", session_key="ses_o", kind="write", spec=spec)
    with pytest.raises(RateLimited):
        limiter.check(agent="other", session_key="ses_o", kind="write", spec=spec)

    limiter.reset_agent("bot")
    assert limiter.in_cooldown("bot", SESSION) == 0
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec, cost=2)
    limiter.check(agent="bot", session_key=OTHER_SESSION, kind="write", spec=spec)
    assert limiter.in_cooldown("other", "ses_o") > 0  # another agent's cooldown stays


def test_forget_session(limiter: RateLimiter) -> None:
    spec = make_spec(session_reads=(1, 0.001), cooldown_ms=60_000)
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
    with pytest.raises(RateLimited):
        limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
    limiter.forget_session(SESSION)
    assert limiter.in_cooldown("bot", SESSION) == 0


# -- policy changes -------------------------------------------------------------------------------


def test_a_smaller_capacity_clamps_the_tokens_held(limiter: RateLimiter) -> None:
    wide = make_spec(session_reads=(10, 0.001))
    narrow = make_spec(session_reads=(5, 0.001))
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=wide, cost=2)  # 8 left
    assert granted(limiter, 10, agent="bot", session_key=SESSION, kind="read", spec=narrow) == 5


def test_a_larger_capacity_grants_no_free_tokens(limiter: RateLimiter, clock: FakeClock) -> None:
    narrow = make_spec(session_reads=(2, 1.0))
    wide = make_spec(session_reads=(20, 1.0))
    assert granted(limiter, 5, agent="bot", session_key=SESSION, kind="read", spec=narrow) == 2
    assert granted(limiter, 5, agent="bot", session_key=SESSION, kind="read", spec=wide) == 0
    clock.advance(3000)  # refilled at the new spec's pace, up to its capacity
    assert granted(limiter, 5, agent="bot", session_key=SESSION, kind="read", spec=wide) == 3


# -- memory bound ---------------------------------------------------------------------------------


def test_table_full_refuses_new_keys_until_a_sweep(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent_guardian.security")
    limiter = RateLimiter(clock=clock, max_keys=3)
    spec = make_spec(session_reads=(5, 1.0), agent_reads=(10, 1.0))
    limiter.check(agent="bot", session_key="ses_1", kind="read", spec=spec)  # keys: bot, ses_1
    limiter.check(agent="bot", session_key="ses_2", kind="read", spec=spec)  # keys: + ses_2
    limiter.check(agent="bot", session_key="ses_1", kind="read", spec=spec)  # known keys still work
    for _ in range(2):
        with pytest.raises(RateLimited) as refused:
            limiter.check(agent="bot", session_key="ses_3", kind="read", spec=spec)
        assert refused.value.retry_after_ms == TABLE_FULL_RETRY_MS
        assert "too many clients" in str(refused.value)
    full_lines = [r for r in caplog.records if getattr(r, "event", None) == "rate_table_full"]
    assert len(full_lines) == 1  # logged once per spell, not per refusal

    assert limiter.sweep() == 0  # every bucket is below capacity: nothing idle
    clock.advance(3000)  # ses_1 spent 2 tokens, ses_2 1, bot 3: all full again at 1 token/s
    assert limiter.sweep() == 3
    limiter.check(agent="bot", session_key="ses_3", kind="read", spec=spec)


def test_sweep_keeps_running_cooldowns(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    spec = make_spec(session_reads=(1, 10.0), cooldown_ms=10_000)
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
    with pytest.raises(RateLimited):
        limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
    clock.advance(1000)  # buckets full again, the cooldown still running
    assert limiter.sweep() == 1  # the agent's key only
    assert limiter.in_cooldown("bot", SESSION) == 9000
    clock.advance(9000)
    assert limiter.sweep() == 1
    assert limiter.in_cooldown("bot", SESSION) == 0


def test_the_table_never_grows_past_max_keys(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, max_keys=50)
    spec = make_spec()
    refused = 0
    for index in range(200):
        try:
            limiter.check(agent="bot", session_key=f"ses_{index}", kind="read", spec=spec)
        except RateLimited:
            refused += 1
    assert refused == 200 - 49  # the agent's key plus 49 sessions
    clock.advance(10_000)
    assert limiter.sweep() == 50


# -- validation, logging, threads -----------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: BucketSpec(0, 1.0),
        lambda: BucketSpec(1, 0.0),
        lambda: BucketSpec(1, float("inf")),
        lambda: BucketSpec(True, 1.0),
        lambda: make_spec(cooldown_ms=-1),
        lambda: RateLimiter(max_keys=0),
    ],
)
def test_invalid_specs_are_refused(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(("kind", "cost"), [("read", 0), ("read", -1), ("delete", 1)])
def test_invalid_checks_are_bugs(limiter: RateLimiter, kind: str, cost: int) -> None:
    with pytest.raises(ValueError):
        limiter.check(agent="bot", session_key=SESSION, kind=kind, spec=make_spec(), cost=cost)  # type: ignore[arg-type]


def test_a_breach_is_logged_without_the_session_key(limiter: RateLimiter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent_guardian.security")
    spec = make_spec(session_reads=(1, 1.0), cooldown_ms=1000)
    limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
    messages = []
    for _ in range(3):
        with pytest.raises(RateLimited) as refused:
            limiter.check(agent="bot", session_key=SESSION, kind="read", spec=spec)
        messages.append(str(refused.value))
    lines = [r for r in caplog.records if getattr(r, "event", None) == "rate_limited"]
    assert len(lines) == 1  # the breach, not each refusal during the cooldown
    record = lines[0]
    assert (record.agent, record.scope, record.bucket, record.cooldown_ms) == ("bot", "session", "reads", 1000)  # type: ignore[attr-defined]
    formatted = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    assert SESSION not in formatted
    assert all(SESSION not in message for message in messages)


def test_concurrent_checks_never_grant_more_than_capacity_plus_refill() -> None:
    lock = threading.Lock()
    ticks = [0]

    def clock() -> float:  # every reading is 1 ms later
        with lock:
            ticks[0] += 1
            return ticks[0] / 1000

    limiter = RateLimiter(clock=clock)
    spec = make_spec(session_reads=(1000, 1000.0), agent_reads=(50, 20.0), cooldown_ms=0)
    granted_total = [0]

    def hammer(index: int) -> None:
        mine = 0
        for _ in range(400):
            try:
                limiter.check(agent="bot", session_key=f"ses_{index % 3}", kind="read", spec=spec)
            except RateLimited:
                continue
            mine += 1
        with lock:
            granted_total[0] += mine

    threads = [threading.Thread(target=hammer, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed_s = ticks[0] / 1000
    assert 50 <= granted_total[0] <= 50 + 20.0 * elapsed_s
