"""Work per event is proportional to what changed, not to the size of the DAG.

Measured structurally, not with a clock: on a 50,000-task workflow, applying one result (readiness
included) and performing one surgery read the tasks table through indexes only (no sequential
scan) and update a handful of rows. Postgres' own statistics count the rows.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from controller import revisions
from controller.engine import Engine, Inbound
from controller.migrate import upgrade
from controller.submit import submit
from dagsmith.messages import EvaluatedMessage, Evaluation, ResultMessage, TaskRef
from dagsmith.settings import Settings
from dagsmith.validation import validate
from tests.conftest import create_database, drop_database, make_settings
from tests.support.engine import round_engine

N = 50_000


def chain(n: int) -> dict[str, Any]:
    tasks = [{"name": "t0", "type": "noop"}]
    tasks += [{"name": f"t{i}", "type": "noop", "dependsOn": [f"t{i - 1}"]} for i in range(1, n)]
    return {"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "metadata": {"name": "big"}, "spec": {"tasks": tasks}}


def table_stats(url: str) -> dict[str, int]:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        row = conn.execute(
            "SELECT seq_scan, seq_tup_read, coalesce(idx_tup_fetch, 0), n_tup_upd, n_tup_ins "
            "FROM pg_stat_user_tables WHERE relname = 'tasks'"
        ).fetchone()
    assert row is not None
    return dict(zip(("seq_scan", "seq_tup_read", "idx_tup_fetch", "n_tup_upd", "n_tup_ins"), row, strict=True))


@pytest.fixture(scope="module")
def big() -> Any:
    name = f"dagsmith_scale_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    yield url, make_settings(url, f"scale{uuid.uuid4().hex[:6]}")
    drop_database(name)


@pytest.fixture
async def engine(big: tuple[str, Settings]) -> AsyncIterator[tuple[Engine, Any]]:
    url, settings = big
    async with round_engine(url, settings, "scale-test") as pair:
        yield pair


async def settle(db: Any) -> None:
    """Statistics are flushed when a backend's transaction ends and it idles or exits: close them."""
    await db.dispose()
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres") as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")


async def test_one_result_in_a_50k_task_dag_touches_a_handful_of_rows(
    big: tuple[str, Settings], engine: tuple[Engine, Any]
) -> None:
    url, _ = big
    eng, db = engine
    checked = validate(chain(N))
    async with db.begin() as conn:
        wid = (await submit(conn, checked, namespace="default")).id
    await eng.run_round(Inbound(dirty={wid}))  # starts the workflow and dispatches t0
    async with db.connect() as conn:
        (t0_id,) = (
            await conn.exec_driver_sql(f"SELECT id FROM tasks WHERE workflow_id = '{wid}' AND name = 't0'")
        ).one()
    await settle(db)
    await asyncio.sleep(1.1)  # past the statistics flush interval (1 s in Postgres 15)
    before = table_stats(url)

    ref = TaskRef(task_id=t0_id, attempt=1, workflow_id=str(wid), name="t0", type="noop")
    now = time.time()
    result = ResultMessage(task=ref, executor_id="e", ok=True, output={}, started_at=now - 0.01, finished_at=now)
    evaluation = Evaluation(verdict="pass", reward=1.0, feedback={})
    applied = await eng.run_round(Inbound(evaluated=[EvaluatedMessage(result=result, evaluation=evaluation)]))
    assert applied.applied == 1 and applied.dispatched == 1  # t0 succeeded, t1 became ready and went out
    await settle(db)
    await asyncio.sleep(1.1)
    after = table_stats(url)

    delta = {k: after[k] - before[k] for k in before}
    assert delta["seq_tup_read"] == 0, delta  # no sequential scan of the 50,000 rows
    assert delta["n_tup_upd"] <= 4, delta  # t0 succeeded, t1 released, t1 queued
    assert delta["idx_tup_fetch"] <= 50, delta


async def test_surgery_in_a_50k_task_dag_touches_a_handful_of_rows(
    big: tuple[str, Settings], engine: tuple[Engine, Any]
) -> None:
    url, _ = big
    _, db = engine
    async with db.connect() as conn:
        (wid,) = (await conn.exec_driver_sql("SELECT id FROM workflows LIMIT 1")).one()
    await settle(db)
    await asyncio.sleep(1.1)
    before = table_stats(url)
    async with db.begin() as conn:
        await revisions.manual(
            conn,
            wid,
            operation="insert",
            task_name="t25000",
            actor="user:test",
            namespaces=None,
            now=time.time(),
            new_type="text.clean",
        )
    await settle(db)
    await asyncio.sleep(1.1)
    after = table_stats(url)
    delta = {k: after[k] - before[k] for k in before}
    assert delta["seq_tup_read"] == 0, delta
    assert delta["n_tup_ins"] == 1 and delta["n_tup_upd"] <= 3, delta  # new task, its parent, the task itself
    assert delta["idx_tup_fetch"] <= 50, delta
