"""Policy activations as a history, so that a rollback steps back through it

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_activations",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("version", sa.Text, sa.ForeignKey("policies.version", ondelete="CASCADE"), nullable=False),
        sa.Column("undone", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("undone_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_policy_activations_live", "policy_activations", ["id"], postgresql_where=sa.text("NOT undone"))
    # The history so far is only known as each version's last activation: take it in that order,
    # the active version last.
    op.execute(
        """
        INSERT INTO policy_activations (version, activated_at)
        SELECT version, activated_at FROM policies
        WHERE activated_at IS NOT NULL AND status IN ('active', 'retired')
        ORDER BY status = 'active', activated_at
        """
    )


def downgrade() -> None:
    op.drop_index("ix_policy_activations_live", table_name="policy_activations", postgresql_where=sa.text("NOT undone"))
    op.drop_table("policy_activations")
