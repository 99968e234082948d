"""initial schema: workflows, tasks, task events, the executor registry

The task counters on ``workflows`` are kept by statement-level triggers over transition tables,
so every code path that changes a task (controller, API, surgery) keeps them right, and a batch
update of N tasks costs one aggregate update per workflow, not N.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 07:35:21.440913
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "executors",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("capabilities", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("running", sa.Integer(), server_default="0", nullable=False),
        sa.Column("stopping", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_executors")),
    )
    op.create_table(
        "task_types",
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("capability", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("type", name=op.f("pk_task_types")),
    )
    op.create_table(
        "workflows",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("namespace", sa.Text(), server_default="default", nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("spec", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("source", sa.Text(), server_default="api", nullable=False),
        sa.Column("total_reward", sa.Float(), server_default="0", nullable=False),
        sa.Column("dag_revision", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("output", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("n_total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("n_pending", sa.Integer(), server_default="0", nullable=False),
        sa.Column("n_queued", sa.Integer(), server_default="0", nullable=False),
        sa.Column("n_running", sa.Integer(), server_default="0", nullable=False),
        sa.Column("n_succeeded", sa.Integer(), server_default="0", nullable=False),
        sa.Column("n_failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("n_skipped", sa.Integer(), server_default="0", nullable=False),
        sa.Column("n_cancelled", sa.Integer(), server_default="0", nullable=False),
        sa.CheckConstraint("source IN ('api', 'kubernetes')", name=op.f("ck_workflows_source")),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')",
            name=op.f("ck_workflows_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflows")),
        sa.UniqueConstraint("namespace", "idempotency_key", name=op.f("uq_workflows_namespace_idempotency_key")),
    )
    op.create_index(
        "ix_workflows_active",
        "workflows",
        ["status"],
        unique=False,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.create_index("ix_workflows_labels", "workflows", ["labels"], unique=False, postgresql_using="gin")
    op.create_index(
        "ix_workflows_listing",
        "workflows",
        ["namespace", sa.literal_column("created_at DESC"), "id"],
        unique=False,
    )
    op.create_table(
        "task_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workflow_id", sa.UUID(), nullable=False),
        sa.Column("task_id", sa.BigInteger(), nullable=True),
        sa.Column("task_name", sa.Text(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("from_status", sa.Text(), nullable=True),
        sa.Column("to_status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_task_events_workflow_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_events")),
    )
    op.create_index("ix_task_events_workflow", "task_events", ["workflow_id", "id"], unique=False)
    op.create_table(
        "tasks",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workflow_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("spec", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "params",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("resolved_params", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("depends_on", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("children", postgresql.ARRAY(sa.BigInteger()), server_default="{}", nullable=False),
        sa.Column("refs", postgresql.ARRAY(sa.Text()), server_default="{}", nullable=False),
        sa.Column("waiting_on", sa.Integer(), server_default="0", nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("retries", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_retries", sa.Integer(), server_default="0", nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("executor_id", sa.Text(), nullable=True),
        sa.Column("output", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("error", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("feedback_notes", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("inserted_by_revision", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'skipped', 'cancelled')",
            name=op.f("ck_tasks_status"),
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"], ["workflows.id"], name=op.f("fk_tasks_workflow_id"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("workflow_id", "name", name=op.f("uq_tasks_workflow_id_name")),
    )
    op.create_index(
        "ix_tasks_lease",
        "tasks",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_index(
        "ix_tasks_ready",
        "tasks",
        ["workflow_id", "not_before"],
        unique=False,
        postgresql_where=sa.text("status = 'pending' AND waiting_on = 0"),
    )
    op.execute(COUNTERS_FUNCTION)
    for event, tables in (
        ("INSERT", "NEW TABLE AS new_rows"),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
        ("DELETE", "OLD TABLE AS old_rows"),
    ):
        op.execute(
            f"CREATE TRIGGER tasks_counters_{event.lower()} AFTER {event} ON tasks "
            f"REFERENCING {tables} FOR EACH STATEMENT EXECUTE FUNCTION dagsmith_task_counters_{event.lower()}()"
        )


def downgrade() -> None:
    for event in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS tasks_counters_{event} ON tasks")
        op.execute(f"DROP FUNCTION IF EXISTS dagsmith_task_counters_{event}()")
    op.drop_index(
        "ix_tasks_ready",
        table_name="tasks",
        postgresql_where=sa.text("status = 'pending' AND waiting_on = 0"),
    )
    op.drop_index("ix_tasks_lease", table_name="tasks", postgresql_where=sa.text("status = 'running'"))
    op.drop_table("tasks")
    op.drop_index("ix_task_events_workflow", table_name="task_events")
    op.drop_table("task_events")
    op.drop_index("ix_workflows_listing", table_name="workflows")
    op.drop_index("ix_workflows_labels", table_name="workflows", postgresql_using="gin")
    op.drop_index(
        "ix_workflows_active",
        table_name="workflows",
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.drop_table("workflows")
    op.drop_table("task_types")
    op.drop_table("executors")


_STATUSES = ("pending", "queued", "running", "succeeded", "failed", "skipped", "cancelled")


def _counters_function(event: str, delta_sql: str) -> str:
    sums = ",\n        ".join(f"coalesce(sum(d) FILTER (WHERE status = '{s}'), 0) AS {s}" for s in _STATUSES)
    sets = ",\n        ".join(f"n_{s} = w.n_{s} + c.{s}" for s in _STATUSES)
    total = " + ".join(f"c.{s}" for s in _STATUSES)
    nonzero = " OR ".join(f"c.{s} <> 0" for s in _STATUSES)
    return f"""
CREATE FUNCTION dagsmith_task_counters_{event}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH delta AS ({delta_sql}),
    c AS (
        SELECT workflow_id,
        {sums}
        FROM delta GROUP BY workflow_id
    )
    UPDATE workflows w SET
        {sets},
        n_total = w.n_total + {total}
    FROM c
    WHERE w.id = c.workflow_id AND ({nonzero});
    RETURN NULL;
END $$;
"""


COUNTERS_FUNCTION = "\n".join(
    [
        _counters_function("insert", "SELECT workflow_id, status, 1 AS d FROM new_rows"),
        _counters_function(
            "update",
            "SELECT workflow_id, status, -1 AS d FROM old_rows UNION ALL "
            "SELECT workflow_id, status, 1 AS d FROM new_rows",
        ),
        _counters_function("delete", "SELECT workflow_id, status, -1 AS d FROM old_rows"),
    ]
)
