"""Create the events table and its query indexes.

Revision ID: 0001
Revises:
Create Date: 2024-05-01
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Read statically (AST) by the deploy tooling, and recorded in schema_migration_meta by env.py. Keep true.
backward_compatible = True  # nothing ran before it: creating tables breaks no earlier release
downgrade_data_safe = False  # downgrade drops the events table and every event in it


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE events (
            id uuid PRIMARY KEY,
            source text NOT NULL,
            type text NOT NULL,
            timestamp timestamptz NOT NULL,
            payload jsonb NOT NULL DEFAULT '{}'::jsonb,
            received_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # Queries page through (timestamp, id), optionally filtered by source.
    op.execute("CREATE INDEX ix_events_timestamp_id ON events (timestamp, id)")
    op.execute("CREATE INDEX ix_events_source_timestamp_id ON events (source, timestamp, id)")


def downgrade() -> None:
    op.execute("DROP TABLE events")
