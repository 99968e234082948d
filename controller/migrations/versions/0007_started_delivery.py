"""Which delivery of its message a running attempt started from, to tell poison from broker churn

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("started_delivery", sa.Integer(), nullable=True))
    op.add_column("tasks", sa.Column("started_series", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "started_series")
    op.drop_column("tasks", "started_delivery")
