"""Deleting finished workflows: one at a time (``DELETE /v1/workflows/{id}``), by age (``dagsmith
prune``), or on a schedule (the controller, with ``DAGSMITH_RETENTION`` set).

Only finished workflows go: a pending or running one must be cancelled first, and a failed or
cancelled one stays at least a day (ENDED_MEMORY). A workflow's tasks,
events and DAG revisions go with it (the foreign keys cascade). Its correction decisions stay:
they are the learning loop's training data and hold everything the trainer reads, so they only
lose their link to the workflow (``workflow_id`` becomes NULL, migration 0008).

Deleting frees the workflow's idempotency key: a later submission with the same key creates a
new workflow.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.queries import TERMINAL, get_workflow
from controller.schema import workflows
from dagsmith.errors import Conflict, NotFound

DEFAULT_BATCH = 100  # workflows per transaction at most
BATCH_TASKS = 20_000  # and tasks (unless one workflow alone has more): a batch's cascade stays short
# A failed or cancelled workflow is kept this long after it ends, whatever the age asked for:
# executors that connect are told about the workflows that ended in that time (so they drop
# their queued tasks; controller.service.CANCELLATION_MEMORY), which a deleted one would not be.
ENDED_MEMORY = 86_400.0


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted (or, for a dry run, would delete)."""

    workflows: int
    tasks: int
    oldest: datetime | None  # when the oldest of them finished
    more: bool = False  # a batch that stopped at its size: there may be more to delete


def _deletable(cutoff: datetime, namespaces: list[str] | None, statuses: tuple[str, ...]) -> sa.ColumnElement[bool]:
    """Finished before ``cutoff``; failed and cancelled ones also at least ENDED_MEMORY ago."""
    unknown = set(statuses) - set(TERMINAL)
    if unknown:
        raise ValueError(f"only finished workflows can be deleted, not {sorted(unknown)}")
    remembered = sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, ENDED_MEMORY)
    condition = sa.and_(
        workflows.c.status.in_(statuses),
        workflows.c.finished_at < cutoff,
        sa.or_(workflows.c.status == "succeeded", workflows.c.finished_at < remembered),
    )
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
    ).where(_deletable(cutoff, namespaces, statuses))
    count, total, oldest = (await conn.execute(query)).one()
    return Pruned(int(count), int(total), oldest)


async def prune_batch(
    conn: AsyncConnection,
    cutoff: datetime,
    *,
    namespaces: list[str] | None = None,
    statuses: tuple[str, ...] = TERMINAL,
    batch: int = DEFAULT_BATCH,
    batch_tasks: int = BATCH_TASKS,
) -> Pruned:
    """Delete, oldest first and in the caller's transaction, up to ``batch`` workflows that
    finished before ``cutoff`` and hold ``batch_tasks`` tasks together (always at least one).
    Rows another transaction holds are passed over (SKIP LOCKED): a prune never waits on a
    workflow a controller or another prune is working on."""
    candidates = (
        await conn.execute(
            sa.select(workflows.c.id, workflows.c.n_total, workflows.c.finished_at)
            .where(_deletable(cutoff, namespaces, statuses))
            .order_by(workflows.c.finished_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
    ).all()
    chosen: list[Any] = []
    tasks = 0
    for row in candidates:
        if chosen and tasks + row.n_total > batch_tasks:
            break
        chosen.append(row)
        tasks += row.n_total
    if chosen:
        await conn.execute(sa.delete(workflows).where(workflows.c.id.in_([r.id for r in chosen])))
    return Pruned(
        len(chosen),
        tasks,
        min((r.finished_at for r in chosen), default=None),
        more=len(candidates) == batch or len(chosen) < len(candidates),
    )


async def delete_workflow(conn: AsyncConnection, workflow_id: uuid.UUID, namespaces: list[str] | None) -> None:
    """Delete one finished workflow the caller can see (NotFound otherwise, as for reads)."""
    await get_workflow(conn, workflow_id, namespaces)  # 404 for workflows the caller cannot see
    # Locked before it is judged: a surgery may be bringing it back to life right now, and a
    # running workflow must never be deleted.
    row = (await conn.execute(sa.select(workflows).where(workflows.c.id == workflow_id).with_for_update())).first()
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id}")
    if row.status not in TERMINAL:
        raise Conflict(f"workflow {workflow_id} is {row.status}: cancel it first, then delete it")
    if row.source == "kubernetes":
        raise Conflict(
            f"workflow {workflow_id} belongs to the Workflow resource {row.namespace}/{row.name}: deleting that "
            "(kubectl delete) cancels it; its stored copy goes with `dagsmith prune` or DAGSMITH_RETENTION"
        )
    if row.status != "succeeded" and row.finished_at > datetime.now(UTC) - timedelta(seconds=ENDED_MEMORY):
        raise Conflict(
            f"workflow {workflow_id} {row.status} less than a day ago: executors that connect in that time are "
            "told about it (so they drop its queued tasks) as long as it exists; delete it after "
            f"{(row.finished_at + timedelta(seconds=ENDED_MEMORY)):%Y-%m-%d %H:%M} UTC"
        )
    await conn.execute(sa.delete(workflows).where(workflows.c.id == workflow_id))


def cutoff_for(age: float, now: datetime) -> datetime:
    """The finish time before which a workflow is ``age`` seconds old or more."""
    return now - timedelta(seconds=age)
