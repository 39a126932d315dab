"""OAuth access tokens verified by the guardian itself, from a real authorization server (oidc-provider).

The gateway only forwards a token; these tests send it straight to the guardian's agent socket,
as a compromised gateway could, and check that the guardian alone decides: issuer, signature
(by a key the issuer publishes, fetched by guardianctl oauth fetch-keys, never from the caller),
audience, expiry, scopes, and the policy's mapping of the token's client to an agent.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from shared.rpc.guardian.v1 import admin_pb2, agent_pb2
from tests.support.harness import Guardian, running_guardian
from tests.support.oauth_server import AuthorizationServer, forge, running_authorization_server, signing_key

RESOURCE = "http://127.0.0.1:8765/mcp"
CLIENTS = {
    "writer": {"secret": "writer-secret", "scope": "memory:read memory:write", "ttl": 300},
    "reader": {"secret": "reader-secret", "scope": "memory:read", "ttl": 300},
    "brief": {"secret": "brief-secret", "scope": "memory:read memory:write", "ttl": 1},
    "stranger": {"secret": "stranger-secret", "scope": "memory:read memory:write", "ttl": 300},
}
ALL_SCOPES = "memory:read memory:write"


@pytest.fixture(scope="module")
def issuer() -> Iterator[AuthorizationServer]:
    with running_authorization_server(CLIENTS, [RESOURCE, "https://other.example/mcp"]) as server:
        yield server


def oauth_policy(server: AuthorizationServer, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": server.issuer,
        "audience": RESOURCE,
        "agents": {"writer": "writer-agent", "reader": "reader-agent", "brief": "writer-agent"},
        "clock_skew": "1ms",
        **extra,
    }


@pytest.fixture(scope="module")
def guardian(issuer: AuthorizationServer) -> Iterator[Guardian]:
    with running_guardian(oauth=oauth_policy(issuer)) as started:
        for name in ("writer-agent", "reader-agent"):
            started.add_agent(name)
        fetched = started.ctl("oauth", "fetch-keys", "--issuer", issuer.issuer, "--output", str(keys_file(started)))
        assert fetched.returncode == 0, fetched.stderr
        yield started


def keys_file(guardian: Guardian) -> Any:
    return guardian.state_dir / "issuer-keys.json"


def open_session(guardian: Guardian, token: str) -> agent_pb2.OpenSessionResponse | grpc.RpcError:
    channel, stub = guardian.agent_stub()
    with channel:
        try:
            response: agent_pb2.OpenSessionResponse = stub.OpenSession(agent_pb2.OpenSessionRequest(agent_token=token))
        except grpc.RpcError as error:
            return error
        return response


def refused(answer: Any, code: grpc.StatusCode, text: str) -> None:
    assert isinstance(answer, grpc.RpcError), answer
    assert answer.code() == code, answer.details()
    assert text in (answer.details() or ""), answer.details()


def store(guardian: Guardian, session_id: str, content: str) -> grpc.RpcError | str:
    channel, stub = guardian.agent_stub()
    with channel:
        try:
            request = agent_pb2.StoreRequest(session_id=session_id, memory=agent_pb2.MemoryDraft(content=content))
            return str(stub.Store(request).memory.id)
        except grpc.RpcError as error:
            return error


def test_a_token_opens_a_session_as_the_agent_the_policy_maps_its_client_to(
    guardian: Guardian, issuer: AuthorizationServer
) -> None:
    opened = open_session(guardian, issuer.token("writer", scope=ALL_SCOPES))
    assert isinstance(opened, agent_pb2.OpenSessionResponse)
    assert opened.agent == "writer-agent"
    assert set(opened.operations) == {"store", "get", "search", "list", "update", "delete"}
    assert opened.expires_at_ms <= int(time.time() * 1000) + 300_000 + 1000  # never past the token's exp
    assert isinstance(store(guardian, opened.session_id, "written with an OAuth token"), str)
    row = [r for r in guardian.audit_rows() if r["operation"] == "session.open" and r["decision"] == "allow"][-1]
    assert (
        row["agent"] == "writer-agent" and "oauth client_id=writer scope=memory:read memory:write" in row["object_id"]
    )


def test_a_read_only_token_may_read_and_is_refused_a_write(guardian: Guardian, issuer: AuthorizationServer) -> None:
    opened = open_session(guardian, issuer.token("reader", scope=ALL_SCOPES))
    assert isinstance(opened, agent_pb2.OpenSessionResponse)
    assert opened.agent == "reader-agent" and set(opened.operations) == {"get", "search", "list"}
    answer = store(guardian, opened.session_id, "must not be stored")
    refused(answer, grpc.StatusCode.PERMISSION_DENIED, "does not allow store")
    channel, stub = guardian.agent_stub()
    with channel:
        listed = stub.List(agent_pb2.ListRequest(session_id=opened.session_id))
    assert list(listed.memories) == []


def test_bad_tokens_are_refused_saying_why_and_open_nothing(guardian: Guardian, issuer: AuthorizationServer) -> None:
    brief = issuer.token("brief", scope=ALL_SCOPES)
    time.sleep(2.1)
    refused(open_session(guardian, brief), grpc.StatusCode.UNAUTHENTICATED, "has expired")
    other = issuer.token("writer", resource="https://other.example/mcp", scope=ALL_SCOPES)
    refused(open_session(guardian, other), grpc.StatusCode.UNAUTHENTICATED, "for another resource")
    claims = jwt_claims(issuer.token("writer", scope=ALL_SCOPES))
    refused(
        open_session(guardian, forge(claims, signing_key("k1"))),  # the issuer's kid, another key
        grpc.StatusCode.UNAUTHENTICATED,
        "signature does not verify",
    )
    refused(
        open_session(guardian, forge(claims, signing_key("zz"))),
        grpc.StatusCode.UNAUTHENTICATED,
        "a key the issuer does not publish",
    )
    stranger = issuer.token("stranger", scope=ALL_SCOPES)
    refused(open_session(guardian, stranger), grpc.StatusCode.UNAUTHENTICATED, "no agent is mapped to this token")
    no_scope = issuer.token("writer")
    refused(open_session(guardian, no_scope), grpc.StatusCode.UNAUTHENTICATED, "grants none of the scopes")
    denied = [r for r in guardian.audit_rows() if r["operation"] == "session.open" and r["decision"] == "deny"]
    assert len(denied) >= 6


def test_a_gateway_holding_a_token_for_one_agent_cannot_act_as_another(
    guardian: Guardian, issuer: AuthorizationServer
) -> None:
    token = issuer.token("reader", scope=ALL_SCOPES)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(client_id="writer", sub="writer", scope=ALL_SCOPES)
    forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    refused(
        open_session(guardian, f"{header}.{forged_payload}.{signature}"),
        grpc.StatusCode.UNAUTHENTICATED,
        "signature does not verify",
    )
    opened = open_session(guardian, token)
    assert isinstance(opened, agent_pb2.OpenSessionResponse) and opened.agent == "reader-agent"


def test_a_token_for_a_revoked_agent_is_refused(issuer: AuthorizationServer) -> None:
    with running_guardian(oauth=oauth_policy(issuer)) as guardian:
        guardian.add_agent("writer-agent")
        assert guardian.ctl("oauth", "fetch-keys", "--issuer", issuer.issuer, offline=True).returncode == 0
        guardian.revoke_agent("writer-agent")
        answer = open_session(guardian, issuer.token("writer", scope=ALL_SCOPES))
        refused(answer, grpc.StatusCode.UNAUTHENTICATED, "not registered or is revoked")


def test_the_issuer_rotates_its_keys_and_then_becomes_unreachable(issuer: AuthorizationServer) -> None:
    with running_guardian(oauth=oauth_policy(issuer, keys_max_age="4s")) as guardian:
        guardian.add_agent("writer-agent")
        fetch = ("oauth", "fetch-keys", "--issuer", issuer.issuer)
        assert guardian.ctl(*fetch, offline=True).returncode == 0
        old_keys = issuer.keys
        issuer.restart([signing_key("k2"), *old_keys])  # publishes k2 and signs with it
        rotated = issuer.token("writer", scope=ALL_SCOPES)
        refused(open_session(guardian, rotated), grpc.StatusCode.UNAUTHENTICATED, "a key the issuer does not publish")
        assert guardian.ctl(*fetch, offline=True).returncode == 0
        assert isinstance(open_session(guardian, rotated), agent_pb2.OpenSessionResponse)

        issuer.stop()
        unreachable = guardian.ctl(*fetch, offline=True)
        assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr
        assert isinstance(open_session(guardian, rotated), agent_pb2.OpenSessionResponse)  # cached keys still work
        time.sleep(4.5)
        refused(
            open_session(guardian, rotated), grpc.StatusCode.UNAVAILABLE, "the key refresher cannot reach the issuer"
        )
        issuer.restart(issuer.keys)


def test_without_an_oauth_section_no_jwt_is_accepted(issuer: AuthorizationServer) -> None:
    with running_guardian() as guardian:
        guardian.add_agent("writer-agent")
        answer = open_session(guardian, issuer.token("writer", scope=ALL_SCOPES))
        refused(answer, grpc.StatusCode.UNAUTHENTICATED, "accepts no OAuth access tokens")
        assert guardian.admin("Status", admin_pb2.StatusRequest()).ready is not None


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return claims
