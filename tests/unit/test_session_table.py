"""The session table: a session that ended is refused as expired for a while, whatever the housekeeping does."""

from __future__ import annotations

import pytest

from guardian.checks.sessions import REMEMBER_ENDED_MS, SessionTable
from shared.errors import Unauthenticated

T0 = 1_700_000_000_000


@pytest.mark.parametrize(("idle_ms", "lifetime_ms"), [(60_000, 1_000), (1_000, 60_000)], ids=["absolute", "idle"])
def test_an_ended_session_is_refused_as_expired_until_the_sweep_forgets_it(idle_ms: int, lifetime_ms: int) -> None:
    table = SessionTable()
    ended = table.open("alice", T0, idle_ms, lifetime_ms)
    live = table.open("bob", T0, 10**9, 10**9)
    gone = T0 + 1_000  # both kinds have ended here

    assert table.sweep(gone + REMEMBER_ENDED_MS - 1) == 0  # the tick right after the end forgets nothing
    assert table.count("alice", gone) == 0  # ended, so it counts against no limit
    with pytest.raises(Unauthenticated, match="the session expired"):
        table.resolve(ended.id, gone + 1)

    again = table.open("alice", T0, idle_ms, lifetime_ms)
    assert table.sweep(gone + REMEMBER_ENDED_MS) == 1  # a minute after its end, it is forgotten
    with pytest.raises(Unauthenticated, match="unknown session"):
        table.resolve(again.id, gone + REMEMBER_ENDED_MS)
    assert table.resolve(live.id, gone + REMEMBER_ENDED_MS).agent == "bob"


def test_an_ended_session_still_remembered_is_neither_revoked_nor_waited_for() -> None:
    table = SessionTable()
    ended = table.open("alice", T0, 60_000, 1_000)
    table.open("alice", T0, 60_000, 10_000)
    later = T0 + 2_000  # the first has ended, the second ends at T0 + 10 s

    assert table.next_expiry_ms("alice", later) == 8_000  # the live one's end, not 1 ms for the ended one
    assert table.end_matching(ended.id, str, later) is None  # nothing open to revoke
    with pytest.raises(Unauthenticated, match="the session expired"):
        table.resolve(ended.id, later)
