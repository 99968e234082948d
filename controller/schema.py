"""Tables, as SQLAlchemy Core metadata. Alembic migrations create them; queries import them.

Invariants the database keeps by itself:
- ``workflows.n_<status>`` always equal the number of the workflow's tasks in that status
  (a statement-level trigger over transition tables; see migration 0001).
- ``(namespace, idempotency_key)`` is unique, so a re-delivered submission creates nothing twice.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

TASK_STATUSES = ("pending", "queued", "running", "succeeded", "failed", "skipped", "cancelled")
WORKFLOW_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")


def _ts(name: str, **kw: object) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), **kw)  # type: ignore[arg-type]


workflows = sa.Table(
    "workflows",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False, server_default="default"),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("labels", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("spec", JSONB, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="pending"),
    sa.Column("idempotency_key", sa.Text),
    sa.Column("source", sa.Text, nullable=False, server_default="api"),
    sa.Column("total_reward", sa.Float, nullable=False, server_default="0"),
    sa.Column("dag_revision", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("output", JSONB),
    sa.Column("error", JSONB),
    _ts("created_at", nullable=False, server_default=sa.func.now()),
    _ts("started_at"),
    _ts("finished_at"),
    _ts("updated_at", nullable=False, server_default=sa.func.now()),
    # Correction Mode: surgeries applied, tasks inserted by them, run time spent, and the policy
    # version that last decided for this workflow.
    sa.Column("surgeries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("inserted_tasks", sa.Integer, nullable=False, server_default="0"),
    sa.Column("task_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("policy_version", sa.Text),
    sa.Column("n_total", sa.Integer, nullable=False, server_default="0"),
    *[sa.Column(f"n_{s}", sa.Integer, nullable=False, server_default="0") for s in TASK_STATUSES],
    sa.CheckConstraint(f"status IN {WORKFLOW_STATUSES!r}", name="status"),
    sa.CheckConstraint("source IN ('api', 'kubernetes')", name="source"),
    sa.UniqueConstraint("namespace", "idempotency_key"),
    sa.Index("ix_workflows_listing", "namespace", sa.text("created_at DESC"), "id"),
    sa.Index(
        "ix_workflows_active",
        "status",
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    ),
    sa.Index("ix_workflows_labels", "labels", postgresql_using="gin"),
    sa.Index(
        "ix_workflows_finished",
        "finished_at",
        postgresql_where=sa.text("status IN ('succeeded', 'failed', 'cancelled')"),
    ),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("workflow_id", UUID(as_uuid=True), sa.ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("spec", JSONB, nullable=False),  # the task's spec as submitted (retry, expect, ...)
    sa.Column("params", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("resolved_params", JSONB),
    sa.Column("depends_on", ARRAY(sa.Text), nullable=False, server_default="{}"),
    sa.Column("children", ARRAY(sa.BigInteger), nullable=False, server_default="{}"),
    sa.Column("refs", ARRAY(sa.Text), nullable=False, server_default="{}"),
    # How many dependencies have not succeeded (or been skipped) yet; 0 means ready.
    sa.Column("waiting_on", sa.Integer, nullable=False, server_default="0"),
    sa.Column("status", sa.Text, nullable=False, server_default="pending"),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("timeout_s", sa.Float),
    _ts("not_before"),
    _ts("lease_expires_at"),
    _ts("queue_deadline"),  # queued and not started by then: the attempt fails (spec queueTimeout)
    sa.Column("executor_id", sa.Text),
    # The broker's delivery count of the message the running attempt started from: a dead-lettered
    # message whose last delivery started is poison; one whose last delivery never did was only
    # returned by dropped connections (see controller.reconcile.judge_dead_letter).
    sa.Column("started_delivery", sa.Integer),
    sa.Column("started_series", sa.Integer),  # the message series that delivery count belongs to
    sa.Column("output", JSONB),
    sa.Column("error", JSONB),
    sa.Column("reward", sa.Float),
    sa.Column("feedback_notes", JSONB),
    _ts("queued_at"),
    _ts("started_at"),
    _ts("finished_at"),
    sa.Column("inserted_by_revision", sa.Integer),
    sa.CheckConstraint(f"status IN {TASK_STATUSES!r}", name="status"),
    sa.UniqueConstraint("workflow_id", "name"),
    # Ready-but-undispatched tasks (roots at start, successors, retries in backoff): small.
    sa.Index(
        "ix_tasks_ready",
        "workflow_id",
        "not_before",
        postgresql_where=sa.text("status = 'pending' AND waiting_on = 0"),
    ),
    sa.Index("ix_tasks_lease", "lease_expires_at", postgresql_where=sa.text("status = 'running'")),
    sa.Index("ix_tasks_queue_deadline", "queue_deadline", postgresql_where=sa.text("status = 'queued'")),
)

task_events = sa.Table(
    "task_events",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("workflow_id", UUID(as_uuid=True), sa.ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
    sa.Column("task_id", sa.BigInteger),
    sa.Column("task_name", sa.Text),
    sa.Column("attempt", sa.Integer),
    sa.Column("from_status", sa.Text),
    sa.Column("to_status", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("data", JSONB),
    _ts("at", nullable=False, server_default=sa.func.now()),
    sa.Index("ix_task_events_workflow", "workflow_id", "id"),
)

executors = sa.Table(
    "executors",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("capabilities", JSONB, nullable=False),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("hostname", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("running", sa.Integer, nullable=False, server_default="0"),
    sa.Column("stopping", sa.Boolean, nullable=False, server_default=sa.false()),
    _ts("first_seen", nullable=False, server_default=sa.func.now()),
    _ts("last_heartbeat", nullable=False, server_default=sa.func.now()),
)

# Task types any executor has ever declared (kept after executors go away, for spec warnings).
task_types = sa.Table(
    "task_types",
    metadata,
    sa.Column("type", sa.Text, primary_key=True),
    sa.Column("capability", JSONB, nullable=False),
    _ts("last_seen", nullable=False, server_default=sa.func.now()),
)

# API tokens: only a SHA-256 of each token is stored (tokens are 32 random bytes, so a fast hash is
# enough; nothing to brute-force). The token itself is shown once, when it is created.
api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("token_hash", sa.Text, nullable=False, unique=True),
    sa.Column("prefix", sa.Text, nullable=False),  # the first characters, to recognise a token
    sa.Column("scopes", ARRAY(sa.Text), nullable=False),
    sa.Column("namespaces", ARRAY(sa.Text), nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    _ts("created_at", nullable=False, server_default=sa.func.now()),
    _ts("expires_at"),
    _ts("last_used_at"),
    _ts("revoked_at"),
)

# One row per DAG surgery: the workflow's history, replayable revision by revision.
dag_revisions = sa.Table(
    "dag_revisions",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("workflow_id", UUID(as_uuid=True), sa.ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("parent_revision", sa.Integer, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),  # policy:<version> | rules | user:<name>
    sa.Column("operation", sa.Text, nullable=False),
    sa.Column("task_name", sa.Text, nullable=False),
    sa.Column("reason", JSONB, nullable=False),
    sa.Column("diff", JSONB, nullable=False),
    _ts("created_at", nullable=False, server_default=sa.func.now()),
    sa.UniqueConstraint("workflow_id", "revision"),
)

# Every correction decision, logged when it is made (with what the learning loop needs: the
# observation, the mask, the full action distribution) and completed when its outcome is known.
correction_decisions = sa.Table(
    "correction_decisions",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    # NULL once its workflow is deleted (retention): the decision stays as training data.
    sa.Column("workflow_id", UUID(as_uuid=True), sa.ForeignKey("workflows.id", ondelete="SET NULL"), index=True),
    sa.Column("task_id", sa.BigInteger, nullable=False),
    sa.Column("task_name", sa.Text, nullable=False),
    sa.Column("task_type", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("error_class", sa.Text, nullable=False),
    sa.Column("mode", sa.Text, nullable=False),
    sa.Column("policy_version", sa.Text, nullable=False),
    sa.Column("feature_schema_version", sa.Integer, nullable=False),
    sa.Column("features", JSONB, nullable=False),
    sa.Column("observation", ARRAY(sa.Float), nullable=False),
    sa.Column("mask", ARRAY(sa.Boolean), nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("probabilities", ARRAY(sa.Float), nullable=False),  # the policy's own distribution
    # What the controller acted from (exploration mixed in; NULL: the action, with certainty).
    sa.Column("behaviour", ARRAY(sa.Float)),
    sa.Column("explored", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("fallback_reason", sa.Text),
    sa.Column("shadow_action", sa.Text),  # shadow mode: what the learned policy would have done
    sa.Column("shadow_policy_version", sa.Text),
    sa.Column("shadow_probabilities", ARRAY(sa.Float)),
    sa.Column("revision", sa.Integer),
    sa.Column("outcome", JSONB),
    _ts("created_at", nullable=False, server_default=sa.func.now()),
    _ts("outcome_at"),
    sa.Index("ix_correction_decisions_open", "task_id", postgresql_where=sa.text("outcome IS NULL")),
    sa.Index("ix_correction_decisions_open_workflow", "workflow_id", postgresql_where=sa.text("outcome IS NULL")),
    sa.Index("ix_correction_decisions_created", "created_at"),
    sa.Index("ix_correction_decisions_task_id", "task_id"),
)

# The policy registry: every trained version, its evaluation, and which one is active.
policies = sa.Table(
    "policies",
    metadata,
    sa.Column("version", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),  # candidate | active | retired | rejected
    sa.Column("weights", sa.LargeBinary, nullable=False),
    sa.Column("feature_schema_version", sa.Integer, nullable=False),
    sa.Column("reward_version", sa.Text, nullable=False),
    sa.Column("training", JSONB, nullable=False),
    sa.Column("evaluation", JSONB, nullable=False),
    _ts("created_at", nullable=False, server_default=sa.func.now()),
    _ts("activated_at"),
    _ts("retired_at"),
    sa.CheckConstraint("status IN ('candidate', 'active', 'retired', 'rejected')", name="status"),
    sa.Index("ix_policies_one_active", "status", unique=True, postgresql_where=sa.text("status = 'active'")),
)

# Every activation, in order: a rollback undoes the latest one still standing and brings back the
# version of the one before it, so successive rollbacks walk back through the history.
policy_activations = sa.Table(
    "policy_activations",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("version", sa.Text, sa.ForeignKey("policies.version", ondelete="CASCADE"), nullable=False),
    sa.Column("undone", sa.Boolean, nullable=False, server_default=sa.false()),
    _ts("activated_at", nullable=False, server_default=sa.func.now()),
    _ts("undone_at"),
    sa.Index("ix_policy_activations_live", "id", postgresql_where=sa.text("NOT undone")),
)
