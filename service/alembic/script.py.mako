"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}
"""

from alembic import op
import sqlalchemy as sa
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}

# Read statically (AST) by the deploy tooling, and recorded in schema_migration_meta by env.py. Keep true.
backward_compatible = False  # can the release BEFORE this migration run against the migrated schema?
downgrade_data_safe = False  # does downgrade() lose no data?


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
