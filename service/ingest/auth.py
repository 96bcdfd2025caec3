"""Credentials: an API key for ingest, an HS256 JWT with the `events:read` scope for queries."""

from __future__ import annotations

import hmac

import jwt
from fastapi import Request

from ingest.errors import ApiError

READ_SCOPE = "events:read"
_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ingest"'}


class Authenticator:
    def __init__(self, api_key: str, jwt_secret: str, leeway_seconds: int):
        self._api_key = api_key.encode()
        self._jwt_secret = jwt_secret
        self._leeway = leeway_seconds

    def require_api_key(self, request: Request) -> None:
        presented = request.headers.get("x-api-key")
        if not presented:
            raise ApiError(401, "UNAUTHORIZED", "missing X-API-Key header; ingest needs the service API key",
                           {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})
        if not hmac.compare_digest(presented.encode(), self._api_key):
            raise ApiError(401, "UNAUTHORIZED", "X-API-Key is not valid",
                           {"WWW-Authenticate": 'ApiKey header="X-API-Key"'})

    def require_scope(self, request: Request, scope: str = READ_SCOPE) -> dict:
        header = request.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise ApiError(401, "UNAUTHORIZED", "missing `Authorization: Bearer <JWT>` header", _BEARER_CHALLENGE)
        try:
            claims = jwt.decode(
                token.strip(), self._jwt_secret, algorithms=["HS256"], leeway=self._leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "UNAUTHORIZED", "bearer token has expired; mint a new one", _BEARER_CHALLENGE) from None
        except jwt.InvalidTokenError as exc:
            raise ApiError(
                401, "UNAUTHORIZED", f"bearer token is not valid: {type(exc).__name__}", _BEARER_CHALLENGE
            ) from None
        if scope not in _scopes(claims.get("scope")):
            raise ApiError(403, "FORBIDDEN", f"token scope must include {scope!r}")
        return claims


def _scopes(claim: object) -> set[str]:
    # OAuth 2 style space-separated string, or a JSON list.
    if isinstance(claim, str):
        return set(claim.split())
    if isinstance(claim, list):
        return {item for item in claim if isinstance(item, str)}
    return set()
