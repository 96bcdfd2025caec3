"""SQL for events. Batch writes are one statement per batch, never one INSERT per row."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection, AsyncCursor, errors, sql
from psycopg.rows import dict_row

from ingest.event_codec import EventRow

# New events (the common case) are COPYed straight into `events`, the fastest path PostgreSQL has. If any
# id already exists (a retried batch, a repeated id) the COPY fails as a whole on the primary key, its
# savepoint is rolled back, and the batch goes the idempotent way instead: COPY into a session-local staging
# table, then one INSERT ... SELECT ... ON CONFLICT DO NOTHING. See bench/ingest_throughput.py.
_COPY_EVENTS = "COPY events (id, source, type, timestamp, payload) FROM STDIN (FORMAT BINARY)"
_STAGING_DDL = """
CREATE TEMP TABLE IF NOT EXISTS events_incoming (
    id uuid, source text, type text, timestamp timestamptz, payload jsonb
) ON COMMIT DELETE ROWS
"""
_COPY_STAGING = "COPY events_incoming (id, source, type, timestamp, payload) FROM STDIN (FORMAT BINARY)"
# Binary COPY: psycopg's C dumpers write these about 4x faster than the text format. The server reads each field
# with its column's type; the payload arrives already in jsonb's binary form (event_codec.EventRow), so it is
# sent as is, through the bytea dumper, and jsonb_recv validates it.
_COPY_TYPES = ["uuid", "text", "text", "timestamptz", "bytea"]
_MOVE_STAGED = """
INSERT INTO events (id, source, type, timestamp, payload)
SELECT id, source, type, timestamp, payload FROM events_incoming
ON CONFLICT (id) DO NOTHING
"""


class InvalidCursor(ValueError):
    pass


async def _copy_rows(cur: AsyncCursor, statement: str, rows: Sequence[EventRow]) -> None:
    async with cur.copy(statement) as copy:
        copy.set_types(_COPY_TYPES)
        for row in rows:
            await copy.write_row(row)


async def insert_events(conn: AsyncConnection, rows: Sequence[EventRow]) -> int:
    """Store (id, source, type, timestamp, payload JSON) rows; returns how many were new. Ids already stored
    (or repeated in the batch) are skipped."""
    if not rows:
        return 0
    async with conn.transaction(), conn.cursor() as cur:
        try:
            async with conn.transaction():  # savepoint
                await _copy_rows(cur, _COPY_EVENTS, rows)
            return len(rows)
        except errors.UniqueViolation:
            pass
        await cur.execute(_STAGING_DDL)
        await _copy_rows(cur, _COPY_STAGING, rows)
        await cur.execute(_MOVE_STAGED)
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
