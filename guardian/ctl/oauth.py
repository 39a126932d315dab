"""``guardianctl oauth fetch-keys``: the OAuth issuer's public keys, fetched into the file the guardian reads.

The guardian never goes to the network for keys (its unit allows no address but
localhost), and never takes them from the gateway: this job does the fetching, as its
own user with network access to the issuer only, and writes the key file
(guardian/access/oauth.py). It reads the issuer's metadata (RFC 8414, then OpenID
Connect discovery), checks that the metadata names the same issuer, then fetches its
``jwks_uri``. Run it at an interval shorter than the policy's ``oauth.keys_max_age``:
an issuer that rotates its keys publishes the new one before it signs with it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Final

from guardian.access.oauth import write_key_file
from guardian.state.config import load_config
from shared.errors import ConfigError, Unavailable

__all__ = ["add_oauth_commands", "fetch_keys"]

_TIMEOUT_S: Final = 10.0
_MAX_DOCUMENT: Final = 256 * 1024
_LOOPBACK: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def _checked_url(url: str, what: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        return url
    raise ConfigError(f"{what} must be an https:// URL (http:// only on loopback): {url}")


def _get_json(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310 - checked scheme
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:  # noqa: S310 - checked scheme
            body = response.read(_MAX_DOCUMENT + 1)
    except urllib.error.HTTPError as error:
        raise Unavailable(f"{url} answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        raise Unavailable(f"cannot reach {url}: {getattr(error, 'reason', error)}") from None
    if len(body) > _MAX_DOCUMENT:
        raise Unavailable(f"{url} answered more than {_MAX_DOCUMENT} bytes")
    try:
        document = json.loads(body)
    except ValueError:
        raise Unavailable(f"{url} did not answer JSON") from None
    if not isinstance(document, dict):
        raise Unavailable(f"{url} did not answer a JSON object")
    return document


def _metadata(issuer: str) -> dict[str, Any]:
    """The issuer's metadata: RFC 8414 (path inserted after /.well-known/), then OpenID Connect discovery."""
    parts = urllib.parse.urlsplit(issuer)
    path = parts.path.rstrip("/")
    candidates = [
        urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")),
        issuer.rstrip("/") + "/.well-known/openid-configuration",
    ]
    failure: Unavailable | None = None
    for url in candidates:
        try:
            document = _get_json(url)
        except Unavailable as error:
            failure = error
            continue
        if document.get("issuer") != issuer:
            raise ConfigError(f"{url} names another issuer ({document.get('issuer')!r}); refusing its keys")
        return document
    assert failure is not None
    raise failure


def fetch_keys(issuer: str, output: Path) -> int:
    """Fetch the issuer's JWKS into output; how many keys it holds."""
    metadata = _metadata(_checked_url(issuer, "the issuer"))
    uri = metadata.get("jwks_uri")
    if not isinstance(uri, str):
        raise Unavailable("the issuer's metadata has no jwks_uri")
    jwks = _get_json(_checked_url(uri, "the issuer's jwks_uri"))
    return write_key_file(output, issuer, jwks, time.time_ns() // 1_000_000)


def cmd_oauth_fetch_keys(args: argparse.Namespace) -> int:
    """guardianctl oauth fetch-keys --issuer URL [--output FILE]."""
    if args.output:
        output = Path(args.output)
    elif args.config:
        output = load_config(Path(args.config)).oauth_keys
    else:
        raise ConfigError("say where to write the keys: --output FILE, or --config (its oauth_keys)")
    try:
        count = fetch_keys(args.issuer, output)
    except Unavailable as error:
        # The keys fetched before stay: the guardian uses them until the policy's keys_max_age.
        print(f"guardianctl: the issuer's keys were not fetched: {error.message}", file=sys.stderr)
        return 3
    print(f"{count} keys of {args.issuer} written to {output}")
    return 0


def add_oauth_commands(commands: Any) -> None:
    """Register ``oauth fetch-keys``."""
    oauth = commands.add_parser("oauth", help="the OAuth issuer whose access tokens remote agents bring")
    actions = oauth.add_subparsers(dest="oauth_command", required=True, metavar="ACTION")
    fetch = actions.add_parser(
        "fetch-keys",
        help="fetch the issuer's public keys into the file the guardian reads (run it at an interval)",
        description="Reads the issuer's metadata (RFC 8414 or OpenID discovery), checks it names the same"
        " issuer, fetches its jwks_uri and writes the key file atomically. On failure the file is left as it"
        " was (exit 3): the guardian keeps using those keys until the policy's oauth.keys_max_age.",
    )
    fetch.add_argument("--issuer", required=True, help="the issuer URL, exactly as the policy's oauth.issuer")
    fetch.add_argument("--output", help="the key file (default: the config's oauth_keys, with --config)")
    fetch.set_defaults(func=cmd_oauth_fetch_keys)
