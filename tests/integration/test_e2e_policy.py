"""Policy denials as an agent sees them: the real MCP client → a real stdio gateway → the guardian.

Each denial must be a tool error the agent can act on (its kind first, what to do,
when to retry), must never echo a matched secret, and quarantined memories or
memories outside the read window must stay invisible.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.support.harness import LOG_ONLY_ANOMALIES, Guardian, running_guardian
from tests.support.mcp_harness import call, call_error, stdio_params

pytestmark = pytest.mark.anyio

SECRET = "AKIAZ7QX4PLM2KDN8RTV"
POLICY: dict[str, Any] = {
    "anomaly": LOG_ONLY_ANOMALIES,
    "profiles": {
        "default": {
            "operations": ["store", "get", "search", "list", "update", "delete"],
            "read_window": "2s",
            "limits": {"max_batch": 3},
            "rate_limits": {"session": {"writes": {"burst": 6, "per_minute": 6}}, "cooldown": "20s"},
        },
        "read-only": {"operations": ["get", "search", "list"]},
    },
    "agents": {"viewer": "read-only"},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    with running_guardian(**POLICY) as guardian:
        yield {"guardian": guardian, "agent": guardian.add_agent("agent"), "viewer": guardian.add_agent("viewer")}


async def test_denials_are_actionable_and_quarantine_and_window_hide(world: dict[str, Any]) -> None:
    guardian: Guardian = world["guardian"]
    async with Client(stdio_params(guardian, world["agent"])) as client:
        refused = await call_error(client, "memory_store", content=f"the deploy key is {SECRET}")
        assert refused.startswith("permission_denied: content refused by filter aws-access-key-id")
        assert SECRET not in refused and SECRET[4:] not in refused

        redacted = (await call(client, "memory_store", content="db login password=Tr0ub4dor&3"))["memory"]
        assert redacted["content"] == "db login [redacted:password-assignment]"

        held = (await call(client, "memory_store", content="<script>steal()</script> notes"))["memory"]
        assert (await call_error(client, "memory_get", id=held["id"])).startswith("not_found")
        assert held["id"] not in [
            hit["memory"]["id"] for hit in (await call(client, "memory_search", query="notes"))["hits"]
        ]
        assert held["id"] not in [m["id"] for m in (await call(client, "memory_list"))["memories"]]

        aged = (await call(client, "memory_store", content="soon outside the window"))["memory"]
        await anyio.sleep(2.2)
        assert (await call_error(client, "memory_get", id=aged["id"])).startswith("not_found")
        assert not (await call(client, "memory_search", query="window"))["hits"]

        limited = ""
        for index in range(10):
            result = await client.call_tool("memory_store", {"content": f"note {index}"})
            if result.is_error:
                limited = " ".join(getattr(block, "text", "") for block in result.content)
                break
        assert re.fullmatch(r"rate_limited: .+; retry after \d+ ms", limited), limited

    async with Client(stdio_params(guardian, world["viewer"])) as viewer:
        denied = await call_error(viewer, "memory_store", content="may I?")
        assert denied == "permission_denied: the policy does not allow this agent to store memories"

    rows = guardian.audit_rows()
    reasons = [(row["agent"], row["operation"], row["decision"], row["reason"]) for row in rows]
    assert ("agent", "memory.store", "deny", "permission_denied: content refused by filter aws-access-key-id: "
            "remove that part and try again") in reasons  # fmt: skip
    assert any(r[:3] == ("agent", "memory.store", "allow") and "quarantine:script-injection" in r[3] for r in reasons)
    assert any(r[:3] == ("agent", "memory.store", "deny") and r[3].startswith("rate_limited") for r in reasons)
    assert SECRET not in repr(rows)
    for log in guardian.state_dir.rglob("*.log"):
        assert SECRET not in log.read_text(errors="replace"), log.name
