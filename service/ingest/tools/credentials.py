"""Secrets for the operator tools: from NAME or NAME_FILE, like the service itself."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt

# The service's defaults (service/ingest/settings.py); the tools honour the same variables when they are set.
DEFAULT_AUDIENCE = "ingest"
DEFAULT_ISSUER = "ingest"
DEFAULT_MAX_LIFETIME_SECONDS = 86400


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
    """A query token the service accepts: scope `events:read`, `aud`/`iss` from JWT_AUDIENCE/JWT_ISSUER (default
    "ingest", as the service's), `iat` now and `exp` `ttl_seconds` later, within the service's maximum lifetime
    (JWT_MAX_LIFETIME_SECONDS, default 86400)."""
    max_lifetime = _max_lifetime()
    if not 0 < ttl_seconds <= max_lifetime:
        raise CredentialsError(
            f"token ttl must be from 1 to {max_lifetime} seconds (JWT_MAX_LIFETIME_SECONDS), found {ttl_seconds}"
        )
    now = int(time.time())
    claims = {
        "sub": subject, "scope": "events:read",
        "aud": os.environ.get("JWT_AUDIENCE") or DEFAULT_AUDIENCE,
        "iss": os.environ.get("JWT_ISSUER") or DEFAULT_ISSUER,
        "iat": now, "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, jwt_secret, algorithm="HS256")


def _max_lifetime() -> int:
    text = os.environ.get("JWT_MAX_LIFETIME_SECONDS", "").strip()
    if not text:
        return DEFAULT_MAX_LIFETIME_SECONDS
    try:
        return int(text)
    except ValueError:
        raise CredentialsError(f"JWT_MAX_LIFETIME_SECONDS: expected an integer, found {text!r}") from None
