"""Alembic on a real database: upgrade, downgrade -1, upgrade; the compatibility record; readiness by schema."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest
from conftest import run_alembic, service_env

pytestmark = pytest.mark.service


def heads(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]


def meta(url: str) -> dict[str, tuple[bool, bool]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT revision, backward_compatible, downgrade_data_safe, applied_at "
                            "FROM schema_migration_meta").fetchall()
    assert all(row[3] is not None for row in rows)
    return {row[0]: (row[1], row[2]) for row in rows}


def indexes(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'events'")}


def test_upgrade_downgrade_upgrade_keeps_data(fresh_database):
    url = fresh_database
    up = run_alembic(url, "upgrade", "head")
    assert up.returncode == 0, up.stderr
    assert heads(url) == ["0002"]
    assert meta(url) == {"0001": (True, False), "0002": (True, True)}
    assert "ix_events_type_timestamp_id" in indexes(url)
    event_id = uuid.uuid4()
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO events (id, source, type, timestamp) VALUES (%s, 's', 't', now())", (event_id,))

    down = run_alembic(url, "downgrade", "-1")
    assert down.returncode == 0, down.stderr
    assert heads(url) == ["0001"]
    assert meta(url) == {"0001": (True, False)}
    assert "ix_events_type_timestamp_id" not in indexes(url)

    again = run_alembic(url, "upgrade", "head")
    assert again.returncode == 0, again.stderr
    assert heads(url) == ["0002"]
    assert set(meta(url)) == {"0001", "0002"}
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM events WHERE id = %s", (event_id,)).fetchone()[0] == 1


def test_alembic_reports_a_bad_database_setting_in_one_line(fresh_database):
    result = run_alembic("mysql://nope", "upgrade", "head")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: DATABASE_URL: must be a libpq URL starting with postgresql://"
    ]


def _pretend_newer_release_migrated(url: str, revision: str, backward_compatible: bool) -> None:
    """What a newer release's migration leaves behind: a head this code does not know, recorded in the meta table."""
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE alembic_version SET version_num = %s", (revision,))
        conn.execute("INSERT INTO schema_migration_meta VALUES (%s, %s, true, now())", (revision, backward_compatible))


def _ready(start_service, url: str, redis_url: str) -> httpx.Response:
    svc = start_service(service_env(url, redis_url))
    return httpx.get(svc.base_url + "/health/ready", timeout=5)


def test_readiness_by_schema_head(fresh_database, redis_server, start_service):
    url = fresh_database
    ready = _ready(start_service, url, redis_server.url)
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
    assert "alembic upgrade head" in ready.json()["checks"]["schema"]["detail"]

    assert run_alembic(url, "upgrade", "0001").returncode == 0
    behind = _ready(start_service, url, redis_server.url)
    assert behind.status_code == 503 and "older than this code" in behind.json()["checks"]["schema"]["detail"]

    assert run_alembic(url, "upgrade", "head").returncode == 0
    assert _ready(start_service, url, redis_server.url).status_code == 200

    # A newer release ran an expand-only migration: this (older) release must stay ready.
    _pretend_newer_release_migrated(url, "0003", backward_compatible=True)
    compatible = _ready(start_service, url, redis_server.url)
    assert compatible.status_code == 200, compatible.text
    assert compatible.json()["checks"]["schema"]["database_head"] == "0003"

    # Then a contract migration this release cannot run against.
    _pretend_newer_release_migrated(url, "0004", backward_compatible=False)
    breaking = _ready(start_service, url, redis_server.url)
    assert breaking.status_code == 503
    assert "0004" in breaking.json()["checks"]["schema"]["detail"]
    assert "not backward compatible" in breaking.json()["checks"]["schema"]["detail"]


def test_a_migration_blocked_by_a_held_table_lock_gives_up_at_its_lock_timeout(fresh_database, monkeypatch):
    """A long query holding the table must not hold the migration (and the deploy's fleet lock) for ever."""
    url = fresh_database
    assert run_alembic(url, "upgrade", "head").returncode == 0
    monkeypatch.setenv("MIGRATION_LOCK_TIMEOUT", "1s")
    with psycopg.connect(url) as holder:
        holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # held until this block ends
        blocked = run_alembic(url, "downgrade", "-1")  # drops an index on events: needs that lock
        assert blocked.returncode != 0, "the migration waited out the lock instead of giving up"
        assert "lock timeout" in blocked.stderr, blocked.stderr[-2000:]
    assert heads(url) == ["0002"], "a migration that gave up must leave the schema where it was"


def test_a_bad_migration_timeout_setting_is_refused_in_one_line(fresh_database, monkeypatch):
    monkeypatch.setenv("MIGRATION_STATEMENT_TIMEOUT", "forever")
    result = run_alembic(fresh_database, "upgrade", "head")
    assert result.returncode == 2
    assert "MIGRATION_STATEMENT_TIMEOUT: expected a duration like 10s" in result.stderr
