"""Queue deadlines: a task no executor starts within its spec's queueTimeout fails

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("queue_deadline", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_tasks_queue_deadline",
        "tasks",
        ["queue_deadline"],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_queue_deadline", table_name="tasks", postgresql_where=sa.text("status = 'queued'"))
    op.drop_column("tasks", "queue_deadline")
