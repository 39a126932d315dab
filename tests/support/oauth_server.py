"""A real OAuth 2.1 authorization server for the tests (node oidc-provider, tests/support/oauth_as/).

Started by PID on a loopback port, stopped by PID; restarted on the same port with other
signing keys to rotate them. Tokens are got the way an OAuth client gets them: the
client_credentials grant at the token endpoint, with the resource (RFC 8707) named.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

HERE = Path(__file__).resolve().parent / "oauth_as"


def signing_key(kid: str) -> dict[str, Any]:
    """A fresh P-256 private JWK with kid (what the server signs with, or a stranger's key)."""
    key: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1())))
    return {**key, "kid": kid, "alg": "ES256", "use": "sig"}


def private_key(key: dict[str, Any]) -> ec.EllipticCurvePrivateKey:
    """The private key of a JWK signing_key made."""
    private = ECAlgorithm.from_jwk(json.dumps(key))
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    return private


def forge(claims: dict[str, Any], key: dict[str, Any]) -> str:
    """A JWT access token signed with key (e.g. one the issuer never published)."""
    return jwt.encode(claims, private_key(key), algorithm="ES256", headers={"kid": key["kid"], "typ": "at+jwt"})


@dataclass
class AuthorizationServer:
    """oidc-provider on 127.0.0.1, configured with clients, resources and signing keys."""

    clients: dict[str, dict[str, Any]]
    resources: list[str]
    keys: list[dict[str, Any]]
    port: int = 0
    issuer: str = ""
    process: subprocess.Popen[str] | None = None
    log_file: IO[str] | None = None
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ag-as-")))

    def start(self) -> None:
        config = self.directory / "config.json"
        config.write_text(
            json.dumps({"port": self.port, "resources": self.resources, "clients": self.clients, "keys": self.keys})
        )
        self.process = subprocess.Popen(
            ["node", str(HERE / "server.mjs"), str(config)],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=self._log(),
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the authorization server did not start: {(self.directory / 'server.log').read_text()}")
        self.issuer = json.loads(line)["issuer"]
        self.port = int(urllib.parse.urlsplit(self.issuer).port or 0)

    def _log(self) -> IO[str]:
        """server.log, opened for the node process's stderr (closed again by stop)."""
        self.log_file = (self.directory / "server.log").open("a")
        return self.log_file

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def restart(self, keys: list[dict[str, Any]]) -> None:
        """The same issuer (port), other signing keys: the first signs."""
        self.stop()
        self.keys = keys
        self.start()

    def token(self, client: str, resource: str | None = None, scope: str | None = None) -> str:
        """An access token for client, by client_credentials (for resource, else the first configured)."""
        form = {"grant_type": "client_credentials", "resource": resource or self.resources[0]}
        if scope:
            form["scope"] = scope
        secret = self.clients[client]["secret"]
        basic = base64.b64encode(f"{client}:{secret}".encode()).decode()
        request = urllib.request.Request(
            f"{self.issuer}/token",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return str(json.loads(response.read())["access_token"])
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"token request refused: {error.code} {error.read()!r}") from None


@contextmanager
def running_authorization_server(
    clients: dict[str, dict[str, Any]], resources: list[str], keys: list[dict[str, Any]] | None = None
) -> Iterator[AuthorizationServer]:
    server = AuthorizationServer(clients, resources, keys or [signing_key("k1")])
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)  # its config and log
