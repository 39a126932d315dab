"""A remote agent the MCP way: the official MCP client, OAuth only, through the real gateway to a real guardian.

The client knows nothing but the gateway's URL and its own client credentials: it finds the
authorization server from the 401's resource metadata (RFC 9728), gets a token for this
resource (RFC 8707) from a real authorization server (oidc-provider), and calls tools, over
both protocol revisions the gateway serves (2025-11-25 and 2026-07-28). The guardian verifies
every token itself; the gateway only forwards it. A second client, the TypeScript SDK's
(tests/support/oauth_as/ts_client.mjs, 2025-11-25), does the same from node.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from mcp.types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
    DiscoverResult,
    ListToolsResult,
)

from tests.integration.test_e2e_mcp import free_port, http_gateway
from tests.support.harness import running_guardian
from tests.support.oauth_server import HERE as OAUTH_AS
from tests.support.oauth_server import running_authorization_server

CLIENTS = {
    "writer": {"secret": "writer-secret", "scope": "memory:read memory:write", "ttl": 300},
    "reader": {"secret": "reader-secret", "scope": "memory:read", "ttl": 300},
}
WRITE_TOOLS = {"memory_store", "memory_store_batch", "memory_update", "memory_delete"}
READ_TOOLS = {"memory_search", "memory_get", "memory_list"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def world() -> Iterator[dict[str, Any]]:
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    with running_authorization_server(CLIENTS, [resource]) as issuer:
        policy = {
            "issuer": issuer.issuer,
            "audience": resource,
            "agents": {"writer": "remote-writer", "reader": "remote-reader"},
        }
        with running_guardian(oauth=policy) as guardian:
            guardian.add_agent("remote-writer")
            guardian.add_agent("remote-reader")
            fetched = guardian.ctl("oauth", "fetch-keys", "--issuer", issuer.issuer, offline=True)
            assert fetched.returncode == 0, fetched.stderr
            oauth = ["--oauth-issuer", issuer.issuer, "--resource-url", resource]
            with http_gateway(guardian, port, oauth):
                yield {"guardian": guardian, "issuer": issuer, "resource": resource, "port": port}


class _Tokens:
    """The client's token storage (in memory, as a client of its own would keep it)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


@contextlib.asynccontextmanager
async def oauth_client(world: dict[str, Any], client_id: str, mode: str) -> AsyncIterator[Client]:
    """The official MCP client, with only its client credentials and the gateway's URL."""
    auth = ClientCredentialsOAuthProvider(
        server_url=world["resource"],
        storage=_Tokens(),
        client_id=client_id,
        client_secret=str(CLIENTS[client_id]["secret"]),
        issuer=world["issuer"].issuer,
    )
    async with (
        httpx2.AsyncClient(auth=auth, timeout=15) as http,
        Client(streamable_http_client(world["resource"], http_client=http), mode=mode) as client,
    ):
        yield client


def test_the_401_and_the_metadata_lead_an_oauth_client_to_its_issuer(world: dict[str, Any]) -> None:
    answer = httpx.post(world["resource"], json={}, headers={"Accept": "application/json, text/event-stream"})
    assert answer.status_code == 401
    challenge = answer.headers["www-authenticate"]
    metadata_url = f"http://127.0.0.1:{world['port']}/.well-known/oauth-protected-resource/mcp"
    assert f'resource_metadata="{metadata_url}"' in challenge and 'scope="memory:read memory:write"' in challenge
    assert "error=" not in challenge  # no token was sent (RFC 6750 §3.1)
    metadata = httpx.get(metadata_url).json()
    assert metadata["resource"] == world["resource"]
    assert metadata["authorization_servers"] == [world["issuer"].issuer]
    assert metadata["scopes_supported"] == ["memory:read", "memory:write"]
    bad = httpx.post(world["resource"], json={}, headers={"Authorization": "Bearer a.b.c"})
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_client_that_speaks_only_oauth_stores_and_recalls(world: dict[str, Any], mode: str) -> None:
    async with oauth_client(world, "writer", mode) as client:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == WRITE_TOOLS | READ_TOOLS
        content = f"the remote agent's note over {mode}: the kestrel nests under the north bridge"
        stored = await client.call_tool("memory_store", {"content": content})
        assert not stored.is_error, stored.content
        assert stored.structured_content is not None
        found = await client.call_tool("memory_search", {"query": "kestrel north bridge", "mode": "lexical"})
        assert found.structured_content is not None
        assert content in [hit["memory"]["content"] for hit in found.structured_content["hits"]]
    rows = [row for row in world["guardian"].audit_rows() if row["operation"] == "memory.store"]
    assert rows[-1]["agent"] == "remote-writer" and rows[-1]["decision"] == "allow"


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_read_only_token_sees_only_the_read_tools_and_cannot_write(world: dict[str, Any], mode: str) -> None:
    async with oauth_client(world, "reader", mode) as client:
        listed = await client.list_tools()
        assert {tool.name for tool in listed.tools} == READ_TOOLS
        assert listed.cache_scope == "private"
        refused = await client.call_tool("memory_store", {"content": "the reader must not store this"})
        assert refused.is_error
        text = refused.content[0].text if refused.content and hasattr(refused.content[0], "text") else ""
        assert str(text).startswith("permission_denied: this session's access token does not allow store"), text
        listed_memories = await client.call_tool("memory_list", {})
        assert listed_memories.structured_content is not None
        assert listed_memories.structured_content["memories"] == []
    stores = [
        r for r in world["guardian"].audit_rows() if r["operation"] == "memory.store" and r["agent"] == "remote-reader"
    ]
    assert stores and all(row["decision"] == "deny" for row in stores)
    assert json.dumps(stores).count("must not store") == 0


# -- server/discover and the tool list across the two revisions (2026-07-28) ------------------


@pytest.mark.anyio
async def test_server_discover_names_the_gateway_and_what_it_serves(world: dict[str, Any]) -> None:
    async with oauth_client(world, "reader", "2026-07-28") as client:
        raw = await client.session.send_discover("2026-07-28")
    discovered = DiscoverResult.model_validate(raw)
    assert raw["_meta"][SERVER_INFO_META_KEY]["name"] == "agent-guardian"
    assert discovered.capabilities.tools is not None
    assert discovered.instructions and "memory_store" in discovered.instructions
    # The modern wire names the modern revisions only (as the SDK's -32022 error does too); the
    # 2025-11-25 revision is reached by its initialize handshake, on the same endpoint.
    assert discovered.supported_versions == ["2026-07-28"]
    async with oauth_client(world, "reader", "legacy") as legacy:
        assert legacy.protocol_version == "2025-11-25"
        assert legacy.server_info is not None and legacy.server_info.name == "agent-guardian"
    async with oauth_client(world, "reader", "auto") as auto:  # a client that probes discover first stays modern
        assert auto.protocol_version == "2026-07-28"


def _by_name(listed: ListToolsResult) -> dict[str, dict[str, Any]]:
    """Each listed tool as its JSON (absent fields left out), by name."""
    return {tool.name: tool.model_dump(by_alias=True, mode="json", exclude_none=True) for tool in listed.tools}


@pytest.mark.anyio
async def test_both_revisions_list_the_same_tools_field_by_field(world: dict[str, Any]) -> None:
    async with oauth_client(world, "writer", "legacy") as client:
        legacy = _by_name(await client.list_tools())
    async with oauth_client(world, "writer", "2026-07-28") as client:
        modern = _by_name(await client.list_tools())
    assert set(legacy) == set(modern) == WRITE_TOOLS | READ_TOOLS
    for name, tool in legacy.items():
        assert tool["annotations"] and tool["outputSchema"], name
        for key in tool.keys() | modern[name].keys():
            assert modern[name].get(key) == tool.get(key), (name, key)
    assert legacy["memory_search"]["annotations"]["readOnlyHint"] is True
    assert legacy["memory_delete"]["annotations"]["destructiveHint"] is True


def test_the_tool_list_is_private_to_caches_on_the_wire(world: dict[str, Any]) -> None:
    token = world["issuer"].token("reader", scope="memory:read memory:write")
    meta = {
        PROTOCOL_VERSION_META_KEY: "2026-07-28",
        CLIENT_INFO_META_KEY: {"name": "raw-http", "version": "0"},
        CLIENT_CAPABILITIES_META_KEY: {},
    }
    answer = httpx.post(
        world["resource"],
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}},
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Mcp-Protocol-Version": "2026-07-28",
            "Mcp-Method": "tools/list",
        },
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()["result"]
    assert result["cacheScope"] == "private"
    assert {tool["name"] for tool in result["tools"]} == READ_TOOLS


# -- the TypeScript SDK as a client (2025-11-25) ---------------------------------------------


def run_ts_client(world: dict[str, Any], client_id: str, content: str, query: str, tmp_path: Path) -> dict[str, Any]:
    """ts_client.mjs as client_id: started and waited for by PID; its one-line JSON report.

    Its credentials go in a file only its user can read, never on the command line. It asks for
    both scopes, as a client configured for this server would: the authorization server grants
    what the client may have, and the guardian decides what the token allows.
    """
    credentials = tmp_path / f"{client_id}-credentials.json"
    credentials.touch(mode=0o600)
    secret = str(CLIENTS[client_id]["secret"])
    credentials.write_text(
        json.dumps(
            {
                "client_id": client_id,
                "client_secret": secret,
                "issuer": world["issuer"].issuer,
                "scope": "memory:read memory:write",
            }
        )
    )
    process = subprocess.Popen(
        ["node", str(OAUTH_AS / "ts_client.mjs"), world["resource"], str(credentials), content, query],
        cwd=OAUTH_AS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"ts_client.mjs (pid {process.pid}) did not finish in 60 s: {err}")
    assert process.returncode == 0, err
    assert secret not in out + err
    report: dict[str, Any] = json.loads(out)
    return report


def test_the_typescript_sdk_stores_and_recalls_over_2025_11_25(world: dict[str, Any], tmp_path: Path) -> None:
    content = "the TypeScript agent's note: the otter holt is below the weir"
    report = run_ts_client(world, "writer", content, "otter holt weir", tmp_path)
    assert report["protocolVersion"] == "2025-11-25"
    assert report["server"]["name"] == "agent-guardian"
    assert report["authorizationServer"].rstrip("/") == world["issuer"].issuer  # found from the 401's metadata
    assert report["tokens"] == 1  # one token, got after the first 401, served every later request
    assert report["tools"] == sorted(WRITE_TOOLS | READ_TOOLS)
    assert not report["store"]["isError"], report["store"]["text"]
    stored = report["store"]["structuredContent"]["memory"]
    assert stored["content"] == content
    assert not report["search"]["isError"], report["search"]["text"]
    hits = report["search"]["structuredContent"]["hits"]
    assert stored["id"] in [hit["memory"]["id"] for hit in hits]
    rows = [row for row in world["guardian"].audit_rows() if row["operation"] == "memory.store"]
    assert rows[-1]["agent"] == "remote-writer" and rows[-1]["decision"] == "allow"


def test_the_typescript_sdk_with_a_read_only_token_cannot_write(world: dict[str, Any], tmp_path: Path) -> None:
    report = run_ts_client(world, "reader", "the TypeScript reader must not store this", "TypeScript reader", tmp_path)
    assert report["protocolVersion"] == "2025-11-25"
    assert report["tools"] == sorted(READ_TOOLS)
    assert report["store"]["isError"]
    assert report["store"]["text"].startswith("permission_denied: this session's access token does not allow store")
    assert not report["search"]["isError"] and report["search"]["structuredContent"]["hits"] == []
    rows = [row for row in world["guardian"].audit_rows() if row["operation"] == "memory.store"]
    assert rows[-1]["agent"] == "remote-reader" and rows[-1]["decision"] == "deny"
    assert "TypeScript reader must not" not in json.dumps(rows)
