"""Index events by type, for `GET /api/v1/events?type=...` and stats.

Expand-only: the release before this one runs unchanged against it, and dropping the index loses no data.
Built CONCURRENTLY so ingest is not blocked on a large table while a rolling deploy migrates.

Revision ID: 0002
Revises: 0001
Create Date: 2024-05-08
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Read statically (AST) by the deploy tooling, and recorded in schema_migration_meta by env.py. Keep true.
backward_compatible = True  # an added index changes no query result
downgrade_data_safe = True  # dropping an index loses no data


def upgrade() -> None:
    with op.get_context().autocommit_block():
        # A previous interrupted CONCURRENTLY build leaves an INVALID index behind; rebuild it from scratch.
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_events_type_timestamp_id")
        op.execute("CREATE INDEX CONCURRENTLY ix_events_type_timestamp_id ON events (type, timestamp, id)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_events_type_timestamp_id")
