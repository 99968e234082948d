"""Read-side queries for the API (and the operator): workflows, tasks, the DAG, events, executors."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.db import CHANNEL_WORKFLOWS
from controller.schema import executors, task_events, tasks, workflows
from controller.states import TaskStatus
from dagsmith.errors import Conflict, NotFound

TERMINAL = ("succeeded", "failed", "cancelled")


def parse_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no workflow has id {value!r}") from None


def progress(row: Any) -> dict[str, int]:
    counts = {s.value: getattr(row, f"n_{s.value}") for s in TaskStatus}
    return {"total": row.n_total, **counts}


def workflow_summary(row: Any) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "name": row.name,
        "namespace": row.namespace,
        "labels": row.labels,
        "status": row.status,
        "source": row.source,
        "progress": progress(row),
        "total_reward": row.total_reward,
        "dag_revision": row.dag_revision,
        "cancel_requested": row.cancel_requested,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "error": row.error,
    }


async def get_workflow(conn: AsyncConnection, workflow_id: uuid.UUID, namespaces: list[str] | None) -> Any:
    """The workflow row, if it is in one of ``namespaces`` (None: any). Required on purpose: every
    caller must say whose view this is, so no route can forget the caller's namespaces."""
    query = sa.select(workflows).where(workflows.c.id == workflow_id)
    if namespaces is not None:
        query = query.where(workflows.c.namespace.in_(namespaces))
    row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound(f"no workflow has id {workflow_id}")
    return row


def _encode_cursor(created_at: datetime, workflow_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([created_at.isoformat(), str(workflow_id)])).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, wid = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), uuid.UUID(wid)
    except Exception:
        raise ValueError("cursor is not one this API returned") from None


async def list_workflows(
    conn: AsyncConnection,
    *,
    namespaces: list[str] | None,
    status: list[str] | None,
    labels: dict[str, str],
    name: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    query = sa.select(workflows).order_by(workflows.c.created_at.desc(), workflows.c.id.desc()).limit(limit + 1)
    if namespaces is not None:
        query = query.where(workflows.c.namespace.in_(namespaces))
    if status:
        query = query.where(workflows.c.status.in_(status))
    if labels:
        query = query.where(workflows.c.labels.contains(labels))
    if name:
        query = query.where(workflows.c.name == name)
    if cursor:
        created, wid = _decode_cursor(cursor)
        query = query.where(
            sa.tuple_(workflows.c.created_at, workflows.c.id) < sa.tuple_(sa.literal(created), sa.literal(wid))
        )
    rows = list(await conn.execute(query))
    next_cursor = _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor


def task_json(row: Any, *, redact_secrets: bool = True) -> dict[str, Any]:
    secrets = set((row.spec or {}).get("secrets") or [])
    params = row.params
    resolved = row.resolved_params
    if redact_secrets and secrets:
        params = {k: ("***" if k in secrets else v) for k, v in params.items()}
        if resolved is not None:
            resolved = {k: ("***" if k in secrets else v) for k, v in resolved.items()}
    return {
        "id": row.id,
        "name": row.name,
        "type": row.type,
        "status": row.status,
        "depends_on": list(row.depends_on),
        "params": params,
        "resolved_params": resolved,
        "attempt": row.attempt,
        "retries": row.retries,
        "max_retries": row.max_retries,
        "output": row.output,
        "error": row.error,
        "reward": row.reward,
        "feedback_notes": row.feedback_notes,
        "executor_id": row.executor_id,
        "not_before": row.not_before,
        "queued_at": row.queued_at,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "inserted_by_revision": row.inserted_by_revision,
    }


# A page of tasks ends early once its params, outputs and errors pass this many bytes: 10,000
# tasks of megabyte outputs would otherwise be one response of gigabytes, built in memory.
PAGE_BYTES = 32 * 1024 * 1024


def _row_bytes(row: Any) -> int:
    return sum(len(orjson.dumps(v)) for v in (row.params, row.resolved_params, row.output, row.error) if v is not None)


async def list_tasks(
    conn: AsyncConnection,
    workflow_id: uuid.UUID,
    *,
    status: list[str] | None,
    after: int | None,
    limit: int,
    max_bytes: int = PAGE_BYTES,
) -> tuple[list[Any], int | None]:
    """Up to ``limit`` tasks after ``after``, fewer if their data passes ``max_bytes`` (at least
    one); and where the next page starts, or None. Rows are read as they come, not all at once."""
    query = sa.select(tasks).where(tasks.c.workflow_id == workflow_id).order_by(tasks.c.id).limit(limit + 1)
    if status:
        query = query.where(tasks.c.status.in_(status))
    if after is not None:
        query = query.where(tasks.c.id > after)
    rows: list[Any] = []
    size = 0
    more = False
    result = await conn.stream(query.execution_options(yield_per=100))
    try:
        async for row in result:
            weight = _row_bytes(row)
            if len(rows) == limit or (rows and size + weight > max_bytes):
                more = True
                break
            rows.append(row)
            size += weight
    finally:
        await result.close()
    return rows, (rows[-1].id if more else None)


async def dag_rows(conn: AsyncConnection, workflow_id: uuid.UUID) -> list[Any]:
    query = (
        sa.select(
            tasks.c.id,
            tasks.c.name,
            tasks.c.type,
            tasks.c.status,
            tasks.c.reward,
            tasks.c.attempt,
            tasks.c.depends_on,
            tasks.c.inserted_by_revision,
            tasks.c.spec["type"].astext.label("spec_type"),
        )
        .where(tasks.c.workflow_id == workflow_id)
        .order_by(tasks.c.id)
    )
    return list(await conn.execute(query))


async def events_after(conn: AsyncConnection, workflow_id: uuid.UUID, after: int, limit: int = 1000) -> list[Any]:
    query = (
        sa.select(task_events)
        .where(task_events.c.workflow_id == workflow_id, task_events.c.id > after)
        .order_by(task_events.c.id)
        .limit(limit)
    )
    return list(await conn.execute(query))


def event_json(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "workflow_id": str(row.workflow_id),
        "task_id": row.task_id,
        "task": row.task_name,
        "attempt": row.attempt,
        "from": row.from_status,
        "to": row.to_status,
        "reason": row.reason,
        "data": row.data,
        "at": row.at.isoformat(),
    }


async def request_cancel(conn: AsyncConnection, workflow_id: uuid.UUID, namespaces: list[str] | None) -> Any:
    row = await get_workflow(conn, workflow_id, namespaces)
    if row.status in TERMINAL:
        raise Conflict(f"workflow {workflow_id} already {row.status}")
    await conn.execute(
        sa.update(workflows)
        .where(workflows.c.id == workflow_id)
        .values(cancel_requested=True, updated_at=sa.func.now())
    )
    await conn.execute(sa.select(sa.func.pg_notify(CHANNEL_WORKFLOWS, str(workflow_id))))
    return row


async def unserved_types(conn: AsyncConnection, workflow_id: uuid.UUID, alive_window: float) -> list[str]:
    """Types of the workflow's queued tasks that no live executor declares: why they wait."""
    rows = await conn.execute(
        sa.text(
            """
            WITH queued AS (SELECT DISTINCT type FROM tasks WHERE workflow_id = :w AND status = 'queued')
            SELECT q.type FROM queued q
            WHERE NOT EXISTS (
                SELECT 1 FROM executors e
                WHERE NOT e.stopping AND e.last_heartbeat > now() - make_interval(secs => :window)
                  AND e.capabilities @> jsonb_build_array(jsonb_build_object('type', q.type))
            )
            ORDER BY q.type
            """
        ),
        {"w": workflow_id, "window": alive_window},
    )
    return [r[0] for r in rows]


async def list_executors(conn: AsyncConnection, alive_window: float) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(
            executors,
            (executors.c.last_heartbeat > sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, alive_window)).label(
                "alive"
            ),
        ).order_by(executors.c.last_heartbeat.desc())
    )
    return [
        {
            "id": r.id,
            "capabilities": r.capabilities,
            "types": [c["type"] for c in r.capabilities],
            "version": r.version,
            "hostname": r.hostname,
            "pid": r.pid,
            "concurrency": r.concurrency,
            "running": r.running,
            "stopping": r.stopping,
            "alive": bool(r.alive) and not r.stopping,
            "first_seen": r.first_seen,
            "last_heartbeat": r.last_heartbeat,
        }
        for r in rows
    ]
