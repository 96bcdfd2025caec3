"""Event ingest (API key) and queries (JWT with `events:read`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import AfterValidator

from ingest import repository
from ingest.api.deps import database, rate_limit, require_api_key, require_read_scope, services
from ingest.errors import ApiError
from ingest.event_codec import EVENT_JSON_SCHEMA, decode_batch
from ingest.metrics import EVENTS_ACCEPTED, EVENTS_DUPLICATE
from ingest.models import ErrorResponse, EventPage, IngestResult, StatsResult, Timestamp

router = APIRouter(prefix="/api/v1", tags=["events"])

# FastAPI solves a route's `dependencies` in order: `rate_limit` comes first, so every request (authenticated or
# not, valid credentials or not) spends a token of its client's bucket before the credentials are checked, and
# a flood of unauthenticated requests gets 429 like any other.


def _error_responses(*statuses: int) -> dict:
    return {status: {"model": ErrorResponse} for status in statuses}


def _ingest_body_schema() -> dict:
    event = EVENT_JSON_SCHEMA
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {
                "oneOf": [event, {"type": "array", "items": event}],
                "description": "one event, or a list of at most INGEST_MAX_BATCH_ITEMS events",
            }}},
        }
    }


@router.post(
    "/events", status_code=202, response_model=IngestResult,
    dependencies=[Depends(rate_limit), Depends(require_api_key)],
    responses=_error_responses(401, 413, 422, 429, 503), openapi_extra=_ingest_body_schema(),
    summary="Store one event or a batch; idempotent on id",
)
async def ingest_events(request: Request) -> IngestResult:
    svc = services(request)
    events = decode_batch(await request.body(), svc.settings.ingest_max_batch_items)
    async with database(request) as conn:
        accepted = await repository.insert_events(conn, events)
    duplicates = len(events) - accepted
    EVENTS_ACCEPTED.inc(accepted)
    EVENTS_DUPLICATE.inc(duplicates)
    return IngestResult(accepted=accepted, duplicates=duplicates)


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    return value


Filter = Annotated[str | None, AfterValidator(_no_nul)]


@router.get(
    "/events", response_model=EventPage, dependencies=[Depends(rate_limit), Depends(require_read_scope)],
    responses=_error_responses(401, 403, 422, 429, 503), summary="Events in timestamp order, keyset-paginated",
)
async def query_events(
    request: Request,
    source: Annotated[Filter, Query(max_length=200)] = None,
    type: Annotated[Filter, Query(max_length=200)] = None,
    since: Annotated[Timestamp | None, Query(description="inclusive, RFC 3339")] = None,
    until: Annotated[Timestamp | None, Query(description="exclusive, RFC 3339")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> EventPage:
    after = None
    if cursor:
        try:
            after = repository.decode_cursor(cursor)
        except repository.InvalidCursor as exc:
            raise ApiError(422, "VALIDATION_ERROR", f"query.cursor: {exc}") from None
    async with database(request) as conn:
        rows, next_cursor = await repository.query_events(
            conn, source=source, type_=type, since=since, until=until, after=after, limit=limit
        )
    return EventPage(items=rows, next_cursor=next_cursor)


@router.get(
    "/stats", response_model=StatsResult, dependencies=[Depends(rate_limit), Depends(require_read_scope)],
    responses=_error_responses(401, 403, 422, 429, 503), summary="Event counts by source and type",
)
async def stats(
    request: Request,
    since: Annotated[Timestamp | None, Query(description="inclusive; default 24 hours before until")] = None,
    until: Annotated[Timestamp | None, Query(description="exclusive; default now")] = None,
) -> StatsResult:
    until = until or datetime.now(UTC)
    if since is None:
        try:
            since = until - timedelta(hours=24)
        except OverflowError:  # until within a day of year 1
            since = datetime.min.replace(tzinfo=UTC)
    if since >= until:
        raise ApiError(422, "VALIDATION_ERROR", "query.since: must be earlier than until")
    async with database(request) as conn:
        counts = await repository.count_by_source_and_type(conn, since, until)
    by_source: dict[str, int] = {}
    by_type: dict[str, int] = {}
    for source, type_, count in counts:
        by_source[source] = by_source.get(source, 0) + count
        by_type[type_] = by_type.get(type_, 0) + count
    return StatsResult(since=since, until=until, total=sum(by_source.values()), by_source=by_source,
                       by_type=by_type)
