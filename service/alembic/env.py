"""Alembic environment: the URL comes from the service settings; every step is recorded in
schema_migration_meta so a running release can tell whether a newer schema is still compatible with it."""

from __future__ import annotations

import os
import re
import sys
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context
from ingest.settings import ConfigurationError, load_database_settings

META_DDL = """
CREATE TABLE IF NOT EXISTS schema_migration_meta (
    revision text PRIMARY KEY,
    backward_compatible boolean NOT NULL,
    downgrade_data_safe boolean NOT NULL,
    applied_at timestamptz
)
"""


def _declared(module, name: str, revision: str) -> bool:
    value = getattr(module, name, None)
    if not isinstance(value, bool):
        raise TypeError(f"migration {revision}: expected module-level `{name} = True|False`, found {value!r}")
    return value


def record_step(ctx, step, heads, run_args) -> None:
    """on_version_apply hook: runs inside the migration's transaction, so the record and the DDL commit together."""
    connection = ctx.connection
    for revision_id in step.up_revision_ids if hasattr(step, "up_revision_ids") else [step.up_revision_id]:
        if step.is_upgrade:
            script = step.revision_map.get_revision(revision_id)
            connection.execute(
                sa.text(
                    "INSERT INTO schema_migration_meta (revision, backward_compatible, downgrade_data_safe, applied_at)"
                    " VALUES (:rev, :bc, :ds, now()) ON CONFLICT (revision) DO UPDATE SET"
                    " backward_compatible = EXCLUDED.backward_compatible,"
                    " downgrade_data_safe = EXCLUDED.downgrade_data_safe, applied_at = EXCLUDED.applied_at"
                ),
                {"rev": revision_id, "bc": _declared(script.module, "backward_compatible", revision_id),
                 "ds": _declared(script.module, "downgrade_data_safe", revision_id)},
            )
        else:
            connection.execute(sa.text("DELETE FROM schema_migration_meta WHERE revision = :rev"),
                               {"rev": revision_id})


def run_migrations_offline() -> None:
    context.configure(url=_url().render_as_string(hide_password=True), literal_binds=True,
                      on_version_apply=record_step, transaction_per_migration=True)
    with context.begin_transaction():
        context.execute(META_DDL)
        context.run_migrations()


def run_migrations_online() -> None:
    engine = sa.create_engine(_url(), poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        # A migration waiting on a table lock held by a long query would hold the deploy (and its fleet lock)
        # for ever, and queue every api query behind it: give up instead, and let the deploy roll back.
        lock_timeout, statement_timeout = _timeouts()
        connection.execute(sa.text(f"SET lock_timeout = '{lock_timeout}'"))
        connection.execute(sa.text(f"SET statement_timeout = '{statement_timeout}'"))
        connection.execute(sa.text(META_DDL))
        connection.commit()
        context.configure(connection=connection, on_version_apply=record_step, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


TIMEOUT = re.compile(r"^[0-9]{1,7}(ms|s|min|h)?$")


def _timeouts() -> tuple[str, str]:
    """MIGRATION_LOCK_TIMEOUT (default 10s) and MIGRATION_STATEMENT_TIMEOUT (default 30min), PostgreSQL units."""
    values = []
    for name, default in (("MIGRATION_LOCK_TIMEOUT", "10s"), ("MIGRATION_STATEMENT_TIMEOUT", "30min")):
        value = os.environ.get(name, default).strip()
        if not TIMEOUT.match(value):
            print(f"configuration error: {name}: expected a duration like 10s, 500ms or 30min, found {value!r}",
                  file=sys.stderr)
            raise SystemExit(2)
        values.append(value)
    return values[0], values[1]


def _url():
    try:
        return load_database_settings().sqlalchemy_url()
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
