"""The controller's reads and writes. Set-based SQL: one statement per kind of change per round.

Rule that keeps concurrent controllers free of deadlocks: a transaction that changes task
*status* first locks the workflow rows involved, in id order (:func:`lock_workflows`). Lease
extensions change no status and skip rows that are locked.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.db import CHANNEL_EVENTS
from controller.reconcile import Counts, TaskView, WorkflowView
from controller.states import TERMINAL_WORKFLOW, TaskStatus, WorkflowStatus
from dagsmith.durations import parse_duration
from dagsmith.spec import MAX_DEFAULT_OUTPUT_SINKS, Backoff, CorrectionSpec


def rows_json(rows: Iterable[dict[str, Any]]) -> str:
    """Rows for ``jsonb_to_recordset``: one JSON document instead of one array per column — orjson
    encodes it in a single pass, and Postgres parses it in C (much cheaper than per-element binds)."""
    return orjson.dumps(list(rows), default=_default).decode()


def _default(value: Any) -> Any:
    if isinstance(value, uuid.UUID | datetime):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def ts(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def _psycopg_sql(text: str) -> str:
    """A statement written with ``:name`` parameters, in psycopg's ``%(name)s`` style."""
    return str(sa.text(text).compile(dialect=psycopg_dialect()))


async def _pipeline(conn: AsyncConnection, *statements: tuple[str, dict[str, Any]]) -> list[list[Any]]:
    """Run statements in order, sent together in one network round trip (psycopg's pipeline mode).

    Postgres still executes them one after another, each with its own snapshot, exactly as if
    they were sent one by one: a read after a lock sees what committed while it waited. Only the
    waiting for each reply goes — on the reconciliation hot path, a round trip is a large part of
    a round. The statements run on the driver connection inside the caller's transaction
    (SQLAlchemy's own statements cannot run in pipeline mode: it reads a result's description right
    after sending). Errors are raised as SQLAlchemy raises them, so callers see one kind: a broken
    connection is invalidated (dropped from the pool) and the error says so, which makes
    :func:`controller.db.in_transaction` retry the transaction on a new connection.
    """
    driver = (await conn.get_raw_connection()).driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    cursors = []
    try:
        async with driver.pipeline():
            for sql, params in statements:
                cursor = driver.cursor(row_factory=namedtuple_row)
                cursors.append(cursor)
                await cursor.execute(sql, params)
        return [await c.fetchall() if c.description is not None else [] for c in cursors]
    except psycopg.Error as exc:
        broken = driver.broken or driver.closed
        if broken:
            await conn.invalidate()
        raise sa.exc.DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=broken) from exc
    finally:
        for cursor in cursors:
            await cursor.close()


@dataclass(frozen=True)
class WorkflowRow:
    id: uuid.UUID
    name: str
    namespace: str
    status: WorkflowStatus
    cancel_requested: bool
    counts: Counts
    params: dict[str, Any]
    # Correction Mode
    correction: CorrectionSpec = field(default_factory=CorrectionSpec)
    dag_revision: int = 0
    surgeries: int = 0
    inserted_tasks: int = 0
    task_seconds: float = 0.0
    started_at: float | None = None

    def view(self) -> WorkflowView:
        return WorkflowView(str(self.id), self.status, self.counts, self.cancel_requested)


@dataclass(frozen=True)
class TaskRow:
    id: int
    workflow_id: uuid.UUID
    name: str
    type: str
    status: TaskStatus
    attempt: int
    waiting_on: int
    retries: int
    max_retries: int
    spec: dict[str, Any]
    params: dict[str, Any]
    refs: list[str]
    timeout_s: float | None
    not_before: float | None
    lease_expires_at: float | None
    queue_deadline: float | None = None

    def view(self) -> TaskView:
        retry = self.spec.get("retry") or {}
        return TaskView(
            id=self.id,
            name=self.name,
            status=self.status,
            attempt=self.attempt,
            waiting_on=self.waiting_on,
            retries=self.retries,
            max_retries=self.max_retries,
            backoff=Backoff.model_validate(retry.get("backoff") or {}),
            not_before=self.not_before,
            lease_expires_at=self.lease_expires_at,
            queue_deadline=self.queue_deadline,
        )


@dataclass
class Event:
    workflow_id: uuid.UUID
    to_status: str
    task_id: int | None = None
    task_name: str | None = None
    attempt: int | None = None
    from_status: str | None = None
    reason: str | None = None
    data: dict[str, Any] | None = None
    at: float | None = None


@dataclass
class Events:
    """Events collected during a round, written with one INSERT at its end."""

    items: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        self.items.append(event)


_COUNT_COLUMNS = ", ".join(f"n_{s.value}" for s in TaskStatus)


_LOCK_WORKFLOWS = _psycopg_sql(
    f"""
    SELECT id, name, namespace, status, cancel_requested, {_COUNT_COLUMNS},
           spec->'spec'->'params' AS params, spec->'spec'->'correction' AS correction, dag_revision,
           surgeries, inserted_tasks, task_seconds, started_at
    FROM workflows WHERE id = ANY(:ids) ORDER BY id FOR UPDATE
    """
)


async def lock_workflows(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, WorkflowRow]:
    (rows,) = await _pipeline(conn, (_LOCK_WORKFLOWS, {"ids": sorted(set(ids))}))
    return {r.id: _workflow_row(r) for r in rows}


def _workflow_row(r: Any) -> WorkflowRow:
    counts = Counts(**{s.value: getattr(r, f"n_{s.value}") for s in TaskStatus})
    return WorkflowRow(
        r.id,
        r.name,
        r.namespace,
        WorkflowStatus(r.status),
        r.cancel_requested,
        counts,
        r.params or {},
        correction=_correction(r.correction),
        dag_revision=r.dag_revision,
        surgeries=r.surgeries,
        inserted_tasks=r.inserted_tasks,
        task_seconds=r.task_seconds,
        started_at=epoch(r.started_at),
    )


@lru_cache(maxsize=256)
def _correction_cached(raw: str) -> CorrectionSpec:
    return CorrectionSpec.model_validate_json(raw)


def _correction(raw: dict[str, Any] | None) -> CorrectionSpec:
    return _correction_cached(orjson.dumps(raw or {}, option=orjson.OPT_SORT_KEYS).decode())


_TASK_COLUMNS = """id, workflow_id, name, type, status, attempt, waiting_on, retries, max_retries, spec,
    params, refs, timeout_s, not_before, lease_expires_at"""
# Applying a result needs much less than dispatching: not the params or the whole spec.
_RESULT_COLUMNS = """id, workflow_id, name, type, status, attempt, waiting_on, retries, max_retries,
    jsonb_build_object('retry', spec->'retry', 'queueTimeout', spec->'queueTimeout') AS spec,
    '{}'::jsonb AS params, refs, timeout_s, not_before, lease_expires_at"""


def _task_row(r: Any) -> TaskRow:
    return TaskRow(
        id=r.id,
        workflow_id=r.workflow_id,
        name=r.name,
        type=r.type,
        status=TaskStatus(r.status),
        attempt=r.attempt,
        waiting_on=r.waiting_on,
        retries=r.retries,
        max_retries=r.max_retries,
        spec=r.spec,
        params=r.params,
        refs=list(r.refs),
        timeout_s=r.timeout_s,
        not_before=epoch(r.not_before),
        lease_expires_at=epoch(r.lease_expires_at),
    )


_LOAD_TASKS = _psycopg_sql(f"SELECT {_RESULT_COLUMNS} FROM tasks WHERE id = ANY(:ids)")


_TASK_JSON_COLUMNS = """id, workflow_id, name, type, status, attempt, waiting_on, retries, max_retries, spec,
    params, refs, timeout_s, extract(epoch FROM not_before) AS not_before,
    extract(epoch FROM lease_expires_at) AS lease_expires_at,
    extract(epoch FROM queue_deadline) AS queue_deadline"""


_REFRESH = _psycopg_sql(
    f"""
    SELECT 'w' AS kind, to_jsonb(w) AS row FROM (
        SELECT id, status, cancel_requested, {_COUNT_COLUMNS} FROM workflows WHERE id = ANY(:ids)) w
    UNION ALL
    SELECT 't', to_jsonb(c) FROM (
        (SELECT {_TASK_JSON_COLUMNS} FROM tasks
         WHERE workflow_id = ANY(:ids) AND status = 'pending' AND waiting_on = 0
         -- Ready ones first: retries waiting out a backoff must not crowd them out of the limit.
         -- Then the earliest backoffs, so the round's timer is set for the first of them.
         ORDER BY (not_before IS NOT NULL AND not_before > :now), not_before NULLS FIRST, id LIMIT :limit)
        UNION ALL
        (SELECT {_TASK_JSON_COLUMNS} FROM tasks
         WHERE status = 'running' AND lease_expires_at <= :now AND workflow_id = ANY(:ids))
        UNION ALL
        (SELECT {_TASK_JSON_COLUMNS} FROM tasks
         WHERE status = 'queued' AND queue_deadline <= :now AND workflow_id = ANY(:ids))
    ) c
    """
)


@dataclass(frozen=True)
class Passed:
    """A result the evaluator passed. It applies only if ``attempt`` is still the task's attempt in
    flight and its workflow is live (:func:`controller.reconcile.accepts_result`, as SQL)."""

    outcome: Outcome
    workflow_id: uuid.UUID  # as the result names it: it must be the task's (and so locked)
    attempt: int
    seconds: float  # the attempt's run time, added to the workflow's task-seconds


@dataclass(frozen=True)
class Applied:
    """A passed result that was applied: its task succeeded."""

    task_id: int
    workflow_id: uuid.UUID
    name: str
    type: str
    attempt: int
    old_status: str  # queued (no start report came) or running
    children: list[int]


@dataclass(frozen=True)
class Started:
    """A start report that was applied: the task is running, with a lease."""

    task_id: int
    workflow_id: uuid.UUID
    name: str
    attempt: int
    old_status: str
    started_at: float


@dataclass
class RoundState:
    """What the first round trip of a round returns (:func:`open_round`)."""

    workflows: dict[uuid.UUID, WorkflowRow]  # the touched workflows, locked, as they were locked
    started: list[Started]
    applied: list[Applied]
    failed: dict[int, TaskRow]  # the tasks of failed and dead-lettered attempts, to decide on
    fresh: dict[uuid.UUID, WorkflowRow]  # the live workflows with the counters after the writes
    candidates: list[TaskRow]  # tasks of live workflows that may need action


async def open_round(
    conn: AsyncConnection,
    workflow_ids: Iterable[uuid.UUID],
    started: Sequence[tuple[int, uuid.UUID, int, str, float, int, int]],
    passed: Sequence[Passed],
    failed_ids: Iterable[int],
    *,
    now: float,
    limit: int,
    lease_ttl: float,
    grace: float,
) -> RoundState:
    """The common round in one round trip, in this order: lock the workflows (in id order), record
    start reports (task_id, workflow_id, attempt, executor_id, started_at, delivery, series), apply
    passed results (succeed tasks, release children, add reward and task-seconds), read the tasks
    of failed results, and read fresh counters and the tasks that may need action. Each statement
    sees what the previous ones did (they run one after another). Start reports and results for
    finished workflows, stale attempts and duplicates change nothing."""
    ids = sorted(set(workflow_ids))
    wanted = sorted(set(failed_ids))
    statements: list[tuple[str, dict[str, Any]]] = [(_LOCK_WORKFLOWS, {"ids": ids})]
    if started:
        statements.append(
            (
                _MARK_RUNNING,
                {
                    "rows": rows_json(
                        {
                            "id": i,
                            "workflow_id": w,
                            "attempt": a,
                            "executor_id": e,
                            "started_at": at,
                            "delivery": d,
                            "series": n,
                        }
                        for i, w, a, e, at, d, n in started
                    ),
                    "ttl": lease_ttl,
                    "grace": grace,
                },
            )
        )
    if passed:
        statements.append((_APPLY_PASSED, {"rows": rows_json(_passed_row(p) for p in passed)}))
    if wanted:
        statements.append((_LOAD_TASKS, {"ids": wanted}))
    statements.append((_REFRESH, {"ids": ids, "now": ts(now), "limit": limit}))
    results = iter(await _pipeline(conn, *statements))
    locked = {r.id: _workflow_row(r) for r in next(results)}
    state = RoundState(locked, [], [], {}, {}, [])
    if started:
        state.started = [
            Started(r.id, r.workflow_id, r.name, r.attempt, r.old_status, r.started_at.timestamp())
            for r in next(results)
        ]
    if passed:
        state.applied = [
            Applied(r.id, r.workflow_id, r.name, r.type, r.attempt, r.old_status, list(r.children))
            for r in next(results)
        ]
    if wanted:
        state.failed = {r.id: _task_row(r) for r in next(results)}
    # The refresh read every touched workflow (which are live was not known when it was sent); a
    # finished workflow has no active task, so it added no candidates.
    live = {wid: w for wid, w in locked.items() if w.status not in TERMINAL_WORKFLOW}
    state.fresh, state.candidates = _refreshed(live, next(results))
    return state


async def refresh(
    conn: AsyncConnection, rows: dict[uuid.UUID, WorkflowRow], now: float, limit: int
) -> tuple[dict[uuid.UUID, WorkflowRow], list[TaskRow]]:
    """Fresh counters of the locked workflows (the triggers changed them) and the tasks that may
    need action — ready ones (or in backoff), expired leases and missed queue deadlines."""
    if not rows:
        return {}, []
    (result,) = await _pipeline(conn, (_REFRESH, {"ids": list(rows), "now": ts(now), "limit": limit}))
    return _refreshed(rows, result)


def _refreshed(
    rows: dict[uuid.UUID, WorkflowRow], result: list[Any]
) -> tuple[dict[uuid.UUID, WorkflowRow], list[TaskRow]]:
    fresh = dict(rows)
    candidates = []
    for kind, row in result:
        if kind == "w":
            wid = uuid.UUID(row["id"])
            if wid not in rows:
                continue
            counts = Counts(**{s.value: row[f"n_{s.value}"] for s in TaskStatus})
            fresh[wid] = replace(
                rows[wid], status=WorkflowStatus(row["status"]), cancel_requested=row["cancel_requested"], counts=counts
            )
        elif uuid.UUID(row["workflow_id"]) in rows:
            candidates.append(_task_row_json(row))
    return fresh, candidates


def _task_row_json(r: dict[str, Any]) -> TaskRow:
    return TaskRow(
        id=r["id"],
        workflow_id=uuid.UUID(r["workflow_id"]),
        name=r["name"],
        type=r["type"],
        status=TaskStatus(r["status"]),
        attempt=r["attempt"],
        waiting_on=r["waiting_on"],
        retries=r["retries"],
        max_retries=r["max_retries"],
        spec=r["spec"],
        params=r["params"],
        refs=list(r["refs"]),
        timeout_s=r["timeout_s"],
        not_before=None if r["not_before"] is None else float(r["not_before"]),
        lease_expires_at=None if r["lease_expires_at"] is None else float(r["lease_expires_at"]),
        queue_deadline=None if r["queue_deadline"] is None else float(r["queue_deadline"]),
    )


async def outputs_of(conn: AsyncConnection, workflow_id: uuid.UUID, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"output": ..., "status": ...}}`` for the named tasks, as templates see them."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    rows = await conn.execute(
        sa.text("SELECT name, output, status FROM tasks WHERE workflow_id = :w AND name = ANY(:names)"),
        {"w": workflow_id, "names": wanted},
    )
    return {r.name: {"output": r.output, "status": r.status} for r in rows}


async def start_workflows(conn: AsyncConnection, ids: Sequence[uuid.UUID], now: float, events: Events) -> None:
    if not ids:
        return
    await conn.execute(
        sa.text(
            "UPDATE workflows SET status = 'running', started_at = :now, updated_at = :now "
            "WHERE id = ANY(:ids) AND status = 'pending'"
        ),
        {"ids": list(ids), "now": ts(now)},
    )
    for wid in ids:
        events.add(Event(wid, "running", from_status="pending", reason="started", at=now))


async def started_deliveries(conn: AsyncConnection, task_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """(series, highest delivery count) each task's current attempt was reported started from."""
    rows = await conn.execute(
        sa.text(
            "SELECT id, started_series, started_delivery FROM tasks "
            "WHERE id = ANY(:ids) AND started_delivery IS NOT NULL"
        ),
        {"ids": list(task_ids)},
    )
    return {r.id: (r.started_series, r.started_delivery) for r in rows}


async def requeue(conn: AsyncConnection, attempts: Sequence[tuple[int, int, float | None]]) -> None:
    """Attempts whose message is back in its queue (sent again after a dead letter): queued, with no
    lease, so that the lease of an executor that no longer holds them cannot expire them as lost,
    and with a new queue deadline (task_id, attempt, deadline or None), the message's wait starting
    again. No event: the attempt did not change, and its next start report records it running again."""
    await conn.execute(
        sa.text(
            """
            UPDATE tasks t SET status = 'queued', lease_expires_at = NULL, executor_id = NULL, started_at = NULL,
                queue_deadline = to_timestamp(a.deadline)
            FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[]), CAST(:deadlines AS float8[]))
                AS a(id, attempt, deadline)
            WHERE t.id = a.id AND t.attempt = a.attempt AND t.status IN ('queued', 'running')
            """
        ),
        {
            "ids": [i for i, _, _ in attempts],
            "attempts": [a for _, a, _ in attempts],
            "deadlines": [d for _, _, d in attempts],
        },
    )


# The tasks downstream of the tasks :ids (their children, the children's children, ...), as the
# table ``down(id)`` for the statement that follows.
DOWNSTREAM = """
    WITH RECURSIVE down(id) AS (
        SELECT unnest(children) FROM tasks WHERE id = ANY(:ids)
        UNION
        SELECT unnest(t.children) FROM tasks t JOIN down d ON t.id = d.id
    )
"""


def queue_deadline(queue_timeout: Any, now: float) -> float | None:
    """When a message sent at ``now`` stops waiting for an executor (the spec's ``queueTimeout``,
    as written there), or None."""
    return None if queue_timeout is None else now + parse_duration(queue_timeout)


async def requeue_sent_again(conn: AsyncConnection, attempts: Sequence[tuple[int, int]], now: float) -> None:
    """:func:`requeue` for attempts (task id, attempt) sent again outside a round (the members of a
    dead-lettered bundle), their queue deadlines read from their specs."""
    rows = await conn.execute(
        sa.text("SELECT id, spec->'queueTimeout' AS qt FROM tasks WHERE id = ANY(:ids)"),
        {"ids": [i for i, _ in attempts]},
    )
    deadlines = {r.id: queue_deadline(r.qt, now) for r in rows}
    await requeue(conn, [(i, a, deadlines.get(i)) for i, a in attempts])


async def expire_leases(conn: AsyncConnection, attempts: Sequence[tuple[int, int, uuid.UUID]]) -> None:
    """Attempts (task id, attempt, the workflow the message named) whose result or dead letter
    could not be applied (the controller dropped it): running, with a lease that has already
    ended, so the next round takes them for lost and retries or fails them as their workflow's
    policy says, instead of leaving them waiting for a result that will never come. A finished
    attempt, an older one, or one of another workflow than the message said, is left alone."""
    await conn.execute(
        sa.text(
            """
            UPDATE tasks t SET status = 'running', lease_expires_at = now()
            FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[]), CAST(:workflows AS uuid[]))
                AS a(id, attempt, workflow_id)
            WHERE t.id = a.id AND t.attempt = a.attempt AND t.workflow_id = a.workflow_id
              AND t.status IN ('queued', 'running')
            """
        ),
        {
            "ids": [i for i, _, _ in attempts],
            "attempts": [a for _, a, _ in attempts],
            "workflows": [w for _, _, w in attempts],
        },
    )


# A workflow that has not finished (start reports and results for finished ones change nothing).
_LIVE = f"w.status NOT IN ({', '.join(repr(str(s)) for s in sorted(TERMINAL_WORKFLOW))})"

_MARK_RUNNING = _psycopg_sql(
    f"""
    UPDATE tasks t
    SET status = 'running', started_at = to_timestamp(v.started_at), executor_id = v.executor_id,
        -- The highest delivery reported started in the newest series (reports may arrive out
        -- of order, through two controllers).
        started_delivery = CASE
            WHEN t.started_series IS NULL OR v.series > t.started_series THEN v.delivery
            WHEN v.series = t.started_series THEN GREATEST(t.started_delivery, v.delivery)
            ELSE t.started_delivery END,
        started_series = GREATEST(COALESCE(t.started_series, v.series), v.series),
        lease_expires_at = LEAST(
            COALESCE(to_timestamp(v.started_at) + make_interval(secs => t.timeout_s + :grace), 'infinity'),
            now() + make_interval(secs => :ttl))
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
         AS v(id bigint, workflow_id uuid, attempt int, executor_id text, started_at float8, delivery int,
              series int)
         JOIN tasks o ON o.id = v.id  -- the row as it was, for the event's "from"
         JOIN workflows w ON w.id = o.workflow_id
    WHERE t.id = v.id AND t.attempt = v.attempt AND t.status IN ('queued', 'running') AND {_LIVE}
      AND o.workflow_id = v.workflow_id  -- the report's workflow, which this round locked
    RETURNING t.id, t.workflow_id, t.name, t.attempt, o.status AS old_status, t.started_at
    """
)


@dataclass(frozen=True)
class Outcome:
    """What an evaluated attempt leaves on its task row."""

    task_id: int
    output: Any
    error: dict[str, Any] | None
    reward: float | None
    feedback: dict[str, Any] | None
    executor_id: str | None
    started_at: float | None
    finished_at: float


_OUTCOME_ROWS = """jsonb_to_recordset(CAST(:rows AS jsonb))
         AS v(id bigint, output jsonb, error jsonb, reward float8, feedback jsonb, executor_id text,
              started_at float8, finished_at float8, not_before float8)"""


def _outcome_params(outcomes: Sequence[Outcome], not_before: Sequence[float] | None = None) -> dict[str, Any]:
    return {
        "rows": rows_json(
            {
                "id": o.task_id,
                "output": o.output,
                "error": o.error,
                "reward": o.reward,
                "feedback": o.feedback,
                "executor_id": o.executor_id,
                "started_at": o.started_at,
                "finished_at": o.finished_at,
                "not_before": not_before[i] if not_before is not None else None,
            }
            for i, o in enumerate(outcomes)
        )
    }


# Succeed tasks, release their children (``waiting_on`` drops by how many of a child's
# dependencies just finished) and add the round's (reward, task-seconds) to the workflows.
_APPLY_PASSED = _psycopg_sql(
    f"""
    WITH v AS (
        SELECT * FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS v(id bigint, workflow_id uuid, attempt int, output jsonb, reward float8, feedback jsonb,
                 executor_id text, started_at float8, finished_at float8, seconds float8)
    ),
    done AS (
        UPDATE tasks t SET status = 'succeeded', output = v.output, error = NULL, reward = v.reward,
            feedback_notes = v.feedback, executor_id = COALESCE(v.executor_id, t.executor_id),
            started_at = COALESCE(to_timestamp(v.started_at), t.started_at),
            finished_at = to_timestamp(v.finished_at),
            lease_expires_at = NULL
        FROM v JOIN tasks o ON o.id = v.id JOIN workflows w ON w.id = o.workflow_id
        WHERE t.id = v.id AND t.attempt = v.attempt AND t.status IN ('queued', 'running') AND {_LIVE}
          AND o.workflow_id = v.workflow_id  -- the result's workflow, which this round locked
        RETURNING t.id, t.workflow_id, t.name, t.type, t.attempt, o.status AS old_status, t.children,
                  v.reward, v.seconds
    ),
    -- a child's waiting_on drops by how many of its dependencies just succeeded
    kids AS (SELECT c AS id, count(*) AS n FROM done, unnest(done.children) AS c GROUP BY c),
    released AS (
        UPDATE tasks t SET waiting_on = t.waiting_on - kids.n FROM kids WHERE t.id = kids.id
    ),
    totals AS (
        UPDATE workflows w SET total_reward = w.total_reward + x.r, task_seconds = w.task_seconds + x.s,
            updated_at = now()
        FROM (SELECT workflow_id, sum(reward) AS r, sum(seconds) AS s FROM done GROUP BY workflow_id) x
        WHERE w.id = x.workflow_id
    )
    SELECT id, workflow_id, name, type, attempt, old_status, children FROM done
    """
)


def _passed_row(p: Passed) -> dict[str, Any]:
    o = p.outcome
    return {
        "id": o.task_id,
        "workflow_id": p.workflow_id,
        "attempt": p.attempt,
        "output": o.output,
        "reward": o.reward,
        "feedback": o.feedback,
        "executor_id": o.executor_id,
        "started_at": o.started_at,
        "finished_at": o.finished_at,
        "seconds": p.seconds,
    }


async def add_totals(conn: AsyncConnection, totals: dict[uuid.UUID, tuple[float, float]]) -> None:
    """Add (reward, task-seconds) to workflows (for failed attempts; passed ones add theirs when applied)."""
    if not totals:
        return
    await conn.execute(
        sa.text(
            """
            UPDATE workflows w SET total_reward = w.total_reward + v.r, task_seconds = w.task_seconds + v.s,
                updated_at = now()
            FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(id uuid, r float8, s float8) WHERE w.id = v.id
            """
        ),
        {"rows": rows_json({"id": k, "r": r, "s": sec} for k, (r, sec) in totals.items())},
    )


async def schedule_retries(conn: AsyncConnection, outcomes: Sequence[Outcome], not_before: Sequence[float]) -> None:
    if not outcomes:
        return
    await conn.execute(
        sa.text(
            f"""
            UPDATE tasks t SET status = 'pending', retries = t.retries + 1, not_before = to_timestamp(v.not_before),
                error = v.error, reward = v.reward, feedback_notes = v.feedback,
                executor_id = COALESCE(v.executor_id, t.executor_id), finished_at = to_timestamp(v.finished_at),
                lease_expires_at = NULL
            FROM {_OUTCOME_ROWS}
            WHERE t.id = v.id AND t.status IN ('queued', 'running')
            """
        ),
        _outcome_params(outcomes, not_before),
    )


async def mark_failed(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> None:
    if not outcomes:
        return
    await conn.execute(
        sa.text(
            f"""
            UPDATE tasks t SET status = 'failed', error = v.error, reward = v.reward,
                feedback_notes = v.feedback, executor_id = COALESCE(v.executor_id, t.executor_id),
                started_at = COALESCE(to_timestamp(v.started_at), t.started_at),
                finished_at = to_timestamp(v.finished_at),
                lease_expires_at = NULL
            FROM {_OUTCOME_ROWS}
            WHERE t.id = v.id AND t.status IN ('pending', 'queued', 'running')
            """
        ),
        _outcome_params(outcomes),
    )


async def cancel_descendants(conn: AsyncConnection, failed_ids: Sequence[int], now: float) -> list[Any]:
    """Cancel every task downstream of the failed ones. Linear in the edges walked."""
    if not failed_ids:
        return []
    rows = await conn.execute(
        sa.text(
            DOWNSTREAM
            + """
            UPDATE tasks t SET status = 'cancelled', finished_at = :now
            WHERE t.id IN (SELECT id FROM down) AND t.status = 'pending'
            RETURNING t.id, t.workflow_id, t.name, t.attempt
            """
        ),
        {"ids": list(failed_ids), "now": ts(now)},
    )
    return list(rows)


async def cancel_workflow(conn: AsyncConnection, workflow_id: uuid.UUID, now: float, reason: str) -> list[Any]:
    """Cancel every active task and the workflow. Returns the cancelled tasks' (id, name, attempt, old)."""
    rows = await conn.execute(
        sa.text(
            """
            UPDATE tasks t SET status = 'cancelled', finished_at = :now, lease_expires_at = NULL
            FROM (SELECT id, status AS old_status FROM tasks
                  WHERE workflow_id = :w AND status IN ('pending', 'queued', 'running')) o
            WHERE t.id = o.id
            RETURNING t.id, t.name, t.attempt, o.old_status
            """
        ),
        {"w": workflow_id, "now": ts(now)},
    )
    cancelled = list(rows)
    await finish_workflow(
        conn,
        workflow_id,
        WorkflowStatus.cancelled,
        now,
        output=None,
        error={"code": "cancelled", "message": reason},
    )
    return cancelled


async def abort_workflow(
    conn: AsyncConnection, workflow_id: uuid.UUID, now: float, task: str, message: str, failure: Any
) -> list[Any]:
    """Correction gave up: cancel whatever is active and fail the workflow with the reason."""
    rows = await conn.execute(
        sa.text(
            """
            UPDATE tasks t SET status = 'cancelled', finished_at = :now, lease_expires_at = NULL
            FROM (SELECT id, status AS old_status FROM tasks
                  WHERE workflow_id = :w AND status IN ('pending', 'queued', 'running')) o
            WHERE t.id = o.id
            RETURNING t.id, t.name, t.attempt, o.old_status
            """
        ),
        {"w": workflow_id, "now": ts(now)},
    )
    cancelled = list(rows)
    error = {
        "code": "aborted",
        "message": f"task {task!r} failed: {failure.error_class}: {failure.message} (correction: {message})",
        "task": task,
        "error": {"class": str(failure.error_class), "message": failure.message},
    }
    await finish_workflow(conn, workflow_id, WorkflowStatus.failed, now, output=None, error=error)
    return cancelled


async def finish_workflow(
    conn: AsyncConnection,
    workflow_id: uuid.UUID,
    status: WorkflowStatus,
    now: float,
    *,
    output: Any,
    error: dict[str, Any] | None,
) -> None:
    await conn.execute(
        sa.text(
            """
            UPDATE workflows SET status = :status, finished_at = :now, updated_at = :now,
                started_at = COALESCE(started_at, :now),
                output = CAST(:output AS jsonb), error = CAST(:error AS jsonb)
            WHERE id = :w
            """
        ),
        {
            "w": workflow_id,
            "status": status.value,
            "now": ts(now),
            "output": None if output is None else _json(output),
            "error": None if error is None else _json(error),
        },
    )


async def first_failure(conn: AsyncConnection, workflow_id: uuid.UUID) -> Any:
    return (
        await conn.execute(
            sa.text(
                "SELECT name, error FROM tasks WHERE workflow_id = :w AND status = 'failed' "
                "ORDER BY finished_at NULLS LAST, id LIMIT 1"
            ),
            {"w": workflow_id},
        )
    ).first()


async def output_context(conn: AsyncConnection, workflow_id: uuid.UUID) -> tuple[Any, dict[str, Any]]:
    """The workflow's output template and the task outputs it refers to (or the sinks' outputs)."""
    from dagsmith.templating import value_references

    template = (
        await conn.execute(sa.text("SELECT spec->'spec'->'output' FROM workflows WHERE id = :w"), {"w": workflow_id})
    ).scalar()
    if template is not None:
        return template, await outputs_of(conn, workflow_id, value_references(template))
    sinks = await conn.execute(
        sa.text(
            "SELECT name, output, status FROM tasks WHERE workflow_id = :w AND cardinality(children) = 0 "
            "ORDER BY id LIMIT :n"
        ),
        {"w": workflow_id, "n": MAX_DEFAULT_OUTPUT_SINKS + 1},  # one more: enough to know there are too many
    )
    return None, {r.name: {"output": r.output, "status": r.status} for r in sinks}


async def insert_events(
    conn: AsyncConnection,
    events: Events,
    queued: Sequence[tuple[int, int, dict[str, Any] | None, float | None]] = (),
    now: float = 0.0,
) -> None:
    """Write the round's events, mark ``queued`` tasks (task_id, attempt, resolved params or None,
    queue deadline or None) as published, and NOTIFY the event streams of the workflows that
    changed — one statement."""
    items = events.items
    if not items and not queued:
        return
    await conn.execute(
        sa.text(
            """
            WITH queued AS (
                UPDATE tasks t SET status = 'queued', attempt = q.attempt, queued_at = to_timestamp(:now),
                    not_before = NULL, resolved_params = COALESCE(q.resolved, t.resolved_params),
                    started_at = NULL, executor_id = NULL, started_delivery = NULL,
                    started_series = NULL, queue_deadline = to_timestamp(q.deadline)
                FROM jsonb_to_recordset(CAST(:queued AS jsonb))
                     AS q(id bigint, attempt int, resolved jsonb, deadline float8)
                -- Only what the round planned from: a task something else in the round changed
                -- (cancelled with its workflow) stays as it is, and its message is a stale attempt.
                WHERE t.id = q.id AND t.status = 'pending' AND t.attempt = q.attempt - 1
            ),
            inserted AS (
                INSERT INTO task_events (workflow_id, task_id, task_name, attempt, from_status, to_status,
                                         reason, data, at)
                SELECT w, t, n, a, f, s, r, d, to_timestamp(at)
                FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                     AS v(w uuid, t bigint, n text, a int, f text, s text, r text, d jsonb, at float8)
                RETURNING workflow_id
            )
            -- wake the event streams of the workflows that changed (one NOTIFY each)
            SELECT pg_notify(:channel, w::text) FROM (SELECT DISTINCT workflow_id AS w FROM inserted) changed
            """
        ),
        {
            "rows": rows_json(
                {
                    "w": e.workflow_id,
                    "t": e.task_id,
                    "n": e.task_name,
                    "a": e.attempt,
                    "f": e.from_status,
                    "s": e.to_status,
                    "r": e.reason,
                    "d": e.data,
                    "at": e.at if e.at is not None else time.time(),
                }
                for e in items
            ),
            "queued": rows_json({"id": i, "attempt": a, "resolved": r, "deadline": d} for i, a, r, d in queued),
            "now": now,
            "channel": CHANNEL_EVENTS,
        },
    )
    items.clear()


# --- Resync: what needs the controller even though no message arrived. ---


async def workflows_needing_attention(conn: AsyncConnection, now: float, limit: int = 1000) -> set[uuid.UUID]:
    rows = await conn.execute(
        sa.text(
            """
            (SELECT id FROM workflows WHERE status = 'pending' LIMIT :limit)
            UNION
            (SELECT id FROM workflows WHERE status IN ('pending', 'running') AND cancel_requested LIMIT :limit)
            UNION
            (SELECT DISTINCT workflow_id FROM tasks
             WHERE status = 'pending' AND waiting_on = 0 AND (not_before IS NULL OR not_before <= :now)
             LIMIT :limit)
            UNION
            (SELECT DISTINCT workflow_id FROM tasks WHERE status = 'running' AND lease_expires_at <= :now
             LIMIT :limit)
            UNION
            (SELECT DISTINCT workflow_id FROM tasks WHERE status = 'queued' AND queue_deadline <= :now
             LIMIT :limit)
            """
        ),
        {"now": ts(now), "limit": limit},
    )
    return {r[0] for r in rows}


async def next_timer(conn: AsyncConnection) -> float | None:
    """The earliest backoff or lease deadline (epoch seconds), if any."""
    row = (
        await conn.execute(
            sa.text(
                """
                SELECT LEAST(
                    (SELECT min(not_before) FROM tasks WHERE status = 'pending' AND waiting_on = 0),
                    (SELECT min(lease_expires_at) FROM tasks WHERE status = 'running'),
                    (SELECT min(queue_deadline) FROM tasks WHERE status = 'queued'))
                """
            )
        )
    ).scalar()
    return epoch(row)


async def recently_ended(conn: AsyncConnection, seconds: float, limit: int = 10_000) -> list[tuple[uuid.UUID, float]]:
    """Workflows cancelled or failed in the last ``seconds`` (newest first), with when: those whose
    task messages may still wait in a queue, of no use to anyone."""
    rows = await conn.execute(
        sa.text(
            """
            SELECT id, extract(epoch FROM finished_at) AS at FROM workflows
            WHERE status IN ('cancelled', 'failed') AND finished_at > now() - make_interval(secs => :seconds)
            ORDER BY finished_at DESC LIMIT :limit
            """
        ),
        {"seconds": seconds, "limit": limit},
    )
    return [(r.id, float(r.at)) for r in rows]


async def ended_workflows_of(conn: AsyncConnection, task_ids: Sequence[int]) -> list[tuple[uuid.UUID, float]]:
    """The cancelled or failed workflows among those of ``task_ids`` (attempts an executor says it
    runs), with when they ended."""
    rows = await conn.execute(
        sa.text(
            """
            SELECT DISTINCT w.id, extract(epoch FROM w.finished_at) AS at
            FROM tasks t JOIN workflows w ON w.id = t.workflow_id
            WHERE t.id = ANY(:ids) AND w.status IN ('cancelled', 'failed') AND w.finished_at IS NOT NULL
            """
        ),
        {"ids": list(task_ids)},
    )
    return [(r.id, float(r.at)) for r in rows]


async def silent_executors(conn: AsyncConnection, heartbeat_interval: float, window: float = 900.0) -> int:
    """Executors whose heartbeats stopped without a goodbye: silent for more than three heartbeat
    intervals, heard from within ``window`` seconds, and not stopping (an executor that shuts down
    says so in its last heartbeat). They died, hung, or lost the broker."""
    count = await conn.execute(
        sa.text(
            """
            SELECT count(*) FROM executors
            WHERE NOT stopping
              AND last_heartbeat < now() - make_interval(secs => :silent)
              AND last_heartbeat > now() - make_interval(secs => :window)
            """
        ),
        {"silent": heartbeat_interval * 3, "window": window},
    )
    return int(count.scalar_one())


async def record_heartbeat(conn: AsyncConnection, hb: Any, lease_ttl: float, grace: float, new_types: bool) -> int:
    """Upsert the executor's registry row and extend the leases of the tasks it runs."""
    await conn.execute(
        sa.text(
            """
            INSERT INTO executors (id, capabilities, version, hostname, pid, concurrency, running, stopping,
                                   last_heartbeat)
            VALUES (:id, CAST(:caps AS jsonb), :version, :hostname, :pid, :concurrency, :running, :stopping, now())
            ON CONFLICT (id) DO UPDATE SET capabilities = EXCLUDED.capabilities, version = EXCLUDED.version,
                running = EXCLUDED.running, stopping = EXCLUDED.stopping, last_heartbeat = now(),
                concurrency = EXCLUDED.concurrency
            """
        ),
        {
            "id": hb.executor_id,
            "caps": _json([c.model_dump() for c in hb.capabilities]),
            "version": hb.version,
            "hostname": hb.hostname,
            "pid": hb.pid,
            "concurrency": hb.concurrency,
            "running": len(hb.running),
            "stopping": hb.stopping,
        },
    )
    if new_types:
        await conn.execute(
            sa.text(
                """
                INSERT INTO task_types (type, capability, last_seen)
                SELECT v.type, v.cap, now() FROM unnest(CAST(:types AS text[]), CAST(:caps AS jsonb[])) AS v(type, cap)
                ON CONFLICT (type) DO UPDATE SET capability = EXCLUDED.capability, last_seen = now()
                """
            ),
            {
                "types": [c.type for c in hb.capabilities],
                "caps": [_json(c.model_dump()) for c in hb.capabilities],
            },
        )
    if hb.handed_off:
        # Finished attempts whose results are safely queued: their leases end (the evaluator and
        # the controller apply the results when they can; no executor failure can lose them now).
        await conn.execute(
            sa.text(
                """
                UPDATE tasks t SET lease_expires_at = NULL
                WHERE t.id IN (
                    SELECT id FROM tasks
                    WHERE (id, attempt) IN (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[])))
                      AND status = 'running'
                    ORDER BY id FOR UPDATE SKIP LOCKED)
                """
            ),
            {"ids": [r[0] for r in hb.handed_off], "attempts": [r[1] for r in hb.handed_off]},
        )
    if not hb.running:
        return 0
    result = await conn.execute(
        sa.text(
            """
            UPDATE tasks t SET lease_expires_at = LEAST(
                    COALESCE(t.started_at + make_interval(secs => t.timeout_s + :grace), 'infinity'),
                    now() + make_interval(secs => :ttl))
            WHERE t.id IN (
                SELECT id FROM tasks
                WHERE (id, attempt) IN (SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[])))
                  AND status = 'running'
                ORDER BY id FOR UPDATE SKIP LOCKED)
            """
        ),
        {
            "ids": [r[0] for r in hb.running],
            "attempts": [r[1] for r in hb.running],
            "ttl": lease_ttl,
            "grace": grace,
        },
    )
    return int(result.rowcount or 0)


async def known_task_types(conn: AsyncConnection) -> set[str]:
    return {r[0] for r in await conn.execute(sa.text("SELECT type FROM task_types"))}
