"""Against Postgres: deleting finished workflows, by hand, by age and on the controller's schedule.

Each test gets a database of its own, with no controller on it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from controller import retention
from controller.submit import submit
from dagsmith.errors import Conflict, NotFound
from dagsmith.validation import validate

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


@pytest.fixture
async def db() -> AsyncIterator[AsyncEngine]:
    """A database of this module's own (it replaces the session's): the end-to-end suite's
    controller runs on the session's, and would finish workflows these tests made running, or
    hold a row for a moment that a prune then passes over."""
    from controller.db import create_engine
    from controller.migrate import upgrade
    from tests.conftest import create_database, drop_database

    name = f"dagsmith_retention_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    engine = create_engine(url, pool_size=2, name="retention-test")
    yield engine
    await engine.dispose()
    drop_database(name)


def _doc(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": name},
        # No executor serves this type: the tasks stay pending if a controller is about.
        "spec": {
            "tasks": [{"name": "a", "type": "test.nobody"}, {"name": "b", "type": "test.nobody", "dependsOn": ["a"]}]
        },
    }


async def _workflow(
    db: AsyncEngine,
    namespace: str,
    status: str = "succeeded",
    finished_ago: timedelta | None = None,
    *,
    source: str = "api",
    key: str | None = None,
) -> uuid.UUID:
    """A workflow in ``status``, finished ``finished_ago`` before now, with an event, a revision
    and a correction decision, as a finished workflow has."""
    async with db.begin() as conn:
        wid = (await submit(conn, validate(_doc("w")), namespace=namespace, idempotency_key=key, source=source)).id
        if status in ("succeeded", "failed", "cancelled"):
            task_status = "succeeded" if status == "succeeded" else "cancelled"
            await conn.execute(
                sa.text("UPDATE tasks SET status = :s WHERE workflow_id = :w"), {"s": task_status, "w": wid}
            )
            await conn.execute(
                sa.text("UPDATE workflows SET status = :s, finished_at = now() - :ago WHERE id = :w"),
                {"s": status, "ago": finished_ago or timedelta(0), "w": wid},
            )
        else:
            await conn.execute(sa.text("UPDATE workflows SET status = :s WHERE id = :w"), {"s": status, "w": wid})
        await conn.execute(
            sa.text("INSERT INTO task_events (workflow_id, to_status, reason) VALUES (:w, 'queued', 'test')"),
            {"w": wid},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO dag_revisions (workflow_id, revision, parent_revision, actor, operation, task_name, "
                "reason, diff) VALUES (:w, 1, 0, 'rules', 'retry', 'a', '{}', '{}')"
            ),
            {"w": wid},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO correction_decisions (workflow_id, task_id, task_name, task_type, attempt, error_class, "
                "mode, policy_version, feature_schema_version, features, observation, mask, action, probability, "
                "probabilities, outcome) VALUES (:w, 1, 'a', 'test.nobody', 1, 'transient', 'rules', 'rules', 1, "
                "'{}', '{0.5}', '{true}', 'retry_now', 1.0, '{1.0}', '{\"fixed\": true}')"
            ),
            {"w": wid},
        )
    return wid


async def _count(db: AsyncEngine, table: str, wid: uuid.UUID) -> int:
    column = "id" if table == "workflows" else "workflow_id"
    async with db.connect() as conn:
        return int(
            (await conn.execute(sa.text(f"SELECT count(*) FROM {table} WHERE {column} = :w"), {"w": wid})).scalar()
        )


async def test_prune_deletes_only_finished_workflows_past_the_cutoff_and_keeps_their_decisions(db: AsyncEngine) -> None:
    ns = f"prune-{uuid.uuid4().hex[:8]}"
    old = [await _workflow(db, ns, s, 2 * DAY) for s in ("succeeded", "failed", "cancelled")]
    recent = await _workflow(db, ns, "succeeded", timedelta(minutes=10))
    # Failed or cancelled less than a day ago: kept whatever the cutoff (executors that connect
    # are told about it so they drop its queued tasks; a deleted one they would not be).
    remembered = [await _workflow(db, ns, s, 3 * HOUR) for s in ("failed", "cancelled")]
    running = await _workflow(db, ns, "running")
    elsewhere = await _workflow(db, f"{ns}-other", "succeeded", 3 * HOUR)
    async with db.connect() as conn:
        decisions_before = int(
            (
                await conn.execute(sa.text("SELECT count(*) FROM correction_decisions WHERE workflow_id IS NULL"))
            ).scalar()
        )
    cutoff = datetime.now(UTC) - HOUR

    async with db.connect() as conn:
        found = await retention.count_prunable(conn, cutoff, namespaces=[ns])
    assert (found.workflows, found.tasks) == (3, 6)
    async with db.begin() as conn:
        pruned = await retention.prune_batch(conn, cutoff, namespaces=[ns])
    assert (pruned.workflows, pruned.tasks) == (3, 6)
    assert pruned.oldest is not None and pruned.oldest < cutoff

    for wid in old:
        for table in ("workflows", "tasks", "task_events", "dag_revisions"):
            assert await _count(db, table, wid) == 0, (table, wid)
    for wid in (recent, running, elsewhere, *remembered):
        assert await _count(db, "workflows", wid) == 1
        assert await _count(db, "tasks", wid) == 2
        assert await _count(db, "correction_decisions", wid) == 1
    async with db.connect() as conn:
        decisions_after = int(
            (
                await conn.execute(sa.text("SELECT count(*) FROM correction_decisions WHERE workflow_id IS NULL"))
            ).scalar()
        )
    assert decisions_after - decisions_before == 3  # unlinked, not deleted: still training data
    async with db.begin() as conn:
        again = await retention.prune_batch(conn, cutoff, namespaces=[ns])
    assert again.workflows == 0


async def test_prune_goes_in_batches_oldest_first_and_can_keep_a_status(db: AsyncEngine) -> None:
    ns = f"prune-{uuid.uuid4().hex[:8]}"
    succeeded = [await _workflow(db, ns, "succeeded", (5 - i) * HOUR) for i in range(3)]
    failed = await _workflow(db, ns, "failed", 9 * HOUR)
    cutoff = datetime.now(UTC) - HOUR
    async with db.begin() as conn:
        first = await retention.prune_batch(conn, cutoff, namespaces=[ns], statuses=("succeeded",), batch=2)
    assert first.workflows == 2
    assert [await _count(db, "workflows", w) for w in succeeded] == [0, 0, 1]  # the two oldest
    async with db.begin() as conn:
        second = await retention.prune_batch(conn, cutoff, namespaces=[ns], statuses=("succeeded",), batch=2)
    assert second.workflows == 1
    assert await _count(db, "workflows", failed) == 1  # a status not asked for stays
    with pytest.raises(ValueError, match="only finished workflows"):
        async with db.begin() as conn:
            await retention.prune_batch(conn, cutoff, namespaces=[ns], statuses=("running",))


async def test_a_batch_stops_at_its_task_budget_but_takes_at_least_one_workflow(db: AsyncEngine) -> None:
    ns = f"prune-{uuid.uuid4().hex[:8]}"
    wids = [await _workflow(db, ns, "succeeded", (5 - i) * HOUR) for i in range(3)]  # 2 tasks each
    cutoff = datetime.now(UTC) - HOUR
    async with db.begin() as conn:
        first = await retention.prune_batch(conn, cutoff, namespaces=[ns], batch_tasks=5)
    assert (first.workflows, first.tasks, first.more) == (2, 4, True)
    async with db.begin() as conn:
        second = await retention.prune_batch(conn, cutoff, namespaces=[ns], batch_tasks=1)
    assert (second.workflows, second.tasks, second.more) == (1, 2, False)  # over budget alone: still taken
    assert [await _count(db, "workflows", w) for w in wids] == [0, 0, 0]


async def test_a_running_workflow_is_never_deleted_even_if_it_was_revived_meanwhile(db: AsyncEngine) -> None:
    """A retry surgery brings a failed workflow back (status running) while a DELETE of it waits
    for the row: the DELETE must judge what it finds once it has the row."""
    ns = f"del-{uuid.uuid4().hex[:8]}"
    wid = await _workflow(db, ns, "failed", 2 * DAY)
    async with db.begin() as surgery:
        await surgery.execute(
            sa.text("UPDATE workflows SET status = 'running', finished_at = NULL WHERE id = :w"), {"w": wid}
        )

        async def delete() -> None:
            async with db.begin() as conn:
                await retention.delete_workflow(conn, wid, [ns])

        deleting = asyncio.create_task(delete())
        done, _ = await asyncio.wait({deleting}, timeout=0.5)
        assert not done  # it waits for the surgery's lock
    with pytest.raises(Conflict, match="is running"):
        await asyncio.wait_for(deleting, 10)
    assert await _count(db, "workflows", wid) == 1


async def test_prune_passes_over_workflows_another_transaction_holds(db: AsyncEngine) -> None:
    ns = f"prune-{uuid.uuid4().hex[:8]}"
    held, free = await _workflow(db, ns, "succeeded", 2 * HOUR), await _workflow(db, ns, "succeeded", 2 * HOUR)
    cutoff = datetime.now(UTC) - HOUR
    async with db.begin() as holder:
        await holder.execute(sa.text("SELECT 1 FROM workflows WHERE id = :w FOR UPDATE"), {"w": held})
        async with db.begin() as conn:
            pruned = await asyncio.wait_for(retention.prune_batch(conn, cutoff, namespaces=[ns]), 10)
        assert pruned.workflows == 1
    assert await _count(db, "workflows", held) == 1
    assert await _count(db, "workflows", free) == 0


async def test_deleting_one_workflow(db: AsyncEngine) -> None:
    ns = f"del-{uuid.uuid4().hex[:8]}"
    done = await _workflow(db, ns, "failed", 2 * DAY, key="build-42")
    just_failed = await _workflow(db, ns, "cancelled", HOUR)
    running = await _workflow(db, ns, "running")
    mirrored = await _workflow(db, ns, "succeeded", source="kubernetes")

    with pytest.raises(NotFound):  # another namespace's workflow does not exist for this caller
        async with db.begin() as conn:
            await retention.delete_workflow(conn, done, [f"{ns}-other"])
    with pytest.raises(Conflict, match="is running: cancel it first"):
        async with db.begin() as conn:
            await retention.delete_workflow(conn, running, [ns])
    with pytest.raises(Conflict, match="cancelled less than a day ago"):
        async with db.begin() as conn:
            await retention.delete_workflow(conn, just_failed, [ns])
    with pytest.raises(Conflict, match="kubectl delete"):
        async with db.begin() as conn:
            await retention.delete_workflow(conn, mirrored, None)

    async with db.begin() as conn:
        await retention.delete_workflow(conn, done, [ns])
    assert await _count(db, "workflows", done) == 0
    assert await _count(db, "tasks", done) == 0
    # Its idempotency key is free again: the same key makes a new workflow.
    async with db.begin() as conn:
        again = await submit(conn, validate(_doc("w")), namespace=ns, idempotency_key="build-42", source="api")
    assert again.created and again.id != done


async def test_the_controller_prunes_on_its_schedule() -> None:
    from controller.db import create_engine
    from controller.migrate import upgrade
    from controller.service import Controller
    from dagsmith.amqp import delete_topology
    from tests.conftest import AMQP, create_database, drop_database, make_settings

    name = f"dagsmith_retention_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    prefix = f"ret{uuid.uuid4().hex[:6]}"
    upgrade(url)
    db = create_engine(url, pool_size=1, name="retention-test")
    stop = asyncio.Event()
    running = None
    try:
        old = await _workflow(db, "default", "succeeded", 2 * HOUR)
        young = await _workflow(db, "default", "succeeded", timedelta(minutes=30))
        controller = Controller(make_settings(url, prefix, retention="1h"))
        running = asyncio.create_task(controller.run(stop))
        async with asyncio.timeout(20):
            while await _count(db, "workflows", old):
                assert not running.done(), running
                await asyncio.sleep(0.05)
        assert await _count(db, "workflows", young) == 1
    finally:
        stop.set()
        if running is not None:
            await asyncio.wait_for(running, 10)
        await db.dispose()
        await delete_topology(AMQP, prefix, [])
        drop_database(name)
