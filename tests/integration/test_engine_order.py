"""Property: whatever the DAG and however results arrive (in batches, out of order, duplicated),
the real rounds on the real Postgres queue no task before every one of its dependencies has
succeeded, and apply each result once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.engine import Engine, Inbound
from controller.migrate import upgrade
from controller.submit import submit
from dagsmith.messages import EvaluatedMessage, Evaluation, ResultMessage, TaskRef
from dagsmith.validation import validate
from tests.conftest import create_database, drop_database, make_settings
from tests.support.engine import round_engine


@st.composite
def dags(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(2, 18))
    tasks = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        tasks.append({"name": f"t{i}", "type": "noop", "dependsOn": [f"t{d}" for d in deps]})
    return tasks


@pytest.fixture(scope="module")
def database() -> Any:
    name = f"dagsmith_order_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    yield url
    drop_database(name)


def success(task_id: int, wid: uuid.UUID, name: str, attempt: int) -> EvaluatedMessage:
    now = time.time()
    ref = TaskRef(task_id=task_id, attempt=attempt, workflow_id=str(wid), name=name, type="noop")
    result = ResultMessage(task=ref, executor_id="e", ok=True, output={"n": name}, started_at=now, finished_at=now)
    return EvaluatedMessage(result=result, evaluation=Evaluation(verdict="pass", reward=1.0, feedback={}))


async def run_to_the_end(eng: Engine, db: Any, tasks: list[dict[str, Any]], data: st.DataObject) -> uuid.UUID:
    doc = {"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "metadata": {"name": "order"}, "spec": {"tasks": tasks}}
    async with db.begin() as conn:
        wid = (await submit(conn, validate(doc), namespace="default")).id
    await eng.run_round(Inbound(dirty={wid}))
    for _ in range(10 * len(tasks)):
        async with db.connect() as conn:
            rows = await conn.exec_driver_sql(
                f"SELECT id, name, attempt, status FROM tasks WHERE workflow_id = '{wid}' ORDER BY id"
            )
            queued = [r for r in rows if r.status == "queued"]
            status = (await conn.exec_driver_sql(f"SELECT status FROM workflows WHERE id = '{wid}'")).scalar()
        if status != "running":
            break
        assert queued, "a running workflow with nothing queued and nothing to apply is stuck"
        # Some of the queued tasks finish, in any order; a result may come twice.
        done = data.draw(st.lists(st.sampled_from(queued), min_size=1, unique=True))
        messages = [success(r.id, wid, r.name, r.attempt) for r in done]
        messages += data.draw(st.lists(st.sampled_from(messages), max_size=2))
        await eng.run_round(Inbound(evaluated=messages))
    return wid


@pytest.fixture
async def engine(database: str) -> AsyncIterator[tuple[Engine, Any]]:
    async with round_engine(database, make_settings(database, f"order{uuid.uuid4().hex[:6]}"), "order") as pair:
        yield pair


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(tasks=dags(), data=st.data())
def test_no_task_is_queued_before_its_dependencies_succeeded(
    engine: tuple[Engine, Any], tasks: list[dict[str, Any]], data: st.DataObject
) -> None:
    eng, db = engine

    async def check() -> None:
        wid = await run_to_the_end(eng, db, tasks, data)
        async with db.connect() as conn:
            status = (await conn.exec_driver_sql(f"SELECT status FROM workflows WHERE id = '{wid}'")).scalar()
            events = list(
                await conn.exec_driver_sql(
                    f"SELECT id, task_name, to_status FROM task_events WHERE workflow_id = '{wid}' "
                    "AND task_name IS NOT NULL ORDER BY id"
                )
            )
        assert status == "succeeded"
        succeeded = {e.task_name: e.id for e in events if e.to_status == "succeeded"}
        assert len(succeeded) == len(tasks)
        assert len([e for e in events if e.to_status == "succeeded"]) == len(tasks)  # each applied once
        first_queued = {}
        for e in events:
            if e.to_status == "queued":
                first_queued.setdefault(e.task_name, e.id)
        for task in tasks:
            for dep in task["dependsOn"]:
                assert first_queued[task["name"]] > succeeded[dep], (task["name"], dep)

    asyncio.get_event_loop().run_until_complete(check())
