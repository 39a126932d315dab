"""OAuth access tokens as the guardian checks them: the policy's oauth section, the key file, each refusal."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from guardian.access.oauth import IssuerKeys, OAuthRules, verify_access_token, write_key_file
from guardian.policy.compile import compile_policy
from guardian.policy.default import render_default_policy
from shared.errors import ConfigError, Unauthenticated, Unavailable
from tests.support.oauth_server import forge, private_key, signing_key

ISSUER = "https://auth.example.com"
AUDIENCE = "https://memory.example.com/mcp"
RULES = OAuthRules(ISSUER, AUDIENCE, "client_id", {"app": "app-agent"})


def public(key: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in key.items() if name != "d"}


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now, "client_id": "app", "scope": "memory:read"}
    return {**base, **changes}


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[IssuerKeys, dict[str, Any]]:
    key = signing_key("k1")
    path = tmp_path / "issuer-keys.json"
    assert write_key_file(path, ISSUER, {"keys": [key]}, int(time.time() * 1000)) == 1
    assert '"d"' not in path.read_text()  # a private part offered by mistake is never kept
    return IssuerKeys(path), key


def test_a_good_token_grants_its_scopes_operations_as_the_mapped_agent(
    keyed: tuple[IssuerKeys, dict[str, Any]],
) -> None:
    keys, key = keyed
    grant = verify_access_token(forge(claims(), key), RULES, keys, int(time.time() * 1000))
    assert (grant.agent, grant.operations, grant.caller) == ("app-agent", frozenset({"get", "search", "list"}), "app")


@pytest.mark.parametrize(
    ("changes", "header", "message"),
    [
        ({"exp": int(time.time()) - 120}, {}, "has expired"),
        ({"aud": "https://elsewhere.example/mcp"}, {}, "for another resource"),
        ({"iss": "https://evil.example"}, {}, "from another issuer"),
        ({"client_id": "other"}, {}, "no agent is mapped"),
        ({"scope": "openid profile"}, {}, "grants none of the scopes"),
        ({}, {"typ": "JWT"}, "not an OAuth access token"),
        ({}, {"kid": "k9"}, "a key the issuer does not publish"),
    ],
)
def test_each_bad_token_is_refused_saying_why(
    keyed: tuple[IssuerKeys, dict[str, Any]], changes: dict[str, Any], header: dict[str, str], message: str
) -> None:
    keys, key = keyed
    token = jwt.encode(
        claims(**changes), private_key(key), algorithm="ES256", headers={"kid": "k1", "typ": "at+jwt", **header}
    )
    with pytest.raises(Unauthenticated, match=message):
        verify_access_token(token, RULES, keys, int(time.time() * 1000))


def test_an_algorithm_the_policy_does_not_allow_is_refused(keyed: tuple[IssuerKeys, dict[str, Any]]) -> None:
    keys, key = keyed
    rules = OAuthRules(ISSUER, AUDIENCE, "client_id", {"app": "app-agent"}, algorithms=("RS256",))
    with pytest.raises(Unauthenticated, match="algorithm is not one the policy allows"):
        verify_access_token(forge(claims(), key), rules, keys, int(time.time() * 1000))


def test_keys_too_old_or_missing_or_for_another_issuer_make_the_guardian_unavailable(tmp_path: Path) -> None:
    key = signing_key("k1")
    path = tmp_path / "keys.json"
    token = forge(claims(), key)
    with pytest.raises(Unavailable, match="have not been fetched yet"):
        verify_access_token(token, RULES, IssuerKeys(path), int(time.time() * 1000))
    old = int(time.time() * 1000) - RULES.keys_max_age_ms - 60_000
    write_key_file(path, ISSUER, {"keys": [public(key)]}, old)
    with pytest.raises(Unavailable, match="the key refresher cannot reach the issuer"):
        verify_access_token(token, RULES, IssuerKeys(path), int(time.time() * 1000))
    write_key_file(path, "https://other.example", {"keys": [public(key)]}, int(time.time() * 1000))
    with pytest.raises(Unavailable, match="for another issuer"):
        verify_access_token(token, RULES, IssuerKeys(path), int(time.time() * 1000))
    with pytest.raises(ConfigError, match="no key with a kid"):
        write_key_file(path, ISSUER, {"keys": [{k: v for k, v in public(key).items() if k != "kid"}]}, 0)


def test_the_policy_oauth_section_is_checked() -> None:
    base = render_default_policy()
    good = base + f"\noauth:\n  issuer: {ISSUER}\n  audience: {AUDIENCE}\n  agents: {{app: app-agent}}\n"
    assert compile_policy(good).oauth == RULES
    assert compile_policy(base).oauth is None
    for bad, message in (
        (good.replace(ISSUER, "ftp://auth.example.com"), r"oauth.issuer: expected an https:// URL"),
        (good.replace("{app: app-agent}", "{app: 'not a name'}"), "not a valid agent name"),
        (good + "  claim: email\n", "oauth.claim: client_id or sub"),
        (good + "  scopes: {memory:read: [read]}\n", "'read' is not an operation"),
        (good + "  algorithms: [HS256]\n", "oauth.algorithms: some of"),
        (good + "  clock_skew: 1h\n", "at most 5m"),
    ):
        with pytest.raises(ConfigError, match=message):
            compile_policy(bad)
