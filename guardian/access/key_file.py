"""An admin's Ed25519 private key in a file (OpenSSH or PKCS#8 PEM, unencrypted, mode 0600): made, read, used.

For a key that lives in ``ssh-agent`` (the private key never leaves the agent),
guardianctl signs through the agent instead (guardian/ctl/signing.py); both make
the same SSH signatures (guardian/access/signed_request.py).
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from guardian.access.signed_request import PublicKey
from shared.errors import ConfigError

__all__ = ["KeyFileSigner", "create_key_file"]

_MAX_KEY_FILE: Final = 16 * 1024


def _ssh_string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


class KeyFileSigner:
    """Signs with an Ed25519 key read from a file only its owner can read."""

    def __init__(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as error:
            raise ConfigError(f"the admin key file {path} cannot be read: {error.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"the admin key file {path} is readable by others (mode {mode:04o}): chmod 600 {path}"
                )
            data = handle.read(_MAX_KEY_FILE)
        key: object
        try:
            if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
                key = serialization.load_ssh_private_key(data, password=None)
            else:
                key = serialization.load_pem_private_key(data, password=None)
        except TypeError:  # what cryptography raises for a key that needs a password
            raise ConfigError(
                f"the admin key file {path} is encrypted: load it into ssh-agent (ssh-add {path}) and sign"
                " through the agent"
            ) from None
        except ValueError:
            raise ConfigError(f"the admin key file {path} is not an OpenSSH or PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"the admin key file {path} is not an Ed25519 key (make one: ssh-keygen -t ed25519)")
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._public_key = PublicKey(_ssh_string(b"ssh-ed25519") + _ssh_string(raw))

    @property
    def public_key(self) -> PublicKey:
        """The key's public half."""
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        """An SSH signature blob (string "ssh-ed25519", string signature) over data."""
        return _ssh_string(b"ssh-ed25519") + _ssh_string(self._key.sign(data))


def create_key_file(path: Path, comment: str) -> PublicKey:
    """Make a new Ed25519 key in path (OpenSSH format, 0600; never over an existing file) and path.pub; its key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
        handle.flush()
        os.fsync(handle.fileno())
    public = PublicKey.parse(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    )
    path.with_name(path.name + ".pub").write_text(f"{public.openssh} {comment}\n")
    return public
