"""The testbed's SSH key pair: ed25519, generated once, private half mode 0600."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ingestctl.errors import ConfigError


def ensure_key_pair(private_path: Path) -> tuple[Path, str]:
    """(private key path, public key line), generating the pair if it does not exist yet."""
    public_path = private_path.with_name(private_path.name + ".pub")
    if private_path.exists():
        mode = private_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(
                f"{private_path}: SSH private key is readable by group or others (mode {mode:04o}); "
                f"run `chmod 600 {private_path}`"
            )
        if not public_path.exists():
            public_path.write_text(_public_line(_load(private_path)))
        return private_path, public_path.read_text().strip()

    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path.write_text(_public_line(key))
    return private_path, public_path.read_text().strip()


def _load(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: expected an ed25519 private key, found {type(key).__name__}")
    return key


def _public_line(key: Ed25519PrivateKey) -> str:
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode() + " ingestctl-testbed\n"
