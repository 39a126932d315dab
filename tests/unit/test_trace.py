"""W3C trace context as both processes read it, and the audit row's trace under the chain's seal."""

from __future__ import annotations

import pytest

from guardian.keys.audit_proof import GENESIS_LINK, canonical_row, canonical_v1, next_link
from shared.trace import TraceContext, continue_or_start

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    parent = TraceContext.parse(f"00-{TRACE}-{SPAN}-01")
    assert parent == TraceContext(TRACE, SPAN, sampled=True)
    child = continue_or_start(f"00-{TRACE}-{SPAN}-00")
    assert child.trace_id == TRACE and child.span_id != SPAN and not child.sampled
    assert child.traceparent == f"00-{TRACE}-{child.span_id}-00"
    assert TraceContext.parse(f"01-{TRACE}-{SPAN}-01-future-fields") is not None  # a later version may add fields


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        f"00-{TRACE}-{SPAN}",
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{'0' * 32}-{SPAN}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"ff-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-01-extra",
        f"00-{TRACE}-{SPAN}-01\nforged log line",
        "x" * 600,
    ],
)
def test_anything_else_starts_a_new_trace(value: object) -> None:
    assert TraceContext.parse(value) is None
    started = continue_or_start(value)
    assert len(started.trace_id) == 32 and started.trace_id != TRACE and started.trace_id != "0" * 32


def test_a_rows_trace_is_under_its_seal_and_a_row_without_one_keeps_form_v1() -> None:
    values: list[int | str] = [7, 1795600000000, "alice", "ref", "memory.store", "mem_1", "allow", "ok", "v", "d", "k1"]
    assert canonical_row(values, "") == canonical_v1(values)
    sealed = canonical_row(values, TRACE)
    assert sealed.startswith(b"agent-guardian audit v2\n") and sealed.endswith(b"32:" + TRACE.encode() + b",")
    other = canonical_row(values, "1" * 32)
    mac = "a" * 64
    assert next_link(sealed, mac, GENESIS_LINK) != next_link(other, mac, GENESIS_LINK)
    assert next_link(sealed, mac, GENESIS_LINK) != next_link(canonical_v1(values), mac, GENESIS_LINK)
