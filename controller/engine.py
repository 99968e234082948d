"""The reconciliation round: the I/O shell around :mod:`controller.reconcile`.

One round = one transaction over a batch of inbound messages and the workflows they touch:
lock the workflows, apply started/evaluated/dead-lettered attempts, then plan each workflow and
dispatch what became ready. Task messages are published (with confirms) *before* the commit, so a
crash can at worst publish an attempt twice — never lose one. Messages are acked after the commit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller import metrics, store
from controller.correct import Corrector, RoundBudget, close_fixed
from controller.db import in_transaction
from controller.dispatch import Prepared, Publisher, prepare, template_context
from controller.reconcile import (
    CancelWorkflow,
    Dispatch,
    FailTask,
    Failure,
    FinishWorkflow,
    Ignore,
    ScheduleRetry,
    StartWorkflow,
    Succeed,
    accepts_result,
    on_failure,
    on_result,
    plan,
)
from controller.states import TERMINAL_WORKFLOW, TaskStatus, WorkflowStatus
from controller.store import Event, Events, Outcome, TaskRow, WorkflowRow
from dagsmith.durations import parse_duration
from dagsmith.errors import ErrorClass, TemplateError
from dagsmith.messages import EvaluatedMessage, StartedMessage, TaskMessage
from dagsmith.settings import Settings
from dagsmith.spec import CorrectionMode
from dagsmith.templating import render

log = structlog.get_logger(__name__)


@dataclass
class Inbound:
    evaluated: list[EvaluatedMessage] = field(default_factory=list)
    started: list[StartedMessage] = field(default_factory=list)
    dead: list[tuple[TaskMessage, int]] = field(default_factory=list)  # (message, deliveries)
    dirty: set[uuid.UUID] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.evaluated) + len(self.started) + len(self.dead) + len(self.dirty)


@dataclass
class Successes:
    """The round's successes, decided but not yet written: they go to the database together with
    the read that follows them (:func:`store.apply_and_refresh`)."""

    outcomes: list[Outcome] = field(default_factory=list)
    corrected: set[int] = field(default_factory=set)  # succeeded on a corrected (later) attempt
    totals: dict[uuid.UUID, tuple[float, float]] = field(default_factory=dict)  # (reward, task-seconds)


@dataclass
class RoundResult:
    again: set[uuid.UUID] = field(default_factory=set)  # workflows with more to do right away
    cancelled: set[uuid.UUID] = field(default_factory=set)  # tell executors to stop these
    dispatched: int = 0
    applied: int = 0


class Engine:
    def __init__(
        self, db: AsyncEngine, publisher: Publisher, settings: Settings, corrector: Corrector | None = None
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.settings = settings
        self.corrector = corrector

    async def run_round(self, inbound: Inbound) -> RoundResult:
        started = time.perf_counter()
        result = await in_transaction(self.db, lambda conn: self._round(conn, inbound), what="reconcile")
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
        metrics.ROUND_SIZE.observe(len(inbound))
        return result

    async def _round(self, conn: AsyncConnection, inbound: Inbound) -> RoundResult:
        now = time.time()
        out = RoundResult()
        events = Events()
        touched = set(inbound.dirty)
        touched |= {uuid.UUID(m.result.task.workflow_id) for m in inbound.evaluated}
        touched |= {uuid.UUID(m.workflow_id) for m in inbound.started}
        touched |= {uuid.UUID(m.workflow_id) for m, _ in inbound.dead}
        reported = [m.result.task.task_id for m in inbound.evaluated] + [m.task_id for m, _ in inbound.dead]
        workflows, loaded = await store.lock_and_load(conn, touched, reported)
        live = {wid for wid, wf in workflows.items() if wf.status not in TERMINAL_WORKFLOW}

        for task_id in await self._apply_started(conn, inbound.started, live, events):
            if task_id in loaded:  # its start report came in this round too: it is running now
                loaded[task_id] = replace(loaded[task_id], status=TaskStatus.running)
        budget = RoundBudget()
        successes = Successes()
        out.applied = await self._apply_results(
            conn, inbound, loaded, workflows, live, events, now, out, budget, successes
        )

        released, workflows, candidates = await store.apply_and_refresh(
            conn,
            successes.outcomes,
            successes.totals,
            {w: workflows[w] for w in live},
            now,
            self.settings.controller_batch_size * 4,
        )
        ready_since = await self._after_successes(conn, successes, released, now)
        by_workflow: dict[uuid.UUID, list[TaskRow]] = defaultdict(list)
        for task in candidates:
            by_workflow[task.workflow_id].append(task)

        to_start: list[uuid.UUID] = []
        to_dispatch: list[Prepared] = []
        failures: list[tuple[TaskRow, ScheduleRetry | FailTask, EvaluatedMessage | None]] = []
        corrections: list[tuple[WorkflowRow, TaskRow, Failure]] = []
        for wid in sorted(live):
            workflow = workflows[wid]
            tasks = by_workflow.get(wid, [])
            if len(tasks) >= self.settings.controller_batch_size * 4:
                out.again.add(wid)
            rows = {t.id: t for t in tasks}
            for action in plan(workflow.view(), [t.view() for t in tasks], now):
                match action:
                    case StartWorkflow():
                        to_start.append(wid)
                    case Dispatch(task_id=task_id, attempt=attempt):
                        task = rows[task_id]
                        try:
                            to_dispatch.append(await self._prepare(conn, workflow, task, attempt))
                        except TemplateError as exc:
                            failures.append(
                                (
                                    task,
                                    FailTask(task_id, attempt, Failure(ErrorClass.invalid_input, str(exc))),
                                    None,
                                )
                            )
                            out.again.add(wid)
                    case ScheduleRetry() | FailTask():
                        metrics.LEASES_EXPIRED.inc()
                        if self._correcting(workflow):
                            corrections.append((workflow, rows[action.task_id], action.failure))
                        else:
                            failures.append((rows[action.task_id], action, None))
                        out.again.add(wid)
                    case CancelWorkflow():
                        await self._cancel(conn, workflow, now, events)
                        out.cancelled.add(wid)
                    case FinishWorkflow(status=status):
                        await self._finish(conn, workflow, status, now, events)

        await store.start_workflows(conn, to_start, now, events)
        for workflow, task, failure in corrections:
            await self._correct(conn, workflow, task, failure, None, now, events, out, budget)
        if failures:
            await self._apply_failures(conn, failures, now, events)
        for p in to_dispatch:
            events.add(Event(p.task.workflow_id, "queued", p.task.id, p.task.name, p.attempt, "pending", at=now))

        async def write() -> None:
            queued = [(p.task.id, p.attempt, p.resolved, _queue_deadline(p.task, now)) for p in to_dispatch]
            await store.insert_events(conn, events, queued, now)

        # The broker's confirms and the last writes overlap; both finish before the commit.
        await asyncio.gather(self.publisher.publish(to_dispatch), write())
        for p in to_dispatch:
            metrics.TASKS_DISPATCHED.labels(p.task.type).inc()
            if p.task.id in ready_since:
                metrics.FINISH_TO_DISPATCH.observe(max(time.time() - ready_since[p.task.id], 0.0))
        out.dispatched = len(to_dispatch)
        return out

    async def _prepare(self, conn: AsyncConnection, workflow: WorkflowRow, task: TaskRow, attempt: int) -> Prepared:
        outputs = await store.outputs_of(conn, workflow.id, task.refs) if task.refs else {}
        return prepare(task, attempt, workflow, outputs, self.settings.max_template_bytes)

    async def _apply_started(
        self, conn: AsyncConnection, started: list[StartedMessage], live: set[uuid.UUID], events: Events
    ) -> set[int]:
        """Mark reported starts; returns the ids of the tasks that became running."""
        items = [
            (m.task_id, m.attempt, m.executor_id, m.started_at) for m in started if uuid.UUID(m.workflow_id) in live
        ]
        rows = await store.mark_running(conn, items, self.settings.lease_ttl, self.settings.lease_grace)
        dispatched_at = {(m.task_id, m.attempt): m for m in started}
        for task_id, wid, name, attempt, old, at in rows:
            if old == "queued":
                events.add(Event(wid, "running", task_id, name, attempt, "queued", at=at))
                m = dispatched_at.get((task_id, attempt))
                if m is not None and m.dispatched_at:
                    metrics.DISPATCH_TO_START.labels(m.type).observe(max(at - m.dispatched_at, 0.0))
        return {task_id for task_id, *_ in rows}

    async def _apply_results(
        self,
        conn: AsyncConnection,
        inbound: Inbound,
        tasks: dict[int, TaskRow],
        workflows: dict[uuid.UUID, WorkflowRow],
        live: set[uuid.UUID],
        events: Events,
        now: float,
        out: RoundResult,
        budget: RoundBudget,
        successes: Successes,
    ) -> int:
        """Decide on every evaluated and dead-lettered attempt. Failures and corrections are written
        here; successes are collected in ``successes`` for the caller to write."""
        if not inbound.evaluated and not inbound.dead:
            return 0
        seen: set[tuple[int, int]] = set()
        decided: list[tuple[TaskRow, Succeed | ScheduleRetry | FailTask, EvaluatedMessage | None]] = []
        totals: dict[uuid.UUID, list[float]] = defaultdict(lambda: [0.0, 0.0])
        corrected = 0
        for m in inbound.evaluated:
            ref = m.result.task
            task = tasks.get(ref.task_id)
            if task is None or task.workflow_id not in live or (ref.task_id, ref.attempt) in seen:
                metrics.RESULTS_IGNORED.labels("duplicate_or_gone").inc()
                continue
            seen.add((ref.task_id, ref.attempt))
            failure = None
            if not m.evaluation.passed:
                err = m.evaluation.error or m.result.error
                failure = (
                    Failure(err.error_class, err.message, err.details)
                    if err
                    else Failure(ErrorClass.unknown, "failed without an error")
                )
            action = on_result(task.view(), ref.attempt, m.evaluation.passed, failure, now)
            if isinstance(action, Ignore):
                metrics.RESULTS_IGNORED.labels("stale").inc()
                log.debug("result ignored", task_id=action.task_id, attempt=action.attempt, reason=action.reason)
                continue
            if self.corrector is not None:
                self.corrector.rates.observe(task.type, failure is not None)
            totals[task.workflow_id][0] += m.evaluation.reward
            totals[task.workflow_id][1] += m.result.duration
            metrics.RUN_SECONDS.labels(task.type).observe(m.result.duration)
            if task.status == "queued":
                events.add(
                    Event(
                        task.workflow_id,
                        "running",
                        task.id,
                        task.name,
                        ref.attempt,
                        "queued",
                        at=m.result.started_at,
                        data={"executor": m.result.executor_id},
                    )
                )
                if ref.dispatched_at:
                    metrics.DISPATCH_TO_START.labels(task.type).observe(
                        max(m.result.started_at - ref.dispatched_at, 0.0)
                    )
            workflow = workflows[task.workflow_id]
            if failure is not None and self._correcting(workflow):
                await self._correct(conn, workflow, task, failure, m, now, events, out, budget)
                corrected += 1
                continue
            assert isinstance(action, Succeed | FailTask | ScheduleRetry)
            decided.append((task, action, m))
        for msg, deliveries in inbound.dead:
            task = tasks.get(msg.task_id)
            metrics.DEAD_LETTERS.inc()
            if task is None or task.workflow_id not in live or accepts_result(task.view(), msg.attempt) is not None:
                continue
            failure = Failure(
                ErrorClass.poison,
                f"the task message was delivered {deliveries} times and crashed or was rejected by an "
                "executor each time; it was dead-lettered",
                {"deliveries": deliveries},
            )
            workflow = workflows[task.workflow_id]
            if self._correcting(workflow):
                await self._correct(conn, workflow, task, failure, None, now, events, out, budget)
                corrected += 1
                continue
            decided.append((task, on_failure(task.view(), failure, now), None))
        successes.totals = {w: (r, sec) for w, (r, sec) in totals.items()}
        await self._apply_decisions(conn, decided, now, events, successes)
        return len(decided) + corrected

    def _correcting(self, workflow: WorkflowRow) -> bool:
        return self.corrector is not None and workflow.correction.mode != CorrectionMode.off

    async def _correct(
        self,
        conn: AsyncConnection,
        workflow: WorkflowRow,
        task: TaskRow,
        failure: Failure,
        m: EvaluatedMessage | None,
        now: float,
        events: Events,
        out: RoundResult,
        budget: RoundBudget,
    ) -> None:
        assert self.corrector is not None
        outcome = _outcome(task, m, _error_json(failure), now)
        result = await self.corrector.correct(conn, workflow, task, failure, outcome, now, events, budget)
        out.again.add(workflow.id)  # dispatch what the surgery made ready, in the next round
        if result.aborted:
            out.cancelled.add(workflow.id)
            metrics.WORKFLOWS_FINISHED.labels("failed").inc()

    async def _apply_decisions(
        self,
        conn: AsyncConnection,
        decided: list[tuple[TaskRow, Succeed | ScheduleRetry | FailTask, EvaluatedMessage | None]],
        now: float,
        events: Events,
        successes: Successes,
    ) -> None:
        for task, action, m in decided:
            if isinstance(action, Succeed) and m is not None:
                outcome = _outcome(task, m, None, now)
                successes.outcomes.append(outcome)
                if task.attempt > 1:
                    successes.corrected.add(task.id)
                events.add(
                    Event(
                        task.workflow_id,
                        "succeeded",
                        task.id,
                        task.name,
                        action.attempt,
                        "running",
                        at=outcome.finished_at,
                        data={"reward": m.evaluation.reward},
                    )
                )
                metrics.TASKS_COMPLETED.labels(task.type, "succeeded").inc()
        # Failures first: they touch other rows than the successes (a failure cancels only pending
        # descendants), and the successes then go out together with the round's read.
        await self._apply_failures(
            conn, [(t, a, m) for t, a, m in decided if isinstance(a, ScheduleRetry | FailTask)], now, events
        )

    async def _after_successes(
        self, conn: AsyncConnection, successes: Successes, released: list[tuple[int, list[int]]], now: float
    ) -> dict[int, float]:
        """Close the correction decisions the successes proved right; returns when each newly
        released child became ready (for the finish-to-dispatch metric)."""
        by_id = {o.task_id: o for o in successes.outcomes}
        if self.corrector is not None and successes.corrected:
            # Only a corrected task can have an open decision, and a correction always means a new
            # attempt: first attempts (nearly every success) skip this statement.
            fixed = []
            for task_id, _ in released:
                if task_id not in successes.corrected:
                    continue
                o = by_id[task_id]
                fixed.append((task_id, max(o.finished_at - (o.started_at or o.finished_at), 0.0), o.finished_at))
            await close_fixed(conn, fixed)
        ready_since: dict[int, float] = {}
        for task_id, kids in released:
            finished = by_id[task_id].finished_at if task_id in by_id else now
            for kid in kids:
                ready_since[kid] = max(ready_since.get(kid, 0.0), finished)
        return ready_since

    async def _apply_failures(
        self,
        conn: AsyncConnection,
        items: list[tuple[TaskRow, ScheduleRetry | FailTask, EvaluatedMessage | None]],
        now: float,
        events: Events,
    ) -> None:
        retries: list[Outcome] = []
        not_before: list[float] = []
        failed: list[Outcome] = []
        for task, action, m in items:
            error = _error_json(action.failure)
            outcome = _outcome(task, m, error, now)
            old = "running" if task.status in ("queued", "running") else str(task.status)
            if isinstance(action, ScheduleRetry):
                retries.append(outcome)
                not_before.append(action.not_before)
                events.add(
                    Event(
                        task.workflow_id,
                        "pending",
                        task.id,
                        task.name,
                        action.attempt,
                        old,
                        at=outcome.finished_at,
                        reason=f"retry after {action.failure.error_class}",
                        data={"error": error, "not_before": action.not_before},
                    )
                )
                metrics.TASKS_COMPLETED.labels(task.type, "retried").inc()
            else:
                failed.append(outcome)
                events.add(
                    Event(
                        task.workflow_id,
                        "failed",
                        task.id,
                        task.name,
                        action.attempt,
                        old,
                        at=outcome.finished_at,
                        reason=str(action.failure.error_class),
                        data={"error": error},
                    )
                )
                metrics.TASKS_COMPLETED.labels(task.type, "failed").inc()
            log.info(
                "task attempt failed",
                workflow_id=str(task.workflow_id),
                task_id=task.id,
                attempt=action.attempt,
                task=task.name,
                error_class=str(action.failure.error_class),
                retry=isinstance(action, ScheduleRetry),
            )
        await store.schedule_retries(conn, retries, not_before)
        await store.mark_failed(conn, failed)
        for row in await store.cancel_descendants(conn, [o.task_id for o in failed], now):
            events.add(
                Event(
                    row.workflow_id,
                    "cancelled",
                    row.id,
                    row.name,
                    row.attempt,
                    "pending",
                    at=now,
                    reason="upstream task failed",
                )
            )

    async def _cancel(self, conn: AsyncConnection, workflow: WorkflowRow, now: float, events: Events) -> None:
        rows = await store.cancel_workflow(conn, workflow.id, now, "cancelled by request")
        for row in rows:
            events.add(
                Event(
                    workflow.id,
                    "cancelled",
                    row.id,
                    row.name,
                    row.attempt,
                    row.old_status,
                    at=now,
                    reason="workflow cancelled",
                )
            )
        events.add(
            Event(
                workflow.id,
                "cancelled",
                from_status=str(workflow.status),
                reason="cancelled by request",
                at=now,
            )
        )
        metrics.WORKFLOWS_FINISHED.labels("cancelled").inc()
        log.info("workflow cancelled", workflow_id=str(workflow.id), tasks_cancelled=len(rows))

    async def _finish(
        self, conn: AsyncConnection, workflow: WorkflowRow, status: WorkflowStatus, now: float, events: Events
    ) -> None:
        output: Any = None
        error: dict[str, Any] | None = None
        if status == WorkflowStatus.succeeded:
            template, outputs = await store.output_context(conn, workflow.id)
            if template is None:
                output = {name: value["output"] for name, value in outputs.items()} if len(outputs) <= 100 else None
            else:
                try:
                    output = render(
                        template,
                        template_context(workflow, None, outputs),
                        max_bytes=self.settings.max_template_bytes,
                        path="spec.output",
                    )
                except TemplateError as exc:
                    status = WorkflowStatus.failed
                    error = {
                        "code": "output_error",
                        "message": f"could not render the workflow output: {exc}",
                    }
        else:
            first = await store.first_failure(conn, workflow.id)
            if first is not None:
                err = first.error or {}
                error = {
                    "code": "task_failed",
                    "message": f"task {first.name!r} failed: {err.get('class', 'unknown')}: {err.get('message', '')}",
                    "task": first.name,
                    "error": err,
                }
            else:
                error = {"code": "tasks_cancelled", "message": "tasks were cancelled"}
        await store.finish_workflow(conn, workflow.id, status, now, output=output, error=error)
        events.add(
            Event(
                workflow.id,
                status.value,
                from_status=str(workflow.status),
                at=now,
                reason="finished",
                data={"error": error} if error else None,
            )
        )
        metrics.WORKFLOWS_FINISHED.labels(status.value).inc()
        log.info("workflow finished", workflow_id=str(workflow.id), status=status.value)


def _queue_deadline(task: TaskRow, now: float) -> float | None:
    raw = task.spec.get("queueTimeout")
    return None if raw is None else now + parse_duration(raw)


def _error_json(failure: Failure) -> dict[str, Any]:
    return {"class": str(failure.error_class), "message": failure.message, "details": failure.details}


def _outcome(task: TaskRow, m: EvaluatedMessage | None, error: dict[str, Any] | None, now: float) -> Outcome:
    if m is None:
        return Outcome(task.id, None, error, None, None, None, None, now)
    r = m.result
    return Outcome(
        task_id=task.id,
        output=r.output if error is None else None,
        error=error,
        reward=m.evaluation.reward,
        feedback=m.evaluation.feedback,
        executor_id=r.executor_id,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )
