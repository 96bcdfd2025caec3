"""SQL for events. Batch writes are one statement per batch, never one INSERT per row."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from ingest.models import Event

# unnest() turns the column arrays back into rows; ON CONFLICT makes a retried batch harmless.
_INSERT = """
INSERT INTO events (id, source, type, timestamp, payload)
SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::timestamptz[], %s::text[]::jsonb[])
ON CONFLICT (id) DO NOTHING
"""


class InvalidCursor(ValueError):
    pass


async def insert_events(conn: AsyncConnection, events: Sequence[Event]) -> int:
    """Store the events; returns how many were new. Ids already stored (or repeated in the batch) are skipped."""
    if not events:
        return 0
    ids, sources, types, timestamps, payloads = [], [], [], [], []
    for event in events:
        ids.append(event.id)
        sources.append(event.source)
        types.append(event.type)
        timestamps.append(event.timestamp)
        payloads.append(json.dumps(event.payload, separators=(",", ":")))
    async with conn.cursor() as cur:
        await cur.execute(_INSERT, (ids, sources, types, timestamps, payloads))
        return cur.rowcount


def encode_cursor(timestamp: datetime, event_id: UUID) -> str:
    raw = json.dumps([timestamp.isoformat(), str(event_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        timestamp, event_id = json.loads(raw)
        return datetime.fromisoformat(timestamp), UUID(event_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidCursor("is not a cursor this API returned; pass next_cursor unchanged") from None


async def query_events(conn: AsyncConnection, *, source: str | None, type_: str | None, since: datetime | None,
                       until: datetime | None, after: tuple[datetime, UUID] | None,
                       limit: int) -> tuple[list[dict[str, Any]], str | None]:
    """One page in (timestamp, id) order, keyset-paginated so deep pages cost the same as the first."""
    clauses: list[sql.Composable] = []
    params: list[Any] = []
    if source is not None:
        clauses.append(sql.SQL("source = %s"))
        params.append(source)
    if type_ is not None:
        clauses.append(sql.SQL("type = %s"))
        params.append(type_)
    if since is not None:
        clauses.append(sql.SQL("timestamp >= %s"))
        params.append(since)
    if until is not None:
        clauses.append(sql.SQL("timestamp < %s"))
        params.append(until)
    if after is not None:
        clauses.append(sql.SQL("(timestamp, id) > (%s, %s)"))
        params.extend(after)
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("")
    query = sql.SQL(
        "SELECT id, source, type, timestamp, payload, received_at FROM events{} ORDER BY timestamp, id LIMIT %s"
    ).format(where)
    params.append(limit + 1)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query, params)
        rows = await cur.fetchall()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1]["timestamp"], rows[-1]["id"])
    return rows, next_cursor


async def count_by_source_and_type(conn: AsyncConnection, since: datetime,
                                   until: datetime) -> list[tuple[str, str, int]]:
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT source, type, count(*) FROM events WHERE timestamp >= %s AND timestamp < %s"
            " GROUP BY source, type",
            (since, until),
        )
        return await cur.fetchall()
