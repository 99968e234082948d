"""Persisting a validated workflow: one transaction, idempotent per (namespace, key)."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.db import CHANNEL_WORKFLOWS
from controller.schema import workflows
from dagsmith.errors import Conflict
from dagsmith.validation import ValidatedWorkflow

_INSERT_TASKS = sa.text(
    """
    INSERT INTO tasks (id, workflow_id, name, type, spec, params, depends_on, children, refs,
                       waiting_on, max_retries, timeout_s)
    SELECT v.id, :workflow_id, v.name, v.type, v.spec, v.params, CAST(v.depends_on AS text[]),
           CAST(v.children AS bigint[]), CAST(v.refs AS text[]), v.waiting_on, v.max_retries, v.timeout_s
    FROM unnest(CAST(:ids AS bigint[]), CAST(:names AS text[]), CAST(:types AS text[]),
                CAST(:specs AS jsonb[]), CAST(:params AS jsonb[]), CAST(:depends_on AS text[]),
                CAST(:children AS text[]), CAST(:refs AS text[]), CAST(:waiting_on AS int[]),
                CAST(:max_retries AS int[]), CAST(:timeouts AS float8[]))
         AS v(id, name, type, spec, params, depends_on, children, refs, waiting_on, max_retries, timeout_s)
    """
)
# Postgres has no ragged arrays of arrays, so each task's array columns travel as a text literal
# and are cast per row.


@dataclass(frozen=True)
class Submitted:
    id: uuid.UUID
    created: bool
    status: str


def spec_digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _pg_array(items: list[Any]) -> str:
    """A Postgres array literal for text or integer items."""
    if not items:
        return "{}"
    out = []
    for item in items:
        if isinstance(item, int):
            out.append(str(item))
        else:
            out.append('"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(out) + "}"


async def submit(
    conn: AsyncConnection,
    workflow: ValidatedWorkflow,
    *,
    namespace: str,
    idempotency_key: str | None = None,
    source: str = "api",
    chunk: int = 10_000,
) -> Submitted:
    """Insert the workflow and its tasks, or return the existing one for a repeated key.

    A repeated key with a *different* document raises Conflict: the caller most likely reused a key
    by mistake, and silently returning the old workflow would hide that.
    """
    doc = workflow.document
    stored = doc.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"status"})
    stored["metadata"]["namespace"] = namespace
    digest = spec_digest(stored)
    workflow_id = uuid.uuid4()
    insert = (
        sa.dialects.postgresql.insert(workflows)
        .values(
            id=workflow_id,
            namespace=namespace,
            name=doc.metadata.name,
            labels=doc.metadata.labels,
            spec=stored,
            idempotency_key=idempotency_key,
            source=source,
            status="pending",
        )
        .on_conflict_do_nothing(index_elements=["namespace", "idempotency_key"])
        .returning(workflows.c.id)
    )
    row = (await conn.execute(insert)).first()
    if row is None:
        existing = (
            await conn.execute(
                sa.select(workflows.c.id, workflows.c.status, workflows.c.spec).where(
                    workflows.c.namespace == namespace, workflows.c.idempotency_key == idempotency_key
                )
            )
        ).one()
        if spec_digest(existing.spec) != digest:
            raise Conflict(
                f"Idempotency-Key {idempotency_key!r} was already used for workflow {existing.id} "
                "with a different document"
            )
        return Submitted(existing.id, False, existing.status)

    tasks = workflow.tasks
    ids = [
        r[0]
        for r in await conn.execute(
            sa.text("SELECT nextval(pg_get_serial_sequence('tasks', 'id')) FROM generate_series(1, :n)"),
            {"n": len(tasks)},
        )
    ]
    id_of = {t.name: i for t, i in zip(tasks, ids, strict=True)}
    for start in range(0, len(tasks), chunk):
        part = tasks[start : start + chunk]
        await conn.execute(
            _INSERT_TASKS,
            {
                "workflow_id": workflow_id,
                "ids": ids[start : start + chunk],
                "names": [t.name for t in part],
                "types": [t.type for t in part],
                "specs": [
                    orjson.dumps(t.model_dump(mode="json", by_alias=True, exclude_unset=True)).decode() for t in part
                ],
                "params": [orjson.dumps(t.params).decode() for t in part],
                "depends_on": [_pg_array(t.depends_on) for t in part],
                "children": [_pg_array([id_of[c] for c in workflow.children[t.name]]) for t in part],
                "refs": [_pg_array(sorted(workflow.refs.get(t.name, ()))) for t in part],
                "waiting_on": [len(set(t.depends_on)) for t in part],
                "max_retries": [t.retry.limit for t in part],
                "timeouts": [t.timeout for t in part],
            },
        )
    await conn.execute(
        sa.text(
            "INSERT INTO task_events (workflow_id, to_status, reason, data) "
            "VALUES (:w, 'pending', 'submitted', CAST(:data AS jsonb))"
        ),
        {"w": workflow_id, "data": orjson.dumps({"tasks": len(tasks), "source": source}).decode()},
    )
    await conn.execute(sa.select(sa.func.pg_notify(CHANNEL_WORKFLOWS, str(workflow_id))))
    return Submitted(workflow_id, True, "pending")
