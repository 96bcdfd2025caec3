"""Secrets for the operator tools: from NAME or NAME_FILE, like the service itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt


class CredentialsError(RuntimeError):
    """A secret the tool needs is missing or unreadable; the message names the variable, never a value."""


def secret_from_env(name: str) -> str:
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise CredentialsError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    raise CredentialsError(f"{name}: not set; export {name} or {name}_FILE (a file holding it)")


def mint_read_token(jwt_secret: str, ttl_seconds: int = 900, subject: str = "ingest-tools") -> str:
    now = int(time.time())
    return jwt.encode({"sub": subject, "scope": "events:read", "iat": now, "exp": now + ttl_seconds},
                      jwt_secret, algorithm="HS256")
