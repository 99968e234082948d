"""The round's first statement batch applies a passed result exactly when ``accepts_result`` would.

``store.open_round`` applies passed results in SQL (so the common round needs one round trip);
the pure rule in ``controller.reconcile.accepts_result`` is the specification. Each case below sets
a task's row, asks the pure rule, then asks the database, and requires the same answer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from controller import store
from controller.reconcile import TaskView, accepts_result
from controller.states import TaskStatus
from controller.submit import submit
from dagsmith.spec import Backoff
from dagsmith.validation import validate


def spec(name: str) -> dict[str, Any]:
    tasks = [{"name": "a", "type": "noop"}, {"name": "b", "type": "noop", "dependsOn": ["a"]}]
    return {"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "metadata": {"name": name}, "spec": {"tasks": tasks}}


def passed(task_id: int, attempt: int) -> store.Passed:
    now = time.time()
    outcome = store.Outcome(task_id, {"ok": True}, None, 1.0, {}, "exec-1", now - 0.01, now)
    return store.Passed(outcome, attempt, 0.01)


# (task status, task attempt, workflow status, attempt the result is for)
CASES = [
    ("queued", 1, "running", 1),  # the normal case
    ("running", 2, "running", 2),  # a retry that reported its start
    ("running", 2, "running", 1),  # a result of a superseded attempt
    ("succeeded", 1, "running", 1),  # a duplicate of a result already applied
    ("pending", 1, "running", 1),  # waiting for a retry's backoff
    ("running", 1, "cancelled", 1),  # the workflow was cancelled meanwhile
]


@pytest.mark.parametrize(("status", "attempt", "workflow_status", "result_attempt"), CASES)
async def test_open_round_applies_what_accepts_result_accepts(
    db: Any, status: str, attempt: int, workflow_status: str, result_attempt: int
) -> None:
    async with db.begin() as conn:
        wid = (await submit(conn, validate(spec(f"round-{uuid.uuid4().hex[:6]}")), namespace="default")).id
        await conn.execute(
            sa.text("UPDATE tasks SET status = :s, attempt = :a WHERE workflow_id = :w AND name = 'a'"),
            {"s": status, "a": attempt, "w": wid},
        )
        await conn.execute(sa.text("UPDATE workflows SET status = :s WHERE id = :w"), {"s": workflow_status, "w": wid})
    async with db.begin() as conn:
        (a_id,) = (
            await conn.execute(sa.text("SELECT id FROM tasks WHERE workflow_id = :w AND name = 'a'"), {"w": wid})
        ).one()
        state = await store.open_round(conn, [wid], [], [passed(a_id, result_attempt)], [], time.time(), 100, 60.0, 5.0)
        rows = (
            await conn.execute(sa.text("SELECT name, status, waiting_on FROM tasks WHERE workflow_id = :w"), {"w": wid})
        ).all()

    task = {r.name: r for r in rows}
    expected = workflow_status == "running" and accepts_result(_view(status, attempt), result_attempt) is None
    assert [r.task_id for r in state.applied] == ([a_id] if expected else [])
    assert (task["a"].status == "succeeded") == (expected or status == "succeeded")
    assert task["b"].waiting_on == (0 if expected else 1)  # the child is released only by an applied result


async def test_a_result_delivered_twice_in_one_round_is_applied_once(db: Any) -> None:
    async with db.begin() as conn:
        wid = (await submit(conn, validate(spec("twice")), namespace="default")).id
        await conn.execute(sa.text("UPDATE workflows SET status = 'running' WHERE id = :w"), {"w": wid})
        (a_id,) = (
            await conn.execute(
                sa.text(
                    "UPDATE tasks SET status = 'queued', attempt = 1 WHERE workflow_id = :w AND name = 'a' RETURNING id"
                ),
                {"w": wid},
            )
        ).one()
    async with db.begin() as conn:
        state = await store.open_round(
            conn, [wid], [], [passed(a_id, 1), passed(a_id, 1)], [], time.time(), 100, 60.0, 5.0
        )
        (waiting_on,) = (
            await conn.execute(
                sa.text("SELECT waiting_on FROM tasks WHERE workflow_id = :w AND name = 'b'"), {"w": wid}
            )
        ).one()
    assert len(state.applied) == 1
    assert waiting_on == 0  # released once, not driven below zero
    assert [t.name for t in state.candidates] == ["b"]  # the refresh in the same round trip sees it ready


def _view(status: str, attempt: int) -> TaskView:
    return TaskView(
        id=1,
        name="a",
        status=TaskStatus(status),
        attempt=attempt,
        waiting_on=0,
        retries=0,
        max_retries=0,
        backoff=Backoff(),
        not_before=None,
        lease_expires_at=None,
    )
