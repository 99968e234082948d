"""Deleting finished workflows: one at a time (``DELETE /v1/workflows/{id}``), by age (``dagsmith
prune``), or on a schedule (the controller, with ``DAGSMITH_RETENTION`` set).

Only finished workflows go: a pending or running one must be cancelled first. A workflow's tasks,
events and DAG revisions go with it (the foreign keys cascade). Its correction decisions stay:
they are the learning loop's training data and hold everything the trainer reads, so they only
lose their link to the workflow (``workflow_id`` becomes NULL, migration 0008).

Deleting frees the workflow's idempotency key: a later submission with the same key creates a
new workflow.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.queries import TERMINAL, get_workflow
from controller.schema import workflows
from dagsmith.errors import Conflict

DEFAULT_BATCH = 100  # workflows per transaction: a batch's locks and cascade stay short


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted (or, for a dry run, would delete)."""

    workflows: int
    tasks: int
    oldest: datetime | None  # when the oldest of them finished


def _finished_before(
    cutoff: datetime, namespaces: list[str] | None, statuses: tuple[str, ...]
) -> sa.ColumnElement[bool]:
    unknown = set(statuses) - set(TERMINAL)
    if unknown:
        raise ValueError(f"only finished workflows can be deleted, not {sorted(unknown)}")
    condition = sa.and_(workflows.c.status.in_(statuses), workflows.c.finished_at < cutoff)
    if namespaces is not None:
        condition = sa.and_(condition, workflows.c.namespace.in_(namespaces))
    return condition


async def count_prunable(
    conn: AsyncConnection,
    cutoff: datetime,
    *,
    namespaces: list[str] | None = None,
    statuses: tuple[str, ...] = TERMINAL,
) -> Pruned:
    """What :func:`prune_batch` would delete, all batches together (a dry run)."""
    query = sa.select(
        sa.func.count(), sa.func.coalesce(sa.func.sum(workflows.c.n_total), 0), sa.func.min(workflows.c.finished_at)
    ).where(_finished_before(cutoff, namespaces, statuses))
    count, total, oldest = (await conn.execute(query)).one()
    return Pruned(int(count), int(total), oldest)


async def prune_batch(
    conn: AsyncConnection,
    cutoff: datetime,
    *,
    namespaces: list[str] | None = None,
    statuses: tuple[str, ...] = TERMINAL,
    batch: int = DEFAULT_BATCH,
) -> Pruned:
    """Delete up to ``batch`` workflows that finished before ``cutoff``, oldest first, in the
    caller's transaction. Rows another transaction holds are passed over (SKIP LOCKED), so two
    controllers pruning at once never wait on each other. Returns what went; fewer than ``batch``
    means nothing older is left (or only locked rows)."""
    doomed = (
        sa.select(workflows.c.id)
        .where(_finished_before(cutoff, namespaces, statuses))
        .order_by(workflows.c.finished_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
        .cte("doomed")
    )
    deleted = (
        sa.delete(workflows)
        .where(workflows.c.id.in_(sa.select(doomed.c.id)))
        .returning(workflows.c.n_total, workflows.c.finished_at)
    )
    rows = (await conn.execute(deleted)).all()
    return Pruned(len(rows), sum(r.n_total for r in rows), min((r.finished_at for r in rows), default=None))


async def delete_workflow(conn: AsyncConnection, workflow_id: uuid.UUID, namespaces: list[str] | None) -> None:
    """Delete one finished workflow the caller can see (NotFound otherwise, as for reads)."""
    row = await get_workflow(conn, workflow_id, namespaces)
    if row.status not in TERMINAL:
        raise Conflict(f"workflow {workflow_id} is {row.status}: cancel it first, then delete it")
    if row.source == "kubernetes":
        raise Conflict(
            f"workflow {workflow_id} belongs to the Workflow resource {row.namespace}/{row.name}: "
            "delete that with kubectl (retention removes the stored copy later)"
        )
    await conn.execute(sa.delete(workflows).where(workflows.c.id == workflow_id))


def cutoff_for(age: float, now: datetime) -> datetime:
    """The finish time before which a workflow is ``age`` seconds old or more."""
    return now - timedelta(seconds=age)
