"""Applying a surgery plan in the current transaction, with its DAG revision row.

The caller holds the workflow row lock (as every status-changing transaction does), so a surgery
never races a reconciliation round; a crash mid-surgery rolls the whole change back.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from controller.store import DOWNSTREAM, Event, Events, Outcome, _json, ts
from controller.surgery import Operation, Plan, SurgeryConflict, SurgeryError, TaskSnapshot
from dagsmith.errors import Forbidden, NotFound

TERMINAL_WORKFLOW = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Applied:
    revision: int
    plan: Plan
    inserted_id: int | None = None


async def _served(conn: AsyncConnection, task_type: str, alive_window: float) -> bool:
    """Whether a live executor declares ``task_type``."""
    found = await conn.execute(
        sa.text(
            "SELECT EXISTS (SELECT 1 FROM executors WHERE NOT stopping "
            "AND last_heartbeat > now() - make_interval(secs => :window) "
            "AND capabilities @> jsonb_build_array(jsonb_build_object('type', CAST(:type AS text))))"
        ),
        {"window": alive_window, "type": task_type},
    )
    return bool(found.scalar())


async def snapshot(conn: AsyncConnection, workflow_id: uuid.UUID, name: str) -> TaskSnapshot:
    row = (
        await conn.execute(
            sa.text(
                """
                SELECT id, name, type, status, params, resolved_params, depends_on, spec,
                       attempt, retries, max_retries
                FROM tasks WHERE workflow_id = :w AND name = :n
                """
            ),
            {"w": workflow_id, "n": name},
        )
    ).first()
    if row is None:
        raise NotFound(f"the workflow has no task named {name!r}")
    return TaskSnapshot(
        row.id,
        row.name,
        row.type,
        row.status,
        row.params or {},
        list(row.depends_on),
        row.spec,
        row.attempt,
        row.retries,
        row.max_retries,
        row.resolved_params,
    )


async def names_like(conn: AsyncConnection, workflow_id: uuid.UUID, prefix: str) -> set[str]:
    """Task names starting with ``prefix`` (to pick a free name): an index range scan, not the whole DAG."""
    rows = await conn.execute(
        sa.text("SELECT name FROM tasks WHERE workflow_id = :w AND name >= :p AND name < :p || chr(1114111)"),
        {"w": workflow_id, "p": prefix},
    )
    return {r[0] for r in rows}


async def apply(
    conn: AsyncConnection,
    workflow_id: uuid.UUID,
    task: TaskSnapshot,
    plan: Plan,
    *,
    actor: str,
    reason: dict[str, Any],
    now: float,
    events: Events,
    outcome: Outcome | None = None,
    refs: frozenset[str] = frozenset(),
) -> Applied:
    """Apply ``plan`` to ``task``. ``outcome`` is the failed attempt that led here, if any;
    ``refs`` the tasks whose outputs the plan's new params read (:func:`check_references`)."""
    revision, workflow_status = (
        await conn.execute(
            sa.text(
                """
                UPDATE workflows SET dag_revision = dag_revision + 1, surgeries = surgeries + 1,
                    inserted_tasks = inserted_tasks + :n, updated_at = now()
                WHERE id = :w RETURNING dag_revision, status
                """
            ),
            {"w": workflow_id, "n": plan.inserts},
        )
    ).one()
    failed_attempt = _attempt_fields(outcome)
    # A surgery on a task that never ran re-runs nothing, so it spends none of the task's retries.
    rerun = 1 if task.attempt > 0 else 0
    inserted_id = None
    was_finished = task.status in ("failed", "cancelled")
    # A revived workflow gets back every task its end cancelled that can run again (an abort
    # cancels unrelated branches too); in a running workflow, those downstream of this task.
    whole = was_finished and workflow_status in TERMINAL_WORKFLOW
    match plan.operation:
        case Operation.retry | Operation.reroute:
            await conn.execute(
                sa.text(
                    f"""
                    UPDATE tasks SET status = 'pending', retries = retries + {rerun}, not_before = :nb,
                        type = COALESCE(:type, type), params = COALESCE(CAST(:params AS jsonb), params),
                        timeout_s = COALESCE(:timeout, timeout_s),
                        resolved_params = CASE WHEN :params IS NULL THEN resolved_params END,
                        refs = ARRAY(SELECT DISTINCT unnest(refs || CAST(:refs AS text[]))),
                        spec = spec || CAST(:edited AS jsonb),
                        lease_expires_at = NULL, {failed_attempt}
                    WHERE id = :id
                    """
                ),
                {
                    "id": task.id,
                    "nb": ts(now + plan.delay) if plan.delay else None,
                    "type": plan.new_type,
                    "timeout": plan.timeout,
                    "params": None if plan.params is None else _json(plan.params),
                    "refs": sorted(refs),
                    "edited": _json(_edited(task, plan)),
                    **_outcome_values(outcome),
                },
            )
            if was_finished:
                await _revive_cancelled(conn, task.id, whole)
        case Operation.insert:
            assert plan.inserted is not None
            inserted_id = await _insert_before(conn, workflow_id, task, plan.inserted, revision, refs)
            await conn.execute(
                sa.text(
                    f"""
                    UPDATE tasks SET status = 'pending', retries = retries + {rerun}, depends_on = ARRAY[:name],
                        waiting_on = 1, refs = array_append(refs, :name), resolved_params = NULL,
                        -- The newest surgery wins: the repair's output replaces what it names, edited or not.
                        spec = (spec - 'editedParams') || jsonb_build_object('repairedBy', :name),
                        lease_expires_at = NULL,
                        not_before = NULL, {failed_attempt}
                    WHERE id = :id
                    """
                ),
                {"id": task.id, "name": plan.inserted["name"], **_outcome_values(outcome)},
            )
            if was_finished:
                await _revive_cancelled(conn, task.id, whole)
        case Operation.skip:
            if was_finished:
                await _revive_cancelled(conn, task.id, whole)
            await conn.execute(
                sa.text(
                    f"""
                    UPDATE tasks SET status = 'skipped', output = CAST(:output AS jsonb), lease_expires_at = NULL,
                        {failed_attempt}
                    WHERE id = :id
                    """
                ),
                {"id": task.id, "output": _json(plan.output), **_outcome_values(outcome, finished=now)},
            )
            await conn.execute(
                sa.text(
                    "UPDATE tasks SET waiting_on = waiting_on - 1 "
                    "WHERE id = ANY(SELECT unnest(children) FROM tasks WHERE id = :id)"
                ),
                {"id": task.id},
            )
        case Operation.abort:
            await conn.execute(
                sa.text(
                    f"UPDATE tasks SET status = 'failed', lease_expires_at = NULL, {failed_attempt} WHERE id = :id"
                ),
                {"id": task.id, **_outcome_values(outcome, finished=now)},
            )
    if was_finished and workflow_status in TERMINAL_WORKFLOW and plan.operation != Operation.abort:
        await conn.execute(
            sa.text(
                "UPDATE workflows SET status = 'running', finished_at = NULL, error = NULL, output = NULL, "
                "cancel_requested = false WHERE id = :w"
            ),
            {"w": workflow_id},
        )
        events.add(
            Event(workflow_id, "running", from_status=workflow_status, reason=f"revived by surgery r{revision}", at=now)
        )
    await conn.execute(
        sa.text(
            """
            INSERT INTO dag_revisions
                (workflow_id, revision, parent_revision, actor, operation, task_name, reason, diff)
            VALUES (:w, :r, :p, :actor, :op, :task, CAST(:reason AS jsonb), CAST(:diff AS jsonb))
            """
        ),
        {
            "w": workflow_id,
            "r": revision,
            "p": revision - 1,
            "actor": actor,
            "op": plan.operation.value,
            "task": task.name,
            "reason": _json(reason),
            "diff": _json(plan.diff),
        },
    )
    to_status = {Operation.skip: "skipped", Operation.abort: "failed"}.get(plan.operation, "pending")
    surgery = f"surgery r{revision}: {plan.operation.value} by {actor}"
    from_status = task.status
    data: dict[str, Any] = {
        "revision": revision,
        "operation": plan.operation.value,
        "actor": actor,
        "reason": reason,
        "diff": plan.diff,
    }
    if outcome is not None:
        # The attempt that just failed: the transition is from running (its start may have been
        # recorded in this very round), and says why, as a spec retry's transition does.
        from_status = "running" if task.status in ("queued", "running") else task.status
        error_class = (outcome.error or {}).get("class", "failed")
        surgery = f"attempt {task.attempt} failed ({error_class}); {surgery}"
        data["error"] = outcome.error
    events.add(
        Event(workflow_id, to_status, task.id, task.name, task.attempt, from_status, at=now, reason=surgery, data=data)
    )
    return Applied(revision, plan, inserted_id)


def _edited(task: TaskSnapshot, plan: Plan) -> dict[str, Any]:
    """The spec's ``editedParams`` after ``plan``: the params set by surgery, which the output of a
    repair task inserted earlier no longer replaces (the newest change wins)."""
    if not plan.edited:
        return {}
    return {"editedParams": sorted({*(task.spec.get("editedParams") or []), *plan.edited})}


def _attempt_fields(outcome: Outcome | None) -> str:
    """SET clauses that record the failed attempt on the task (nothing for a manual surgery)."""
    if outcome is None:
        return "finished_at = COALESCE(to_timestamp(CAST(:finished AS float8)), finished_at)"
    return (
        "error = CAST(:error AS jsonb), reward = :reward, feedback_notes = CAST(:feedback AS jsonb), "
        "executor_id = COALESCE(:executor, executor_id), finished_at = to_timestamp(CAST(:finished AS float8)), "
        "started_at = COALESCE(to_timestamp(CAST(:started AS float8)), started_at)"
    )


def _outcome_values(outcome: Outcome | None, finished: float | None = None) -> dict[str, Any]:
    if outcome is None:
        return {"finished": finished}
    return {
        "error": None if outcome.error is None else _json(outcome.error),
        "reward": outcome.reward,
        "feedback": None if outcome.feedback is None else _json(outcome.feedback),
        "executor": outcome.executor_id,
        "finished": outcome.finished_at,
        "started": outcome.started_at,
    }


async def _insert_before(
    conn: AsyncConnection,
    workflow_id: uuid.UUID,
    task: TaskSnapshot,
    inserted: dict[str, Any],
    revision: int,
    refs: frozenset[str],
) -> int:
    new_id = (await conn.execute(sa.text("SELECT nextval(pg_get_serial_sequence('tasks', 'id'))"))).scalar_one()
    spec = {
        "name": inserted["name"],
        "type": inserted["type"],
        "params": inserted["params"],
        "dependsOn": task.depends_on,
        "insertedBefore": task.name,
    }
    for key in ("secrets", "literalParams"):
        if inserted.get(key):
            spec[key] = inserted[key]
    await conn.execute(
        sa.text(
            """
            INSERT INTO tasks (id, workflow_id, name, type, spec, params, depends_on, children, refs, waiting_on,
                               inserted_by_revision)
            SELECT :id, :w, :name, :type, CAST(:spec AS jsonb), CAST(:params AS jsonb), CAST(:deps AS text[]),
                   -- The failed task's references: the inserted task takes its params (templates
                   -- too, if it never got as far as resolving them) and has the same dependencies.
                   ARRAY[CAST(:child AS bigint)],
                   ARRAY(SELECT DISTINCT unnest((SELECT refs FROM tasks WHERE id = :child) || CAST(:refs AS text[]))),
                   (SELECT count(*) FROM tasks p WHERE p.workflow_id = :w AND p.name = ANY(CAST(:deps AS text[]))
                    AND p.status NOT IN ('succeeded', 'skipped')),
                   :rev
            """
        ),
        {
            "id": new_id,
            "w": workflow_id,
            "name": inserted["name"],
            "type": inserted["type"],
            "spec": _json(spec),
            "params": _json(inserted["params"]),
            "deps": task.depends_on,
            "child": task.id,
            "rev": revision,
            "refs": sorted(refs),
        },
    )
    # The failed task's parents now point at the inserted task instead.
    await conn.execute(
        sa.text(
            "UPDATE tasks SET children = array_replace(children, CAST(:old AS bigint), CAST(:new AS bigint)) "
            "WHERE workflow_id = :w AND name = ANY(CAST(:deps AS text[]))"
        ),
        {"w": workflow_id, "old": task.id, "new": new_id, "deps": task.depends_on},
    )
    return int(new_id)


async def _revive_cancelled(conn: AsyncConnection, task_id: int, whole_workflow: bool) -> None:
    """A finished task runs again (or is skipped): cancelled tasks become pending again — those
    that can run (:func:`controller.surgery.revivable`), downstream of it or, when the workflow
    itself is revived, anywhere in it."""
    from controller.surgery import revivable

    downstream = (
        DOWNSTREAM
        + """
        SELECT t.id, t.name, t.depends_on FROM tasks t WHERE t.id IN (SELECT id FROM down)
        AND t.status = 'cancelled'
        """
    )
    anywhere = """
        SELECT t.id, t.name, t.depends_on FROM tasks t
        WHERE t.workflow_id = (SELECT workflow_id FROM tasks WHERE id = :id) AND t.status = 'cancelled'
        AND t.id <> :id
    """
    rows = (
        await conn.execute(sa.text(anywhere if whole_workflow else downstream), {"id": task_id, "ids": [task_id]})
    ).all()
    if not rows:
        return
    root = (await conn.execute(sa.text("SELECT workflow_id, name FROM tasks WHERE id = :id"), {"id": task_id})).one()
    cancelled = {r.name: list(r.depends_on) for r in rows}
    deps = sorted({d for ds in cancelled.values() for d in ds} - cancelled.keys() - {root.name})
    found = await conn.execute(
        sa.text("SELECT name, status FROM tasks WHERE workflow_id = :w AND name = ANY(:names)"),
        {"w": root.workflow_id, "names": deps},
    )
    status: dict[str, str] = {r.name: r.status for r in found}
    back = revivable(root.name, cancelled, status)
    await conn.execute(
        sa.text(
            """
            UPDATE tasks t SET status = 'pending', finished_at = NULL,
                waiting_on = (SELECT count(*) FROM tasks p WHERE p.workflow_id = t.workflow_id
                              AND p.name = ANY(t.depends_on) AND p.status NOT IN ('succeeded', 'skipped'))
            WHERE t.workflow_id = :w AND t.name = ANY(:names) AND t.status = 'cancelled'
            """
        ),
        {"w": root.workflow_id, "names": sorted(back)},
    )


async def manual(
    conn: AsyncConnection,
    workflow_id: uuid.UUID,
    *,
    operation: str,
    task_name: str,
    actor: str,
    namespaces: list[str] | None,
    now: float,
    params: dict[str, Any] | None = None,
    new_type: str | None = None,
    name: str | None = None,
    delay: float = 0.0,
    message: str = "",
    max_tasks: int | None = None,
    alive_window: float = 15.0,
    may_move_secrets: bool = True,
) -> Applied:
    """A surgery a user asked for. Manual surgeries are recorded (and counted) like the policy's,
    but the correction budgets do not block them: a person decided. ``max_tasks`` still bounds
    the workflow's size, as at submission.

    A queued task can be operated on only while no live executor (one that heartbeated within
    ``alive_window`` seconds) runs its type: its message stays in the queue, and an executor
    there could take it at any moment and run the old attempt beside the new one."""
    from controller import store
    from controller.db import CHANNEL_WORKFLOWS
    from controller.queries import get_workflow
    from controller.surgery import insert_before, repair_prefix, reroute, retry, skip

    await get_workflow(conn, workflow_id, namespaces)  # 404 for workflows the caller cannot see
    await store.lock_workflows(conn, [workflow_id])
    workflow = (
        await conn.execute(
            sa.text("SELECT status, cancel_requested, spec->'spec'->'params' AS params FROM workflows WHERE id = :w"),
            {"w": workflow_id},
        )
    ).one()
    if workflow.status == "cancelled" or workflow.cancel_requested:
        # Cancelling is the user's decision, and it is final (a revived run would also outlive a
        # `spec.cancel: true` its custom resource still says): to run it again, submit it again.
        raise SurgeryConflict("the workflow was cancelled: it cannot be operated on (submit it again to re-run it)")
    task = await snapshot(conn, workflow_id, task_name)
    if task.status == "queued" and await _served(conn, task.type, alive_window):
        raise SurgeryConflict(
            f"task {task.name!r} is queued and a live executor runs {task.type!r}, so it may start at any moment: "
            "wait for it to finish, or cancel the workflow"
        )
    # What a task with secret params receives them with — its type, its other params (a URL),
    # or an inserted task's output, which becomes its params — is the submitter's decision or an
    # admin's, not any writer's: each could send the secrets somewhere new.
    # The same holds upstream: a task's output can become a secret-bearing task's params (a URL
    # read by a template, a repair task's output merged in), so changing what a task downstream of
    # which secrets are sent produces is as much a redirect.
    redirects = operation in ("replace", "insert") or (operation == "retry" and bool(params))
    if redirects and not may_move_secrets:
        what = f"{operation}{' with new params' if operation == 'retry' else ''}"
        if task.secrets:
            raise Forbidden(
                f"task {task.name!r} has secret params ({', '.join(task.secrets)}): {what} could send them "
                "elsewhere, so it needs the admin scope (a plain retry or a skip does not)"
            )
        holder = await _secret_holder_downstream(conn, task.id)
        if holder is not None:
            raise Forbidden(
                f"task {holder!r}, downstream of {task.name!r}, has secret params: {what} of {task.name!r} could "
                f"change where {holder!r} sends them, so it needs the admin scope (a plain retry or a skip does not)"
            )
    await _check_upstream_can_finish(conn, workflow_id, task)
    refs = await check_references(conn, workflow_id, task, params or {}, workflow.params or {})
    if operation == "retry":
        plan = retry(task, delay=delay, params=params, manual=True)
    elif operation == "replace":
        if not new_type:
            raise SurgeryError("replace needs the new task type")
        plan = reroute(task, new_type, params=params, manual=True)
    elif operation == "insert":
        if not new_type:
            raise SurgeryError("insert needs the type of the task to insert")
        if max_tasks is not None:
            total = (
                await conn.execute(sa.text("SELECT n_total FROM workflows WHERE id = :w"), {"w": workflow_id})
            ).scalar_one()
            if total >= max_tasks:
                raise SurgeryConflict(
                    f"the workflow has {total} tasks, the most one may have (DAGSMITH_MAX_TASKS): "
                    "nothing can be inserted"
                )
        taken = await names_like(conn, workflow_id, name or repair_prefix(task.name))
        plan = insert_before(task, task_type=new_type, existing=taken, params=params, name=name, manual=True)
    elif operation == "skip":
        plan = skip(task, manual=True)
    else:
        raise SurgeryError(f"unknown operation {operation!r}: use retry, replace, insert or skip")
    from controller.correct import close_unresolved

    await close_unresolved(conn, f"superseded by {actor}", now, task_id=task.id)
    events = Events()
    applied = await apply(
        conn,
        workflow_id,
        task,
        plan,
        actor=actor,
        reason={"by": actor, "message": message},
        now=now,
        events=events,
        refs=refs,
    )
    await store.insert_events(conn, events)
    await conn.execute(sa.select(sa.func.pg_notify(CHANNEL_WORKFLOWS, str(workflow_id))))
    return applied


async def check_references(
    conn: AsyncConnection,
    workflow_id: uuid.UUID,
    task: TaskSnapshot,
    params: dict[str, Any],
    workflow_params: dict[str, Any],
) -> frozenset[str]:
    """The tasks whose outputs the templates in a surgery's new ``params`` read, checked as at
    submission: valid syntax, workflow params that exist, tasks upstream of ``task`` (whose
    dependencies an inserted task shares). The task then loads their outputs to render."""
    from dagsmith.templating import iter_templates
    from dagsmith.validation import template_problems

    wanted: dict[str, str] = {}  # task name -> the first param path that reads it
    for path, template in iter_templates(params, "params"):
        found, problems = template_problems(template, path, workflow_params)
        if problems:
            raise SurgeryError(f"{problems[0]['path']}: {problems[0]['message']}")
        assert found is not None  # parsed, since it has no problem
        for ref in sorted(found.tasks):
            wanted.setdefault(ref, path)
    if not wanted:
        return frozenset()
    rows = await conn.execute(
        sa.text(
            """
            WITH RECURSIVE up(name) AS (
                SELECT unnest(CAST(:deps AS text[]))
                UNION
                SELECT unnest(t.depends_on) FROM tasks t JOIN up ON t.workflow_id = :w AND t.name = up.name
            )
            SELECT name FROM up WHERE name = ANY(:wanted)
            """
        ),
        {"w": workflow_id, "deps": task.depends_on, "wanted": sorted(wanted)},
    )
    upstream = {r.name for r in rows}
    for ref, path in sorted(wanted.items()):
        if ref not in upstream:
            raise SurgeryError(
                f"{path}: refers to tasks.{ref}, which is not upstream of {task.name!r} "
                "(a task can read only the outputs of tasks it depends on, directly or not)"
            )
    return frozenset(wanted)


async def _secret_holder_downstream(conn: AsyncConnection, task_id: int) -> str | None:
    """A task downstream of ``task_id`` with secret params (the first by name), or None."""
    row = await conn.execute(
        sa.text(
            DOWNSTREAM
            + """
            SELECT t.name FROM tasks t WHERE t.id IN (SELECT id FROM down)
            AND jsonb_array_length(COALESCE(t.spec->'secrets', '[]'::jsonb)) > 0
            ORDER BY t.name LIMIT 1
            """
        ),
        {"ids": [task_id]},
    )
    return row.scalar()


async def _check_upstream_can_finish(conn: AsyncConnection, workflow_id: uuid.UUID, task: TaskSnapshot) -> None:
    """Refuse to bring back a task whose own dependency failed or was cancelled: it would wait for
    ever, and so would its workflow. Operating on that dependency brings this task back too."""
    if not task.depends_on:
        return
    rows = await conn.execute(
        sa.text(
            "SELECT name, status FROM tasks WHERE workflow_id = :w AND name = ANY(:deps) "
            "AND status IN ('failed', 'cancelled') ORDER BY name"
        ),
        {"w": workflow_id, "deps": task.depends_on},
    )
    dead = [(r.name, r.status) for r in rows]
    if dead:
        listed = ", ".join(f"{name!r} ({status})" for name, status in dead)
        raise SurgeryConflict(
            f"task {task.name!r} depends on {listed}, so it could never start; "
            f"operate on {dead[0][0]!r} instead (retrying or skipping it brings {task.name!r} back too)"
        )


async def history(conn: AsyncConnection, workflow_id: uuid.UUID) -> list[Any]:
    rows = await conn.execute(
        sa.text(
            "SELECT revision, parent_revision, actor, operation, task_name, reason, diff, created_at "
            "FROM dag_revisions WHERE workflow_id = :w ORDER BY revision"
        ),
        {"w": workflow_id},
    )
    return list(rows)
