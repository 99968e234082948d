"""One reconciliation round against the real Postgres and RabbitMQ: what it applies, and once."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller.engine import Engine, Inbound
from controller.migrate import upgrade
from controller.submit import submit
from dagsmith.errors import ErrorClass
from dagsmith.messages import EvaluatedMessage, Evaluation, ResultMessage, TaskError, TaskMessage, TaskRef
from dagsmith.validation import validate
from tests.conftest import create_database, drop_database, make_settings
from tests.support.engine import round_engine


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, Any]]:
    name = f"dagsmith_rounds_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    async with round_engine(url, make_settings(url, f"rounds{uuid.uuid4().hex[:6]}"), "rounds-test") as pair:
        yield pair
    drop_database(name)


async def test_a_result_and_a_dead_letter_of_one_attempt_in_one_round_end_it_once(
    engine: tuple[Engine, Any],
) -> None:
    """The broker may dead-letter a task message after its executor's result has left (returns
    on dropped connections count as deliveries). The result decides; the dead letter changes
    nothing, even when both arrive in the same round."""
    eng, db = engine
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "once"},
        "spec": {"tasks": [{"name": "t", "type": "noop", "retry": {"limit": 1}}], "correction": {"mode": "off"}},
    }
    async with db.begin() as conn:
        wid = (await submit(conn, validate(doc), namespace="default")).id
    await eng.run_round(Inbound(dirty={wid}))  # dispatches attempt 1
    async with db.connect() as conn:
        (task_id,) = (await conn.exec_driver_sql(f"SELECT id FROM tasks WHERE workflow_id = '{wid}'")).one()
    ref = TaskRef(task_id=task_id, attempt=1, workflow_id=str(wid), name="t", type="noop")
    now = time.time()
    error = TaskError(error_class=ErrorClass.transient, message="flaky")
    result = ResultMessage(task=ref, executor_id="e", ok=False, error=error, started_at=now - 0.01, finished_at=now)
    evaluation = Evaluation(verdict="fail", reward=-0.5, feedback={}, error=error)
    dead = TaskMessage(task_id=task_id, attempt=1, workflow_id=str(wid), name="t", type="noop")
    await eng.run_round(Inbound(evaluated=[EvaluatedMessage(result=result, evaluation=evaluation)], dead=[(dead, 3)]))
    async with db.connect() as conn:
        status, attempt, err = (
            await conn.exec_driver_sql(f"SELECT status, attempt, error FROM tasks WHERE id = {task_id}")
        ).one()
        endings = (
            await conn.exec_driver_sql(
                f"SELECT count(*) FROM task_events WHERE task_id = {task_id} AND attempt = 1 "
                "AND to_status IN ('pending', 'failed', 'succeeded')"
            )
        ).scalar()
    assert endings == 1
    assert status != "failed" and (err or {}).get("class") != "poison", (status, attempt, err)


async def test_silent_executors_are_those_that_stopped_heartbeating_without_a_goodbye(
    engine: tuple[Engine, Any],
) -> None:
    from controller.store import silent_executors

    _, db = engine
    async with db.begin() as conn:
        for executor_id, seconds_ago, stopping in (
            ("alive", 1, False),
            ("crashed", 30, False),  # silent for six 5 s intervals, never said goodbye
            ("scaled-down", 30, True),  # said it was stopping
            ("long-gone", 7200, False),  # outside the window
        ):
            await conn.exec_driver_sql(
                "INSERT INTO executors (id, capabilities, version, hostname, pid, concurrency, stopping,"
                f" last_heartbeat) VALUES ('{executor_id}', '[]', 'v', 'h', 1, 1, {stopping},"
                f" now() - interval '{seconds_ago} seconds')"
            )
        assert await silent_executors(conn, heartbeat_interval=5.0) == 1


async def test_recently_ended_lists_cancelled_and_failed_workflows_newest_first(engine: tuple[Engine, Any]) -> None:
    from controller.store import recently_ended

    _, db = engine
    doc = {"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "metadata": {"name": "w"}}
    ids = {}
    async with db.begin() as conn:
        for name, status, ago in (
            ("c", "cancelled", 10),
            ("f", "failed", 5),
            ("s", "succeeded", 1),
            ("old", "failed", 90_000),
        ):
            spec = {**doc, "metadata": {"name": name}, "spec": {"tasks": [{"name": "t", "type": "noop"}]}}
            wid = (await submit(conn, validate(spec), namespace="default")).id
            await conn.exec_driver_sql(
                f"UPDATE workflows SET status = '{status}', finished_at = now() - interval '{ago} seconds' "
                f"WHERE id = '{wid}'"
            )
            ids[name] = wid
        ended = await recently_ended(conn, 86_400)
        assert [wid for wid, _ in ended] == [ids["f"], ids["c"]]
        assert ended[0][1] > ended[1][1]  # with when each ended


async def test_a_dead_letter_is_poison_only_when_the_same_series_last_delivery_started(
    engine: tuple[Engine, Any],
) -> None:
    """Start reports count per message series: one reported in a dead-lettered bundle (series 0)
    says nothing about the single message it was split into (series 1). That one, dead-lettered
    without its last delivery starting, is sent again (series 2) and its task put back to queued,
    so the lease the old start report set cannot expire it as lost. When the last delivery of
    series 2 is reported started — even before an earlier one, through another controller — the
    next dead letter fails the task as poison."""
    from dagsmith.messages import StartedMessage

    eng, db = engine
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "series"},
        "spec": {"tasks": [{"name": "t", "type": "noop"}], "correction": {"mode": "off"}},
    }
    async with db.begin() as conn:
        wid = (await submit(conn, validate(doc), namespace="default")).id
    await eng.run_round(Inbound(dirty={wid}))
    async with db.connect() as conn:
        (task_id,) = (await conn.exec_driver_sql(f"SELECT id FROM tasks WHERE workflow_id = '{wid}'")).one()

    def started(delivery: int, series: int) -> StartedMessage:
        return StartedMessage(
            task_id=task_id,
            attempt=1,
            workflow_id=str(wid),
            type="noop",
            executor_id="e1",
            started_at=time.time(),
            delivery=delivery,
            series=series,
        )

    async def row() -> tuple[Any, ...]:
        async with db.connect() as conn:
            return tuple(
                (
                    await conn.exec_driver_sql(
                        "SELECT status, lease_expires_at IS NOT NULL, started_series, started_delivery, error "
                        f"FROM tasks WHERE id = {task_id}"
                    )
                ).one()
            )

    def dead(series: int, redrives: int) -> TaskMessage:
        return TaskMessage(
            task_id=task_id, attempt=1, workflow_id=str(wid), name="t", type="noop", series=series, redrives=redrives
        )

    await eng.run_round(Inbound(started=[started(3, 0)]))  # started in its bundle's last delivery
    assert (await row())[:4] == ("running", True, 0, 3)
    out = await eng.run_round(Inbound(dead=[(dead(1, 0), 4)]))  # the single, returned 4 times unstarted
    assert [(m.series, m.redrives) for m in out.redriven] == [(2, 1)]
    status, leased, *_, error = await row()
    assert (status, leased, error) == ("queued", False, None)

    await eng.run_round(Inbound(started=[started(3, 2)]))
    await eng.run_round(Inbound(started=[started(1, 2)]))  # a late report of an earlier delivery
    assert (await row())[2:4] == (2, 3)
    out = await eng.run_round(Inbound(dead=[(dead(2, 1), 4)]))
    assert out.redriven == []
    status, _, _, _, error = await row()
    assert status == "failed" and error["class"] == "poison" and error["details"]["deliveries"] == 4
