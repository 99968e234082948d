"""Correction Mode: DAG revisions, the correction-decision log, the policy registry

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policies",
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("feature_schema_version", sa.Integer(), nullable=False),
        sa.Column("reward_version", sa.Text(), nullable=False),
        sa.Column("training", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("evaluation", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('candidate', 'active', 'retired', 'rejected')", name=op.f("ck_policies_status")),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_policies")),
    )
    op.create_index(
        "ix_policies_one_active", "policies", ["status"], unique=True, postgresql_where=sa.text("status = 'active'")
    )
    op.create_table(
        "correction_decisions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workflow_id", sa.UUID(), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=False),
        sa.Column("task_name", sa.Text(), nullable=False),
        sa.Column("task_type", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("error_class", sa.Text(), nullable=False),
        sa.Column("mode", sa.Text(), nullable=False),
        sa.Column("policy_version", sa.Text(), nullable=False),
        sa.Column("feature_schema_version", sa.Integer(), nullable=False),
        sa.Column("features", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("observation", postgresql.ARRAY(sa.Float()), nullable=False),
        sa.Column("mask", postgresql.ARRAY(sa.Boolean()), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("probabilities", postgresql.ARRAY(sa.Float()), nullable=False),
        sa.Column("fallback_reason", sa.Text(), nullable=True),
        sa.Column("shadow_action", sa.Text(), nullable=True),
        sa.Column("shadow_policy_version", sa.Text(), nullable=True),
        sa.Column("shadow_probabilities", postgresql.ARRAY(sa.Float()), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=True),
        sa.Column("outcome", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("outcome_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_correction_decisions_workflow_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_correction_decisions")),
    )
    op.create_index("ix_correction_decisions_created", "correction_decisions", ["created_at"], unique=False)
    op.create_index(
        "ix_correction_decisions_open",
        "correction_decisions",
        ["task_id"],
        unique=False,
        postgresql_where=sa.text("outcome IS NULL"),
    )
    op.create_table(
        "dag_revisions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workflow_id", sa.UUID(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("parent_revision", sa.Integer(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("task_name", sa.Text(), nullable=False),
        sa.Column("reason", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("diff", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_dag_revisions_workflow_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dag_revisions")),
        sa.UniqueConstraint("workflow_id", "revision", name=op.f("uq_dag_revisions_workflow_id_revision")),
    )
    op.add_column("workflows", sa.Column("surgeries", sa.Integer(), server_default="0", nullable=False))
    op.add_column("workflows", sa.Column("inserted_tasks", sa.Integer(), server_default="0", nullable=False))
    op.add_column("workflows", sa.Column("task_seconds", sa.Float(), server_default="0", nullable=False))
    op.add_column("workflows", sa.Column("policy_version", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("workflows", "policy_version")
    op.drop_column("workflows", "task_seconds")
    op.drop_column("workflows", "inserted_tasks")
    op.drop_column("workflows", "surgeries")
    op.drop_table("dag_revisions")
    op.drop_index(
        "ix_correction_decisions_open", table_name="correction_decisions", postgresql_where=sa.text("outcome IS NULL")
    )
    op.drop_index("ix_correction_decisions_created", table_name="correction_decisions")
    op.drop_table("correction_decisions")
    op.drop_index("ix_policies_one_active", table_name="policies", postgresql_where=sa.text("status = 'active'"))
    op.drop_table("policies")
