"""Operational endpoints: liveness, readiness, version, metrics. Unauthenticated, never rate limited."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg import OperationalError
from psycopg_pool import PoolTimeout

from ingest.api.deps import services
from ingest.schema_status import code_schema, judge, read_database_schema

router = APIRouter(tags=["operations"])

_CHECK_TIMEOUT = 2.0


@router.get("/health/live", summary="The process is up and serving")
async def live() -> dict:
    return {"status": "ok"}


async def _database_schema(request: Request):
    pool = services(request).pool
    async with pool.connection(timeout=_CHECK_TIMEOUT) as conn:
        return await asyncio.wait_for(read_database_schema(conn), _CHECK_TIMEOUT)


@router.get("/health/ready", summary="Ready for traffic: database, schema and Redis",
            responses={503: {"description": "not ready; `status` says degraded (Redis) or unavailable"}})
async def ready(request: Request) -> JSONResponse:
    svc = services(request)
    checks: dict[str, dict] = {}
    code = code_schema()
    try:
        db = await _database_schema(request)
        checks["database"] = {"status": "ok"}
        verdict = judge(code, db)
        checks["schema"] = {"status": "ok" if verdict.supported else "error", "detail": verdict.detail,
                            "database_head": ",".join(db.heads) or None, "code_head": code.head}
    except (PoolTimeout, OperationalError, TimeoutError) as exc:
        checks["database"] = {"status": "error", "detail": f"unreachable: {type(exc).__name__}"}
        checks["schema"] = {"status": "unknown", "detail": "database unreachable", "code_head": code.head}

    if svc.settings.rate_limit_backend == "memory":
        checks["redis"] = {"status": "ok", "detail": "not used: RATE_LIMIT_BACKEND=memory"}
    elif await svc.limiter.ping() and not svc.limiter.degraded:
        checks["redis"] = {"status": "ok"}
    else:
        checks["redis"] = {"status": "error", "detail": "unreachable; degrade mode: in-process rate limiting"}

    if checks["database"]["status"] != "ok" or checks["schema"]["status"] != "ok":
        status = "unavailable"
    elif checks["redis"]["status"] != "ok":
        status = "degraded"
    else:
        status = "ok"
    return JSONResponse({"status": status, "checks": checks}, status_code=200 if status == "ok" else 503)


@router.get("/version", summary="Release version and schema heads")
async def version(request: Request) -> dict:
    try:
        db = await _database_schema(request)
        schema_head = ",".join(db.heads) or None
    except (PoolTimeout, OperationalError, TimeoutError):
        schema_head = None
    return {"version": services(request).settings.app_version, "schema_head": schema_head,
            "code_schema_head": code_schema().head}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
