"""The round's first round trip: it applies a passed result exactly when ``accepts_result`` would,
and its errors are the ones the retry logic knows.

``store.open_round`` applies passed results in SQL (so the common round needs one round trip);
the pure rule in ``controller.reconcile.accepts_result`` is the specification. Each case below sets
a task's row, asks the pure rule, then asks the database, and requires the same answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from controller import store
from controller.db import create_engine, in_transaction, is_transient
from controller.migrate import upgrade
from controller.reconcile import TaskView, accepts_result
from controller.states import TaskStatus
from controller.submit import submit
from dagsmith.spec import Backoff
from dagsmith.validation import validate
from tests.conftest import PG, create_database, drop_database


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A database of its own: the session's is shared with running controllers (end-to-end tests),
    which would dispatch and finish these hand-made workflows under the test's feet."""
    name = f"dagsmith_round_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    yield url
    drop_database(name)


@pytest.fixture
async def db(database: str) -> AsyncIterator[Any]:
    engine = create_engine(database, pool_size=2, name="round-tests")
    yield engine
    await engine.dispose()


def spec(name: str) -> dict[str, Any]:
    tasks = [{"name": "a", "type": "noop"}, {"name": "b", "type": "noop", "dependsOn": ["a"]}]
    return {"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "metadata": {"name": name}, "spec": {"tasks": tasks}}


def passed(task_id: int, attempt: int, workflow_id: uuid.UUID) -> store.Passed:
    now = time.time()
    outcome = store.Outcome(task_id, {"ok": True}, None, 1.0, {}, "exec-1", now - 0.01, now)
    return store.Passed(outcome, workflow_id, attempt, 0.01)


async def open_round(conn: Any, wid: uuid.UUID, results: list[store.Passed]) -> store.RoundState:
    return await store.open_round(conn, [wid], [], results, [], now=time.time(), limit=100, lease_ttl=60.0, grace=5.0)


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
        state = await open_round(conn, wid, [passed(a_id, result_attempt, wid)])
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
        state = await open_round(conn, wid, [passed(a_id, 1, wid), passed(a_id, 1, wid)])
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


async def _workflow(db: Any) -> uuid.UUID:
    async with db.begin() as conn:
        return (await submit(conn, validate(spec(f"errors-{uuid.uuid4().hex[:6]}")), namespace="default")).id


async def test_a_round_whose_connection_was_killed_is_retried_on_a_new_one(database: str, db: Any) -> None:
    """The controller does not pre-ping pooled connections: a dead one fails the round's first
    round trip, which must come out as a lost connection so the round is retried, not dropped."""
    wid = await _workflow(db)
    name = f"round-kill-{uuid.uuid4().hex[:6]}"
    engine = create_engine(database, pool_size=1, name=name, pre_ping=False)

    async def round_trip(conn: Any) -> store.RoundState:
        return await open_round(conn, wid, [])

    try:
        await in_transaction(engine, round_trip, what="test")  # the pool now holds one connection
        with psycopg.connect(PG + "/postgres", autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchone()
        assert killed == (1,)
        state = await in_transaction(engine, round_trip, what="test", attempts=3)
        assert set(state.workflows) == {wid}
    finally:
        await engine.dispose()


async def test_a_lock_timeout_inside_the_round_trip_is_a_transient_error(database: str, db: Any) -> None:
    wid = await _workflow(db)
    with psycopg.connect(database.replace("+psycopg", "")) as holder:
        holder.execute("SELECT 1 FROM workflows WHERE id = %s FOR UPDATE", (wid,))  # held until the block ends
        async with db.connect() as conn:
            await conn.execute(sa.text("SET lock_timeout = '50ms'"))
            with pytest.raises(sa.exc.OperationalError) as raised:
                await store.lock_workflows(conn, [wid])
            await conn.rollback()
    assert raised.value.orig is not None and raised.value.orig.sqlstate == "55P03"  # type: ignore[attr-defined]
    assert is_transient(raised.value)  # so in_transaction retries the round instead of dropping its messages


async def test_a_result_naming_another_workflow_changes_nothing(db: Any) -> None:
    """A round writes only to workflows it locked; those come from what the messages name."""
    owner, other = await _workflow(db), await _workflow(db)
    async with db.begin() as conn:
        await conn.execute(sa.text("UPDATE workflows SET status = 'running' WHERE id = ANY(:w)"), {"w": [owner, other]})
        (a_id,) = (
            await conn.execute(
                sa.text(
                    "UPDATE tasks SET status = 'queued', attempt = 1 WHERE workflow_id = :w AND name = 'a' RETURNING id"
                ),
                {"w": owner},
            )
        ).one()
    async with db.begin() as conn:
        state = await open_round(conn, other, [passed(a_id, 1, other)])
        (status,) = (await conn.execute(sa.text("SELECT status FROM tasks WHERE id = :t"), {"t": a_id})).one()
    assert state.applied == [] and status == "queued"
