"""Dependencies shared by routes: the app's services, auth, rate limiting, and database access."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from psycopg import AsyncConnection, OperationalError
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ingest.auth import Authenticator
from ingest.errors import ApiError
from ingest.metrics import RATE_LIMITED
from ingest.ratelimit import RateLimiter, retry_after_header
from ingest.settings import Settings


@dataclass
class Services:
    settings: Settings
    pool: AsyncConnectionPool
    limiter: RateLimiter
    auth: Authenticator


def services(request: Request) -> Services:
    return request.app.state.services


def require_api_key(request: Request) -> None:
    services(request).auth.require_api_key(request)


def require_read_scope(request: Request) -> None:
    services(request).auth.require_scope(request)


async def rate_limit(request: Request) -> None:
    """One token of the client's bucket, keyed by client address (the real one behind a trusted proxy, see
    FORWARDED_ALLOW_IPS), never by credential: routes run it before their credential checks, so requests with
    missing or wrong credentials are limited too."""
    client = request.client.host if request.client else "unknown"
    decision = await services(request).limiter.check(client)
    if not decision.allowed:
        RATE_LIMITED.inc()
        raise ApiError(429, "RATE_LIMITED", "rate limit exceeded (RATE_LIMIT_PER_MINUTE); retry after the "
                                            "Retry-After seconds", retry_after_header(decision))


@asynccontextmanager
async def database(request: Request, timeout: float | None = None) -> AsyncIterator[AsyncConnection]:
    """A pooled connection; an unreachable database answers 503, never 500."""
    pool = services(request).pool
    try:
        async with pool.connection(timeout=timeout) as conn:
            yield conn
    except PoolTimeout:
        raise ApiError(503, "DATABASE_UNAVAILABLE", "no database connection became available in time",
                       {"Retry-After": "2"}) from None
    except OperationalError as exc:
        raise ApiError(503, "DATABASE_UNAVAILABLE", f"database error: {type(exc).__name__}",
                       {"Retry-After": "2"}) from None
