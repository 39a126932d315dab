"""One trace across the hop: the same W3C trace id in the gateway's log, the guardian's log and the audit row."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
from mcp_types import RequestParamsMeta

from tests.integration.test_e2e_mcp import http_gateway
from tests.support.harness import Guardian, running_guardian
from tests.support.mcp_harness import http_client
from tests.support.otlp_collector import running_collector


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def traceparent(value: str) -> RequestParamsMeta:
    """A request's _meta carrying value as its traceparent (MCP reserves the key for W3C trace context)."""
    meta: RequestParamsMeta = {}
    meta["traceparent"] = value  # type: ignore[typeddict-unknown-key]  # an open map; mypy knows no extra_items yet
    return meta


def log_lines(path: Path, message: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry.get("message") == message]


@pytest.mark.anyio
async def test_a_clients_trace_id_reaches_the_guardians_log_and_the_audit_row() -> None:
    with running_guardian() as guardian:
        token = guardian.add_agent("traced")
        with http_gateway(guardian) as url:
            trace_id = secrets.token_hex(16)
            async with http_client(url, token) as client:
                traced = await client.call_tool(
                    "memory_store",
                    {"content": "a note whose request is traced"},
                    meta=traceparent(f"00-{trace_id}-{secrets.token_hex(8)}-01"),
                )
                assert not traced.is_error
                untraced = await client.call_tool("memory_search", {"query": "traced", "mode": "lexical"})
                assert not untraced.is_error
                malformed = await client.call_tool(
                    "memory_list", {}, meta=traceparent("00-" + "0" * 32 + "-" + "1" * 16 + "-01")
                )
                assert not malformed.is_error
        gateway_log = next(guardian.state_dir.glob("gateway-http-*.log"))
        assert_one_trace(guardian, gateway_log, trace_id)


def assert_one_trace(guardian: Guardian, gateway_log: Path, trace_id: str) -> None:
    calls = {entry["tool"]: entry["trace_id"] for entry in log_lines(gateway_log, "tool call")}
    requests = {
        entry["operation"]: entry["trace_id"]
        for entry in log_lines(guardian.log_path, "request")
        if entry["agent"] == "traced"
    }
    rows = {row["operation"]: row["trace"] for row in guardian.audit_rows() if row["agent"] == "traced"}
    # The client's trace, end to end.
    assert calls["memory_store"] == requests["memory.store"] == rows["memory.store"] == trace_id
    # No trace from the client (or an all-zero one, which is invalid): the gateway starts one, carried the same way.
    for tool, operation in (("memory_search", "memory.search"), ("memory_list", "memory.list")):
        started = calls[tool]
        assert len(started) == 32 and started != trace_id and started != "0" * 32
        assert requests[operation] == rows[operation] == started


@pytest.mark.anyio
async def test_spans_exported_over_otlp_join_the_trace_across_the_hop_and_carry_no_content() -> None:
    marker = "kestrel-" + secrets.token_hex(6)
    with running_collector() as collector:
        with running_guardian(config={"tracing": {"otlp_endpoint": collector.url}}) as guardian:
            token = guardian.add_agent("traced")
            with http_gateway(guardian, extra=["--otlp-endpoint", collector.url]) as url:
                trace_id = secrets.token_hex(16)
                async with http_client(url, token) as client:
                    stored = await client.call_tool(
                        "memory_store",
                        {"content": f"a traced note: {marker}"},
                        meta=traceparent(f"00-{trace_id}-{secrets.token_hex(8)}-01"),
                    )
                    assert not stored.is_error
            guardian.stop()  # both processes flush their spans as they stop
        in_trace = [span for span in collector.spans if span.trace_id == trace_id]
        gateway = [span for span in in_trace if span.service == "agent-gateway"]
        stored_spans = [span for span in in_trace if span.service == "agent-guardian" and span.name == "memory.store"]
        assert gateway and len(stored_spans) == 1, collector.spans
        assert stored_spans[0].parent_span_id in {span.span_id for span in gateway}
        assert stored_spans[0].attributes["guardian.decision"] == "allow"
        assert not any(marker.encode() in body for body in collector.bodies)
