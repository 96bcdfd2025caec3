"""The PostgreSQL connection pool (psycopg 3)."""

from __future__ import annotations

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from ingest.settings import Settings


def create_pool(settings: Settings) -> AsyncConnectionPool:
    statement_timeout = settings.db_statement_timeout_ms

    async def configure(conn: AsyncConnection) -> None:
        # Timestamps leave the database in UTC whatever the server's default is.
        await conn.execute("SET TIME ZONE 'UTC'")
        await conn.execute(f"SET statement_timeout = {int(statement_timeout)}")

    return AsyncConnectionPool(
        settings.conninfo,
        min_size=settings.db_pool_min_size,
        max_size=settings.db_pool_max_size,
        timeout=settings.db_pool_timeout_seconds,
        kwargs={"autocommit": True, "application_name": "ingest", "connect_timeout": 5},
        configure=configure,
        open=False,
        name="ingest",
        reconnect_timeout=0,  # keep retrying forever: the database may come up after the service
    )
