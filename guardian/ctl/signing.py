"""Which key signs guardianctl's requests: a key file, or an ed25519 key held by ssh-agent.

In order: ``--key FILE``; ``$AGENT_GUARDIAN_ADMIN_KEY``; ``--ssh-agent`` (or, with
neither, an agent at ``$SSH_AUTH_SOCK`` holding an ed25519 key), picking the
key ``--identity`` names by fingerprint when the agent holds several; the user's
own key file ``~/.config/agent-guardian/admin.key`` (``$XDG_CONFIG_HOME`` if set);
and last, with ``--config``, the key ``guardianctl init`` made in that state dir
for local use (``admin.key``). Through the agent the private key never leaves it: the
agent signs the request's SSH signature message (guardian/access/signed_request.py).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Final

from guardian.access.key_file import KeyFileSigner
from guardian.access.signed_request import PublicKey, Signer
from guardian.state.config import load_config
from guardian.state.statedir import LOCAL_ADMIN_KEY
from shared.errors import ConfigError

__all__ = ["KEY_ENV", "LOCAL_KEY_FILE", "AgentSigner", "add_signing_options", "signer_for", "user_key_file"]

#: The environment variable naming an admin key file.
KEY_ENV: Final = "AGENT_GUARDIAN_ADMIN_KEY"
#: The key ``guardianctl init`` makes in a state dir for the local admin (and its .pub beside it).
LOCAL_KEY_FILE: Final = LOCAL_ADMIN_KEY


class AgentSigner:
    """Signs with an ed25519 key held by the ssh-agent at $SSH_AUTH_SOCK."""

    def __init__(self, identity: str = "") -> None:
        import paramiko  # noqa: PLC0415 - only a command that signs through the agent needs it

        if not os.environ.get("SSH_AUTH_SOCK"):
            raise ConfigError("no ssh-agent: SSH_AUTH_SOCK is not set (start one: eval $(ssh-agent); ssh-add KEY)")
        try:
            self._agent = paramiko.Agent()
            held = [key for key in self._agent.get_keys() if key.get_name() == "ssh-ed25519"]
        except paramiko.SSHException as error:
            raise ConfigError(f"the ssh-agent at SSH_AUTH_SOCK did not answer: {error}") from None
        keys = {PublicKey(key.asbytes()).fingerprint: key for key in held}
        if identity:
            chosen = keys.get(identity)
            if chosen is None:
                raise ConfigError(f"the ssh-agent holds no ed25519 key {identity} (ssh-add -l lists what it holds)")
        elif len(keys) == 1:
            chosen = next(iter(keys.values()))
        elif not keys:
            raise ConfigError("the ssh-agent holds no ed25519 key (add yours: ssh-add ~/.ssh/id_ed25519)")
        else:
            raise ConfigError(
                f"the ssh-agent holds {len(keys)} ed25519 keys: choose one with --identity FINGERPRINT"
                f" ({', '.join(sorted(keys))})"
            )
        self._key = chosen
        self._public_key = PublicKey(chosen.asbytes())

    @property
    def public_key(self) -> PublicKey:
        """The chosen key's public half."""
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        """The agent's SSH signature blob over data."""
        import paramiko  # noqa: PLC0415

        try:
            return bytes(self._key.sign_ssh_data(data))
        except paramiko.SSHException as error:
            raise ConfigError(f"the ssh-agent refused to sign: {error}") from None


def user_key_file() -> Path:
    """The user's own admin key file: ~/.config/agent-guardian/admin.key ($XDG_CONFIG_HOME if set)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "agent-guardian" / "admin.key"


def signer_for(args: argparse.Namespace) -> Signer:
    """The key this command signs with (the order is in the module's docstring); ConfigError if there is none."""
    if getattr(args, "key", None):
        return KeyFileSigner(Path(args.key))
    if os.environ.get(KEY_ENV):
        return KeyFileSigner(Path(os.environ[KEY_ENV]))
    if getattr(args, "ssh_agent", False) or getattr(args, "identity", "") or os.environ.get("SSH_AUTH_SOCK"):
        try:
            return AgentSigner(getattr(args, "identity", "") or "")
        except ConfigError:
            if getattr(args, "ssh_agent", False) or getattr(args, "identity", ""):
                raise
    own = user_key_file()
    if own.exists():
        return KeyFileSigner(own)
    if getattr(args, "config", None):
        local = load_config(Path(args.config)).state_dir / LOCAL_KEY_FILE
        if local.exists():
            return KeyFileSigner(local)
    raise ConfigError(
        "no admin key to sign with: pass --key FILE (an ed25519 private key, mode 0600), set"
        f" {KEY_ENV}, load your ed25519 key into ssh-agent (ssh-add), or keep it in {user_key_file()}; an"
        " admin enrols your public key with guardianctl admins add"
    )


def add_signing_options(parser: argparse.ArgumentParser) -> None:
    """guardianctl's options choosing the key it signs with."""
    signing = parser.add_argument_group(
        "signing (every request is signed by an enrolled admin's ed25519 key)",
        f"Without --key or --ssh-agent: ${KEY_ENV}, else an ed25519 key in ssh-agent, else (with --config) the"
        " state dir's admin.key that init made.",
    )
    signing.add_argument("--key", help="an ed25519 private key file (OpenSSH or PEM, unencrypted, mode 0600)")
    signing.add_argument("--ssh-agent", action="store_true", help="sign with an ed25519 key held by ssh-agent")
    signing.add_argument("--identity", default="", help="which of the agent's keys: its SHA256:... fingerprint")
