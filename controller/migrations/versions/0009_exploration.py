"""Exploration: each correction decision records the distribution the controller acted from

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL for decisions logged before exploration existed: they were taken with certainty.
    op.add_column("correction_decisions", sa.Column("behaviour", postgresql.ARRAY(sa.Float()), nullable=True))
    op.add_column(
        "correction_decisions", sa.Column("explored", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    # The off-policy estimate reads decisions task by task.
    op.create_index("ix_correction_decisions_task_id", "correction_decisions", ["task_id"])


def downgrade() -> None:
    op.drop_index("ix_correction_decisions_task_id", table_name="correction_decisions")
    op.drop_column("correction_decisions", "explored")
    op.drop_column("correction_decisions", "behaviour")
