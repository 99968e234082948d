"""Open correction decisions by workflow: closed as censored when their workflow ends first

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_correction_decisions_open_workflow",
        "correction_decisions",
        ["workflow_id"],
        postgresql_where=sa.text("outcome IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_correction_decisions_open_workflow",
        table_name="correction_decisions",
        postgresql_where=sa.text("outcome IS NULL"),
    )
