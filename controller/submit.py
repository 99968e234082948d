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
from dagsmith.validation import ValidatedWorkflow, bulk

_INSERT_TASKS = sa.text(
    """
    INSERT INTO tasks (id, workflow_id, name, type, spec, params, depends_on, children, refs,
                       waiting_on, max_retries, timeout_s)
    SELECT v.id, :workflow_id, v.name, v.type, v.spec, v.params,
           ARRAY(SELECT jsonb_array_elements_text(v.depends_on)),
           ARRAY(SELECT jsonb_array_elements_text(v.children)::bigint),
           ARRAY(SELECT jsonb_array_elements_text(v.refs)),
           v.waiting_on, v.max_retries, v.timeout_s
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
         AS v(id bigint, name text, type text, spec jsonb, params jsonb, depends_on jsonb, children jsonb,
              refs jsonb, waiting_on int, max_retries int, timeout_s float8)
    """
)
# One JSON document per chunk: orjson encodes it in one pass and Postgres parses it in C, much
# cheaper than binding eleven Python lists of 10,000 items element by element.


@dataclass(frozen=True)
class Submitted:
    id: uuid.UUID
    created: bool
    status: str


def spec_digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


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
        with bulk():
            body = _rows_json(tasks[start : start + chunk], ids[start : start + chunk], id_of, workflow)
        await conn.execute(_INSERT_TASKS, {"workflow_id": workflow_id, "rows": body})
    await conn.execute(
        sa.text(
            "INSERT INTO task_events (workflow_id, to_status, reason, data) "
            "VALUES (:w, 'pending', 'submitted', CAST(:data AS jsonb))"
        ),
        {"w": workflow_id, "data": orjson.dumps({"tasks": len(tasks), "source": source}).decode()},
    )
    await conn.execute(sa.select(sa.func.pg_notify(CHANNEL_WORKFLOWS, str(workflow_id))))
    return Submitted(workflow_id, True, "pending")


def _rows_json(part: list[Any], ids: list[int], id_of: dict[str, int], workflow: ValidatedWorkflow) -> str:
    return orjson.dumps(
        [
            {
                "id": task_id,
                "name": t.name,
                "type": t.type,
                "spec": t.model_dump(mode="json", by_alias=True, exclude_unset=True),
                "params": t.params,
                "depends_on": t.depends_on,
                "children": [id_of[c] for c in workflow.children[t.name]],
                "refs": sorted(workflow.refs.get(t.name, ())),
                "waiting_on": len(set(t.depends_on)),
                "max_retries": t.retry.limit,
                "timeout_s": t.timeout,
            }
            for t, task_id in zip(part, ids, strict=True)
        ]
    ).decode()
