"""Retention: finished workflows can be deleted, and their correction decisions outlive them

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FINISHED = "status IN ('succeeded', 'failed', 'cancelled')"


def upgrade() -> None:
    # Decisions are the learning loop's data: deleting a workflow unlinks them instead of taking
    # them along. The full index serves that unlinking (the partial one covers open decisions only).
    op.drop_constraint("fk_correction_decisions_workflow_id", "correction_decisions", type_="foreignkey")
    op.alter_column("correction_decisions", "workflow_id", nullable=True)
    op.create_foreign_key(
        "fk_correction_decisions_workflow_id",
        "correction_decisions",
        "workflows",
        ["workflow_id"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index("ix_correction_decisions_workflow_id", "correction_decisions", ["workflow_id"])
    # Pruning by age walks finished workflows oldest first.
    op.create_index("ix_workflows_finished", "workflows", ["finished_at"], postgresql_where=sa.text(FINISHED))


def downgrade() -> None:
    op.drop_index("ix_workflows_finished", table_name="workflows", postgresql_where=sa.text(FINISHED))
    op.drop_index("ix_correction_decisions_workflow_id", table_name="correction_decisions")
    op.drop_constraint("fk_correction_decisions_workflow_id", "correction_decisions", type_="foreignkey")
    # The old schema cannot hold a decision without its workflow: those are deleted.
    op.execute("DELETE FROM correction_decisions WHERE workflow_id IS NULL")
    op.alter_column("correction_decisions", "workflow_id", nullable=False)
    op.create_foreign_key(
        "fk_correction_decisions_workflow_id",
        "correction_decisions",
        "workflows",
        ["workflow_id"],
        ["id"],
        ondelete="CASCADE",
    )
