"""Rounds in which one decision changes what another planned: an abort beside other failures and
dispatches, surgeries that bring a workflow back, and results the controller cannot apply.
Real Postgres and RabbitMQ; the rounds are driven by hand."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller import revisions, store
from controller.correct import Corrector
from controller.engine import Engine, Inbound
from controller.migrate import upgrade
from controller.policies import PolicyBox
from controller.submit import submit
from dagsmith.errors import ErrorClass
from dagsmith.messages import (
    EvaluatedMessage,
    Evaluation,
    ResultMessage,
    StartedMessage,
    TaskError,
    TaskMessage,
    TaskRef,
)
from dagsmith.validation import validate
from tests.conftest import create_database, drop_database, make_settings
from tests.support.engine import round_engine


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, Any]]:
    name = f"dagsmith_races_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    settings = make_settings(url, f"races{uuid.uuid4().hex[:6]}")
    async with round_engine(url, settings, "races-test", Corrector(PolicyBox())) as (eng, db):
        eng.leases_judged_from = 0.0  # no heartbeats to wait for: expired leases are judged at once
        yield eng, db
    drop_database(name)


async def _submit(db: Any, tasks: list[dict[str, Any]], mode: str = "rules") -> uuid.UUID:
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "races"},
        "spec": {"tasks": tasks, "correction": {"mode": mode}},
    }
    async with db.begin() as conn:
        return (await submit(conn, validate(doc), namespace="default")).id


async def _tasks(db: Any, wid: uuid.UUID) -> dict[str, tuple[int, str, int]]:
    async with db.connect() as conn:
        rows = await conn.exec_driver_sql(
            f"SELECT name, id, status, attempt FROM tasks WHERE workflow_id = '{wid}' ORDER BY id"
        )
        return {r.name: (r.id, r.status, r.attempt) for r in rows}


async def _workflow(db: Any, wid: uuid.UUID) -> tuple[str, int, int]:
    async with db.connect() as conn:
        row = (
            await conn.exec_driver_sql(f"SELECT status, surgeries, n_queued FROM workflows WHERE id = '{wid}'")
        ).one()
        return row.status, row.surgeries, row.n_queued


def _result(task_id: int, wid: uuid.UUID, name: str, error: ErrorClass | None = None) -> EvaluatedMessage:
    ref = TaskRef(task_id=task_id, attempt=1, workflow_id=str(wid), name=name, type="noop")
    now = time.time()
    if error is None:
        result = ResultMessage(task=ref, executor_id="e", ok=True, output={"v": 1}, started_at=now, finished_at=now)
        return EvaluatedMessage(result=result, evaluation=Evaluation(verdict="pass", reward=1.0, feedback={}))
    err = TaskError(error_class=error, message="boom")
    result = ResultMessage(task=ref, executor_id="e", ok=False, error=err, started_at=now, finished_at=now)
    return EvaluatedMessage(result=result, evaluation=Evaluation(verdict="fail", reward=-1.0, feedback={}, error=err))


async def test_an_abort_ends_the_round_for_its_workflow(engine: tuple[Engine, Any]) -> None:
    """Two failures of one workflow in one round: the rules abort on the permanent one; the other
    (a transient failure, which the rules would retry) must not bring the failed workflow back."""
    eng, db = engine
    wid = await _submit(
        db,
        [
            {"name": "a", "type": "noop"},
            {"name": "b", "type": "noop"},
            {"name": "d", "type": "noop", "dependsOn": ["b"]},
        ],
    )
    await eng.run_round(Inbound(dirty={wid}))
    t = await _tasks(db, wid)
    out = await eng.run_round(
        Inbound(
            evaluated=[
                _result(t["a"][0], wid, "a", ErrorClass.permanent),
                _result(t["b"][0], wid, "b", ErrorClass.transient),
            ]
        )
    )
    assert out.cancelled == {wid}
    assert await _workflow(db, wid) == ("failed", 1, 0)
    after = await eng.run_round(Inbound(dirty={wid}))
    assert after.dispatched == 0
    assert {name: status for name, (_, status, _) in (await _tasks(db, wid)).items()} == {
        "a": "failed",
        "b": "cancelled",
        "d": "cancelled",
    }


async def test_an_abort_drops_what_the_round_was_about_to_dispatch(engine: tuple[Engine, Any]) -> None:
    """A lost attempt out of retries (abort) in the round that also makes another task ready: the
    ready task is not left queued in a failed workflow."""
    eng, db = engine
    wid = await _submit(
        db,
        [
            {"name": "a", "type": "noop"},
            {"name": "c", "type": "noop"},
            {"name": "b", "type": "noop", "dependsOn": ["c"]},
        ],
    )
    await eng.run_round(Inbound(dirty={wid}))
    t = await _tasks(db, wid)
    async with db.begin() as conn:  # a's executor died on its last retry
        await conn.exec_driver_sql(
            f"UPDATE tasks SET status = 'running', retries = 2, lease_expires_at = now() - interval '1 s' "
            f"WHERE id = {t['a'][0]}"
        )
    out = await eng.run_round(Inbound(evaluated=[_result(t["c"][0], wid, "c")], dirty={wid}))
    assert out.cancelled == {wid} and out.dispatched == 0
    status, _, queued = await _workflow(db, wid)
    assert (status, queued) == ("failed", 0)
    assert (await _tasks(db, wid))["b"][1] == "cancelled"
    async with db.connect() as conn:
        assert await store.next_timer(conn) is None  # nothing left to wake up for


async def test_a_retry_brings_back_only_the_dependents_that_can_run(engine: tuple[Engine, Any]) -> None:
    """c needs a and b, both failed. Retrying a leaves c cancelled (b still failed), and the
    workflow ends again once a has run; retrying b then brings c back, and all succeed."""
    eng, db = engine
    wid = await _submit(
        db,
        [
            {"name": "a", "type": "noop"},
            {"name": "b", "type": "noop"},
            {"name": "c", "type": "noop", "dependsOn": ["a", "b"]},
        ],
        mode="off",
    )
    await eng.run_round(Inbound(dirty={wid}))
    t = await _tasks(db, wid)
    await eng.run_round(
        Inbound(
            evaluated=[
                _result(t["a"][0], wid, "a", ErrorClass.permanent),
                _result(t["b"][0], wid, "b", ErrorClass.permanent),
            ]
        )
    )
    assert (await _workflow(db, wid))[0] == "failed"

    async def retry(name: str) -> None:
        async with db.begin() as conn:
            await revisions.manual(
                conn, wid, operation="retry", task_name=name, actor="user:test", namespaces=None, now=time.time()
            )
        await eng.run_round(Inbound(dirty={wid}))

    async def succeed(name: str) -> None:
        task_id, status, attempt = (await _tasks(db, wid))[name]
        assert status == "queued"
        message = _result(task_id, wid, name)
        message.result.task.attempt = attempt
        await eng.run_round(Inbound(evaluated=[message]))

    await retry("a")
    assert (await _tasks(db, wid))["c"][1] == "cancelled"
    await succeed("a")
    assert (await _workflow(db, wid))[0] == "failed"  # b failed, so c can never run: it ends again

    await retry("b")
    assert (await _tasks(db, wid))["c"][1] == "pending"
    await succeed("b")
    await succeed("c")
    assert (await _workflow(db, wid))[0] == "succeeded"


async def test_a_task_inserted_before_one_that_never_ran_resolves_its_templates(engine: tuple[Engine, Any]) -> None:
    eng, db = engine
    wid = await _submit(
        db,
        [
            {"name": "a", "type": "noop"},
            {"name": "t", "type": "noop", "dependsOn": ["a"], "params": {"x": "{{ tasks.a.output.v }}"}},
        ],
        mode="off",
    )
    await eng.run_round(Inbound(dirty={wid}))
    async with db.begin() as conn:
        await revisions.manual(
            conn, wid, operation="insert", task_name="t", actor="user:test", namespaces=None, now=time.time(),
            new_type="noop",
        )  # fmt: skip
    t = await _tasks(db, wid)
    await eng.run_round(Inbound(evaluated=[_result(t["a"][0], wid, "a")]))
    async with db.connect() as conn:
        status, resolved = (
            await conn.exec_driver_sql(f"SELECT status, resolved_params FROM tasks WHERE id = {t['t_repair1'][0]}")
        ).one()
    assert (status, resolved) == ("queued", {"x": 1})


async def test_an_attempt_whose_result_cannot_be_applied_is_taken_for_lost(engine: tuple[Engine, Any]) -> None:
    """What the controller does with a result it had to drop: the attempt's lease ends at once, and
    the next round retries it as its policy says, rather than waiting for ever."""
    eng, db = engine
    wid = await _submit(db, [{"name": "t", "type": "noop", "retry": {"limit": 1}}], mode="off")
    await eng.run_round(Inbound(dirty={wid}))
    task_id = (await _tasks(db, wid))["t"][0]
    async with db.begin() as conn:
        await store.expire_leases(conn, [(task_id, 1, wid), (task_id, 0, wid)])  # the stale attempt 0 is ignored
    await eng.run_round(Inbound(dirty={wid}))
    async with db.connect() as conn:
        row = (
            await conn.exec_driver_sql(f"SELECT status, attempt, error, not_before FROM tasks WHERE id = {task_id}")
        ).one()
    # Retried after its backoff: pending until then, with the lost attempt's error.
    assert (row.status, row.attempt, row.error["class"]) == ("pending", 1, "lost") and row.not_before is not None


async def test_the_rounds_task_limit_neither_starves_ready_tasks_nor_forgets_a_workflow() -> None:
    """A round looks at a bounded number of ready tasks (4 × DAGSMITH_CONTROLLER_BATCH_SIZE). Retries
    waiting out a backoff do not take the places of ready tasks, and a workflow left out because
    another filled the limit gets another round at once."""
    name = f"dagsmith_races_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    settings = make_settings(url, f"races{uuid.uuid4().hex[:6]}", controller_batch_size=2)  # a limit of 8
    try:
        async with round_engine(url, settings, "races-limit") as (eng, db):
            wid = await _submit(db, [{"name": f"t{i}", "type": "noop"} for i in range(12)], mode="off")
            async with db.begin() as conn:  # the 8 lowest ids wait out an hour's backoff
                await conn.exec_driver_sql(
                    "UPDATE tasks SET not_before = now() + interval '1 hour', retries = 1 WHERE id IN "
                    f"(SELECT id FROM tasks WHERE workflow_id = '{wid}' ORDER BY id LIMIT 8)"
                )
            out = await eng.run_round(Inbound(dirty={wid}))
            assert out.dispatched == 4 and wid not in out.again  # the 4 ready ones; nothing to spin on

            big = await _submit(db, [{"name": f"t{i}", "type": "noop"} for i in range(10)], mode="off")
            small = await _submit(db, [{"name": "only", "type": "noop"}], mode="off")
            out = await eng.run_round(Inbound(dirty={big, small}))
            assert out.dispatched == 8 and {big, small} <= out.again
            out = await eng.run_round(Inbound(dirty=out.again))
            assert (await _tasks(db, small))["only"][1] == "queued"
    finally:
        drop_database(name)


@pytest.mark.parametrize("deliveries", [(3, 1), (1, 3)])
async def test_start_reports_of_one_attempt_in_one_round_keep_the_latest_delivery(
    engine: tuple[Engine, Any], deliveries: tuple[int, int]
) -> None:
    """Two executors report starting the same attempt (a redelivery), both in one round: the higher
    delivery count is kept whatever their order, since it decides whether a dead letter is poison."""
    eng, db = engine
    wid = await _submit(db, [{"name": "t", "type": "noop"}], mode="off")
    await eng.run_round(Inbound(dirty={wid}))
    task_id = (await _tasks(db, wid))["t"][0]
    reports = [
        StartedMessage(
            task_id=task_id,
            attempt=1,
            workflow_id=str(wid),
            type="noop",
            executor_id=f"e{d}",
            started_at=time.time(),
            delivery=d,
        )
        for d in deliveries
    ]
    await eng.run_round(Inbound(started=reports))
    async with db.connect() as conn:
        row = (await conn.exec_driver_sql(f"SELECT status, started_delivery FROM tasks WHERE id = {task_id}")).one()
    assert (row.status, row.started_delivery) == ("running", 3)


async def test_a_dead_letter_of_a_workflow_aborted_in_its_round_is_not_sent_again(engine: tuple[Engine, Any]) -> None:
    eng, db = engine
    wid = await _submit(db, [{"name": "a", "type": "noop"}, {"name": "b", "type": "noop"}])
    await eng.run_round(Inbound(dirty={wid}))
    t = await _tasks(db, wid)
    dead = TaskMessage(task_id=t["b"][0], attempt=1, workflow_id=str(wid), name="b", type="noop")
    out = await eng.run_round(Inbound(evaluated=[_result(t["a"][0], wid, "a", ErrorClass.permanent)], dead=[(dead, 4)]))
    assert out.cancelled == {wid} and out.redriven == []


async def test_a_message_sent_again_waits_a_new_queue_timeout(engine: tuple[Engine, Any]) -> None:
    """A dead-lettered message no executor started is sent again; its wait in the queue starts
    again too, still bounded by the task's queueTimeout."""
    eng, db = engine
    wid = await _submit(db, [{"name": "q", "type": "noop", "queueTimeout": "30s"}], mode="off")
    await eng.run_round(Inbound(dirty={wid}))
    task_id = (await _tasks(db, wid))["q"][0]
    dead = TaskMessage(task_id=task_id, attempt=1, workflow_id=str(wid), name="q", type="noop")
    before = time.time()
    out = await eng.run_round(Inbound(dead=[(dead, 4)]))
    assert [m.task_id for m in out.redriven] == [task_id]
    async with db.connect() as conn:
        status, deadline = (
            await conn.exec_driver_sql(
                f"SELECT status, extract(epoch FROM queue_deadline) FROM tasks WHERE id = {task_id}"
            )
        ).one()
    assert status == "queued" and deadline is not None and float(deadline) >= before + 29


async def test_a_cancellation_is_stamped_after_the_rounds_locks(engine: tuple[Engine, Any]) -> None:
    """What executors learn of a cancellation (the broadcast's time, and the workflow's finish time
    sent to executors that connect later) is the same moment, taken with the workflow locked."""
    eng, db = engine
    wid = await _submit(db, [{"name": "a", "type": "noop"}], mode="off")
    await eng.run_round(Inbound(dirty={wid}))
    async with db.begin() as conn:
        await conn.exec_driver_sql(f"UPDATE workflows SET cancel_requested = true WHERE id = '{wid}'")
    out = await eng.run_round(Inbound(dirty={wid}))
    assert out.cancelled == {wid}
    async with db.connect() as conn:
        [(_, finished)] = await store.recently_ended(conn, 3600)
    assert abs(finished - out.at) < 0.001


async def test_a_dropped_result_naming_another_workflow_ends_no_lease(engine: tuple[Engine, Any]) -> None:
    eng, db = engine
    wid = await _submit(db, [{"name": "t", "type": "noop"}], mode="off")
    await eng.run_round(Inbound(dirty={wid}))
    task_id = (await _tasks(db, wid))["t"][0]
    async with db.begin() as conn:
        await store.expire_leases(conn, [(task_id, 1, uuid.uuid4())])
    assert (await _tasks(db, wid))["t"][1] == "queued"


async def test_a_repair_that_fails_for_good_is_the_outcome_of_the_decision_that_inserted_it(
    engine: tuple[Engine, Any],
) -> None:
    """invalid_input → the rules insert the type's repair task; that repair fails permanently →
    abort. The insert_repair decision did not fix its task: a failure the learner sees, not an
    unknown outcome it leaves out."""
    eng, db = engine
    async with db.begin() as conn:
        await conn.exec_driver_sql(
            'INSERT INTO task_types (type, capability) VALUES (\'test.parse\', \'{"type": "test.parse", '
            '"repair": "test.fix"}\') ON CONFLICT (type) DO UPDATE SET capability = EXCLUDED.capability'
        )
    wid = await _submit(db, [{"name": "t", "type": "test.parse"}])
    await eng.run_round(Inbound(dirty={wid}))
    t = await _tasks(db, wid)
    await eng.run_round(Inbound(evaluated=[_result(t["t"][0], wid, "t", ErrorClass.invalid_input)]))
    await eng.run_round(Inbound(dirty={wid}))
    t = await _tasks(db, wid)
    assert t["t_repair1"][1] == "queued"
    await eng.run_round(Inbound(evaluated=[_result(t["t_repair1"][0], wid, "t_repair1", ErrorClass.permanent)]))
    async with db.connect() as conn:
        rows = await conn.exec_driver_sql(
            f"SELECT task_name, action, outcome FROM correction_decisions WHERE workflow_id = '{wid}' ORDER BY id"
        )
        decisions = [(r.task_name, r.action, r.outcome) for r in rows]
    assert [(name, action) for name, action, _ in decisions] == [("t", "insert_repair"), ("t_repair1", "abort")]
    inserted = decisions[0][2]
    assert inserted["fixed"] is False and inserted["ended"] == "repair_failed" and inserted["inserted"] == 1
    assert "censored" not in inserted
    assert (await _workflow(db, wid))[0] == "failed"


async def test_a_template_error_does_not_repeat_the_secret_it_was_rendering(engine: tuple[Engine, Any]) -> None:
    """A secret param rendered from a workflow param: the key it did not find is that param's
    value, and Jinja's message names it. The stored error masks it."""
    eng, db = engine
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "secret-template"},
        "spec": {
            "params": {"vault": {"other": 1}, "key": "SEKRET_VALUE_1"},
            "tasks": [
                {"name": "t", "type": "noop", "params": {"auth": "{{ params.vault[params.key] }}"}, "secrets": ["auth"]}
            ],
            "correction": {"mode": "off"},
        },
    }
    async with db.begin() as conn:
        wid = (await submit(conn, validate(doc), namespace="default")).id
    await eng.run_round(Inbound(dirty={wid}))
    await eng.run_round(Inbound(dirty={wid}))
    async with db.connect() as conn:
        status, error = (
            await conn.exec_driver_sql(f"SELECT status, error FROM tasks WHERE workflow_id = '{wid}'")
        ).one()
    assert status == "failed" and error["class"] == "invalid_input", error
    assert "SEKRET_VALUE_1" not in str(error) and "***" in error["message"], error
