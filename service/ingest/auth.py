"""Credentials: an API key for ingest, an HS256 JWT with the `events:read` scope for queries.

A query token must be signed with `JWT_SECRET`, name this service as its audience (`aud`, `JWT_AUDIENCE`) and
issuer (`iss`, `JWT_ISSUER`), and expire (`exp`) within `JWT_MAX_LIFETIME_SECONDS`: of its `iat` when it has
one, of now when it does not. So a leaked token is useful for a bounded time, never "until the year 3000".
"""

from __future__ import annotations

import hmac
import time

import jwt
from fastapi import Request

from ingest.errors import ApiError

READ_SCOPE = "events:read"
_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ingest"'}
_REQUIRED_CLAIMS = ["exp", "aud", "iss"]


class Authenticator:
    def __init__(self, api_key: str, jwt_secret: str, leeway_seconds: int, *, audience: str = "ingest",
                 issuer: str = "ingest", max_lifetime_seconds: int = 86400):
        self._api_key = api_key.encode()
        self._jwt_secret = jwt_secret
        self._leeway = leeway_seconds
        self._audience = audience
        self._issuer = issuer
        self._max_lifetime = max_lifetime_seconds

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
            raise _unauthorized("missing `Authorization: Bearer <JWT>` header")
        claims = self.decode(token.strip())
        if scope not in _scopes(claims.get("scope")):
            raise ApiError(403, "FORBIDDEN", f"token scope must include {scope!r}")
        return claims

    def decode(self, token: str) -> dict:
        """The claims of a valid token, else a 401 ApiError whose message says which rule the token broke."""
        try:
            claims = jwt.decode(
                token, self._jwt_secret, algorithms=["HS256"], leeway=self._leeway,
                audience=self._audience, issuer=self._issuer, options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.ExpiredSignatureError:
            raise _unauthorized("bearer token has expired; mint a new one") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _unauthorized(f"bearer token lacks the required `{exc.claim}` claim") from None
        except jwt.InvalidAudienceError:
            raise _unauthorized(
                f"bearer token audience (`aud`) must include {self._audience!r} (JWT_AUDIENCE)") from None
        except jwt.InvalidIssuerError:
            raise _unauthorized(f"bearer token issuer (`iss`) must be {self._issuer!r} (JWT_ISSUER)") from None
        except jwt.InvalidTokenError as exc:
            raise _unauthorized(f"bearer token is not valid: {type(exc).__name__}") from None
        self._check_lifetime(claims)
        return claims

    def _check_lifetime(self, claims: dict) -> None:
        # PyJWT has validated `exp` (and `iat` when present) as integers, `iat` as not in the future.
        expires = int(claims["exp"])
        if claims.get("iat") is not None:
            lifetime = expires - int(claims["iat"])
            too_long = lifetime > self._max_lifetime
        else:
            too_long = expires - time.time() > self._max_lifetime + self._leeway
        if too_long:
            raise _unauthorized(
                f"bearer token lifetime exceeds the maximum of {self._max_lifetime} seconds "
                "(JWT_MAX_LIFETIME_SECONDS); mint one that expires sooner"
            )


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "UNAUTHORIZED", message, _BEARER_CHALLENGE)


def _scopes(claim: object) -> set[str]:
    # OAuth 2 style space-separated string, or a JSON list.
    if isinstance(claim, str):
        return set(claim.split())
    if isinstance(claim, list):
        return {item for item in claim if isinstance(item, str)}
    return set()
