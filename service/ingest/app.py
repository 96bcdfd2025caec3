"""The FastAPI application: wiring of settings, pool, rate limiter, middleware and routes."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ingest.api import events, operations
from ingest.api.deps import Services
from ingest.auth import Authenticator
from ingest.body_limit import BodyLimitMiddleware
from ingest.db import create_pool
from ingest.edge import EdgeMiddleware
from ingest.errors import install_error_handlers
from ingest.metrics import BUILD_INFO
from ingest.ratelimit import RateLimiter
from ingest.schema_status import code_schema
from ingest.settings import Settings

log = logging.getLogger("ingest")


class IngestApp(FastAPI):
    def build_middleware_stack(self):
        # Outside Starlette's ServerErrorMiddleware, so even a 500 carries the request id and is counted.
        return EdgeMiddleware(BodyLimitMiddleware(super().build_middleware_stack(), self.state.max_body_bytes),
                              version=self.state.app_version, slot=self.state.app_slot)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        code_schema()  # fail at start-up, not on the first probe, if the migrations are broken
        pool = create_pool(settings)
        await pool.open(wait=False)
        limiter = RateLimiter(
            settings.rate_limit_backend, settings.redis_url.get_secret_value(), settings.redis_timeout_seconds,
            settings.rate_limit_per_minute, settings.rate_limit_burst,
            password=settings.redis_password.get_secret_value() if settings.redis_password else None,
        )
        await limiter.start()
        app.state.services = Services(
            settings=settings, pool=pool, limiter=limiter,
            auth=Authenticator(settings.api_key.get_secret_value(), settings.jwt_secret.get_secret_value(),
                               settings.jwt_leeway_seconds, audience=settings.jwt_audience,
                               issuer=settings.jwt_issuer, max_lifetime_seconds=settings.jwt_max_lifetime_seconds),
        )
        BUILD_INFO.labels(settings.app_version).set(1)
        log.info("ingest started", extra={
            "version": settings.app_version, "database": settings.describe_database(),
            "rate_limit_backend": settings.rate_limit_backend, "degraded": limiter.degraded,
        })
        try:
            yield
        finally:
            log.info("ingest stopping: in-flight requests drained")
            await limiter.close()
            await pool.close()

    app = IngestApp(
        title="ingest", version=settings.app_version, lifespan=lifespan,
        description="Stores events in PostgreSQL. Ingest with X-API-Key; query with a Bearer JWT "
                    "whose scope includes events:read.",
    )
    app.state.max_body_bytes = settings.max_request_body_bytes
    app.state.app_version = settings.app_version
    app.state.app_slot = settings.app_slot
    install_error_handlers(app)
    app.include_router(events.router)
    app.include_router(operations.router)
    return app
