"""Against Postgres: manual surgery keeps the limits a submission obeys; services wait for the database."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from controller import revisions
from controller.submit import submit
from controller.surgery import SurgeryConflict
from dagsmith.validation import validate


async def test_an_insert_cannot_grow_a_workflow_past_the_task_limit(db: AsyncEngine) -> None:
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "full"},
        # No executor runs a's type, so b stays pending (operable) even if a controller is running.
        "spec": {"tasks": [{"name": "a", "type": "test.nobody"}, {"name": "b", "type": "noop", "dependsOn": ["a"]}]},
    }
    async with db.begin() as conn:
        wid = (await submit(conn, validate(doc), namespace="default", idempotency_key=None, source="api")).id

    async def insert_before_b(max_tasks: int) -> revisions.Applied:
        async with db.begin() as conn:
            return await revisions.manual(
                conn,
                wid,
                operation="insert",
                task_name="b",
                actor="user:test",
                namespaces=None,
                now=time.time(),
                new_type="noop",
                max_tasks=max_tasks,
            )

    with pytest.raises(SurgeryConflict, match="has 2 tasks, the most one may have \\(DAGSMITH_MAX_TASKS\\)"):
        await insert_before_b(2)
    applied = await insert_before_b(3)  # one more fits under a limit of 3
    assert applied.revision == 1


async def test_a_service_waits_for_postgres_until_it_answers_or_it_is_stopped(db: AsyncEngine) -> None:
    import asyncio

    from controller.db import create_engine, wait_for_database
    from tests.support.stack import free_port

    stop = asyncio.Event()
    assert await wait_for_database(db, stop, service="test") is True
    nowhere = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x", pool_size=1)
    waiting = asyncio.create_task(wait_for_database(nowhere, stop, service="test"))
    # Unreachable: it keeps waiting (connection refused is retried, not raised) until stopped.
    done, _ = await asyncio.wait({waiting}, timeout=1.5)
    assert not done
    stop.set()
    assert await asyncio.wait_for(waiting, timeout=10) is False
    await nowhere.dispose()
