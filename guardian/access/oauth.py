"""OAuth 2.1 access tokens, verified by the guardian itself: the gateway only forwards them.

A remote agent's MCP client gets a JWT access token (RFC 9068) from the organisation's
authorization server and sends it to the gateway; the gateway passes it, untouched, in
OpenSession. Here it is checked against the policy's ``oauth`` section (:class:`OAuthRules`):

- its header: ``typ`` ``at+jwt`` (an ID token or any other JWT is refused), a ``kid`` the
  issuer publishes, an algorithm the policy allows (the key's own, never the token's say);
- its signature, by that key, from the key file (:class:`IssuerKeys`), never from the network:
  a small separate job (``guardianctl oauth fetch-keys``) fetches the issuer's JWKS and writes
  the file, so neither the gateway nor the agent can offer the guardian other keys;
- ``iss``, ``aud`` (exactly this resource, RFC 8707), ``exp``, ``iat``, within the policy's clock skew;
- its ``scope``: each scope grants operations (``memory:read`` -> get, search, list); a
  session opened with the token may do only those, and only what the agent's profile grants;
- the claim the policy names (``client_id`` or ``sub``), mapped to an agent by the policy.

The keys are trusted while the file is fresher than ``keys_max_age``: if the issuer is
unreachable, the keys already fetched keep working until then, and after that every
token is refused as Unavailable, saying why. PyJWT does the JOSE work; it is imported
only when a key file is read or a token verified, so a guardian without OAuth never loads it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from shared.errors import ConfigError, Unauthenticated, Unavailable
from shared.formats import looks_like_jwt

if TYPE_CHECKING:
    import jwt

__all__ = [
    "DEFAULT_SCOPES",
    "IssuerKeys",
    "OAuthGrant",
    "OAuthRules",
    "verify_access_token",
    "write_key_file",
]

#: What each scope lets a session do, unless the policy says otherwise.
DEFAULT_SCOPES: Final[Mapping[str, frozenset[str]]] = {
    "memory:read": frozenset({"get", "search", "list"}),
    "memory:write": frozenset({"store", "update", "delete"}),
}
DEFAULT_ALGORITHMS: Final = ("ES256", "RS256", "PS256", "EdDSA")
_ACCESS_TOKEN_TYPES: Final = frozenset({"at+jwt", "application/at+jwt"})
#: The key file's format version (written by guardianctl oauth fetch-keys).
KEY_FILE_FORMAT: Final = "agent-guardian issuer keys v1"
_MAX_KEY_FILE: Final = 256 * 1024
#: A JWK's private members (RFC 7518 §6): never written to the key file, whatever the issuer serves.
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


@dataclass(frozen=True)
class OAuthRules:
    """The policy's ``oauth`` section: whose tokens, for which resource, mapped to which agents."""

    issuer: str
    audience: str
    #: The claim that names the caller (``client_id`` or ``sub``), and its value -> agent.
    claim: str
    agents: Mapping[str, str]
    #: Scope -> the operations it grants.
    scopes: Mapping[str, frozenset[str]] = field(default_factory=lambda: dict(DEFAULT_SCOPES))
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    keys_max_age_ms: int = 24 * 3600 * 1000
    #: How far exp and iat may be off the guardian's clock.
    clock_skew_ms: int = 30_000


@dataclass(frozen=True)
class OAuthGrant:
    """What a verified token grants: the agent, its operations, until when."""

    agent: str
    operations: frozenset[str]
    scopes: tuple[str, ...]
    expires_at_ms: int
    #: The caller as the issuer names it (the mapped claim's value), for the audit trail.
    caller: str


@dataclass(frozen=True)
class _KeySet:
    issuer: str
    fetched_at_ms: int
    keys: Mapping[str, jwt.PyJWK]


class IssuerKeys:
    """The issuer's public keys, from the key file; read again whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[int, int], _KeySet] | None = None

    def current(self) -> _KeySet:
        """The keys as the file holds them now; Unavailable when there is no usable file."""
        try:
            info = self._path.stat()
        except OSError:
            raise Unavailable(
                "the authorization server's keys have not been fetched yet (guardianctl oauth fetch-keys); retry later"
            ) from None
        stamp = (info.st_mtime_ns, info.st_size)
        with self._lock:
            if self._loaded is None or self._loaded[0] != stamp:
                self._loaded = (stamp, _read_key_file(self._path))
            return self._loaded[1]


def _read_key_file(path: Path) -> _KeySet:
    import jwt  # noqa: PLC0415 - only OAuth needs it (see above)

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            data = json.loads(handle.read(_MAX_KEY_FILE + 1)[:_MAX_KEY_FILE])
        if data.get("format") != KEY_FILE_FORMAT:
            raise ValueError("not an issuer key file")
        keys: dict[str, jwt.PyJWK] = {}
        for item in jwt.PyJWKSet.from_dict(data["jwks"]).keys:
            if item.key_id:
                keys[item.key_id] = item
        return _KeySet(str(data["issuer"]), int(data["fetched_at_ms"]), keys)
    except (OSError, ValueError, KeyError, TypeError, jwt.PyJWKSetError) as error:
        raise Unavailable(f"the authorization server's key file cannot be used ({type(error).__name__})") from None


def write_key_file(path: Path, issuer: str, jwks: Mapping[str, Any], fetched_at_ms: int) -> int:
    """Write the issuer's JWKS to path (atomically, 0644): what IssuerKeys reads. How many keys it holds.

    ConfigError when jwks holds no usable key with a ``kid``.
    """
    import jwt  # noqa: PLC0415

    listed = jwks.get("keys")
    public = {
        "keys": [
            {name: value for name, value in key.items() if name not in _PRIVATE_MEMBERS}
            for key in (listed if isinstance(listed, list) else [])
            if isinstance(key, dict)
        ]
    }
    try:
        usable = [key for key in jwt.PyJWKSet.from_dict(public).keys if key.key_id]
    except jwt.PyJWKSetError as error:
        raise ConfigError(f"the issuer's JWKS holds no usable key: {error}") from None
    if not usable:
        raise ConfigError("the issuer's JWKS holds no key with a kid")
    text = json.dumps({"format": KEY_FILE_FORMAT, "issuer": issuer, "fetched_at_ms": fetched_at_ms, "jwks": public})
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return len(usable)


def verify_access_token(token: str, rules: OAuthRules, keys: IssuerKeys, now_ms: int) -> OAuthGrant:
    """What token grants; Unauthenticated saying what is wrong with it, Unavailable when the keys are too old."""
    import jwt  # noqa: PLC0415

    if not looks_like_jwt(token):
        raise Unauthenticated("the token is neither an agent token nor a JWT access token")
    key_set = keys.current()
    if key_set.issuer != rules.issuer:
        raise Unavailable("the key file is for another issuer than the policy names; fetch the keys again")
    age_ms = now_ms - key_set.fetched_at_ms
    if age_ms > rules.keys_max_age_ms:
        raise Unavailable(
            f"the authorization server's keys were fetched {age_ms // 60_000} min ago, more than the policy's"
            f" {rules.keys_max_age_ms // 60_000} min: the key refresher cannot reach the issuer; retry later"
        )
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise Unauthenticated("the access token is not a well-formed JWT") from None
    if str(header.get("typ", "")).lower() not in _ACCESS_TOKEN_TYPES:
        raise Unauthenticated("the token is not an OAuth access token (its typ is not at+jwt)")
    key = key_set.keys.get(str(header.get("kid", "")))
    if key is None:
        raise Unauthenticated("the access token is signed by a key the issuer does not publish")
    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=list(rules.algorithms),
            audience=rules.audience,
            issuer=rules.issuer,
            leeway=rules.clock_skew_ms / 1000,
            options={"require": ["exp", "iat", "iss", "aud"], "strict_aud": True},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("the access token has expired: get a new one") from None
    except jwt.InvalidAudienceError:
        raise Unauthenticated(
            f"the access token is for another resource (its audience is not {rules.audience})"
        ) from None
    except jwt.InvalidIssuerError:
        raise Unauthenticated("the access token is from another issuer") from None
    except jwt.InvalidAlgorithmError:
        raise Unauthenticated("the access token's algorithm is not one the policy allows") from None
    except jwt.InvalidSignatureError:
        raise Unauthenticated("the access token's signature does not verify") from None
    except jwt.InvalidTokenError as error:
        raise Unauthenticated(f"the access token is not valid ({type(error).__name__})") from None
    caller = str(claims.get(rules.claim, ""))
    agent = rules.agents.get(caller)
    if agent is None:
        raise Unauthenticated(f"no agent is mapped to this token's {rules.claim} in the policy's oauth section")
    scopes = tuple(str(claims.get("scope", "")).split())
    operations = frozenset().union(*(rules.scopes.get(scope, frozenset()) for scope in scopes))
    if not operations:
        raise Unauthenticated(f"the access token grants none of the scopes {', '.join(sorted(rules.scopes))}")
    return OAuthGrant(agent, operations, scopes, int(claims["exp"]) * 1000, caller)
