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
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller import metrics, store
from controller.bundling import RunTimes
from controller.correct import Corrector, RoundBudget, close_fixed, close_unresolved
from controller.db import in_transaction
from controller.dispatch import Prepared, Publisher, prepare, secret_texts, template_context
from controller.reconcile import (
    CancelWorkflow,
    Dispatch,
    FailTask,
    Failure,
    FinishWorkflow,
    Ignore,
    Redrive,
    ScheduleRetry,
    StartWorkflow,
    accepts_result,
    backoff_ends,
    judge_dead_letter,
    on_failure,
    on_result,
    plan,
)
from controller.states import WorkflowStatus
from controller.store import Event, Events, Outcome, TaskRow, WorkflowRow
from dagsmith.errors import ErrorClass, TemplateError
from dagsmith.logs import scrub
from dagsmith.messages import EvaluatedMessage, StartedMessage, TaskMessage
from dagsmith.settings import Settings
from dagsmith.spec import MAX_DEFAULT_OUTPUT_SINKS, CorrectionMode
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
class RoundResult:
    again: set[uuid.UUID] = field(default_factory=set)  # workflows with more to do right away
    cancelled: set[uuid.UUID] = field(default_factory=set)  # tell executors to stop these
    # When the round held its workflows' locks: whatever of them was dispatched before, by this
    # controller or another, is stopped by a cancellation; what a later surgery dispatches is not.
    at: float = 0.0
    due: dict[uuid.UUID, float] = field(default_factory=dict)  # workflows to look at again then (backoffs)
    dispatched: int = 0
    applied: int = 0
    redriven: list[TaskMessage] = field(default_factory=list)  # dead-lettered messages to send again


class Engine:
    def __init__(
        self, db: AsyncEngine, publisher: Publisher, settings: Settings, corrector: Corrector | None = None
    ) -> None:
        self.db = db
        self.publisher = publisher
        self.settings = settings
        self.corrector = corrector
        self.run_times = RunTimes(settings.bundle_fast_below)  # which task types may be bundled
        # A controller that was down finds leases past their deadline that live executors have been
        # renewing all along, in heartbeats still waiting in the queue. Within two heartbeat
        # intervals of starting it has read at least one from every live executor; until then an
        # expired lease is not taken for a lost attempt.
        self.leases_judged_from = time.time() + 2 * settings.heartbeat_interval

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
        for m in inbound.evaluated:
            self.run_times.observe(m.result.task.type, m.result.duration)
        passed = [m for m in inbound.evaluated if m.evaluation.passed]
        failed = [m for m in inbound.evaluated if not m.evaluation.passed]
        limit = self.settings.controller_batch_size * 4
        # One round trip does the common round's reads and writes; only failures need more.
        state = await store.open_round(
            conn,
            touched,
            [
                (m.task_id, uuid.UUID(m.workflow_id), m.attempt, m.executor_id, m.started_at, m.delivery, m.series)
                for m in _latest_starts(inbound.started)
            ],
            [_passed(m, now) for m in passed],
            [m.result.task.task_id for m in failed] + [m.task_id for m, _ in inbound.dead],
            now=now,
            limit=limit,
            lease_ttl=self.settings.lease_ttl,
            grace=self.settings.lease_grace,
        )
        # The round's time from here on is taken with the locks held: what it finishes or cancels
        # is stamped after anything another controller dispatched before it got them.
        out.at = now = time.time()
        live = set(state.fresh)
        self._record_started(inbound.started, state.started, events)
        ready_since = await self._record_successes(conn, passed, state.applied, events)
        budget = RoundBudget()
        decided = await self._apply_failed(conn, failed, inbound.dead, state, events, now, out, budget)
        out.applied = len(state.applied) + decided
        workflows, candidates = state.fresh, state.candidates
        if decided:  # failures and corrections changed counters and readiness: read them again
            workflows, candidates = await store.refresh(conn, {w: state.workflows[w] for w in live}, now, limit)
        by_workflow: dict[uuid.UUID, list[TaskRow]] = defaultdict(list)
        for task in candidates:
            by_workflow[task.workflow_id].append(task)

        to_start: list[uuid.UUID] = []
        to_dispatch: list[Prepared] = []
        failures: list[tuple[TaskRow, ScheduleRetry | FailTask, EvaluatedMessage | None]] = []
        corrections: list[tuple[WorkflowRow, TaskRow, Failure]] = []
        ready = sum(1 for t in candidates if t.status == "pending" and (t.not_before is None or t.not_before <= now))
        if ready >= limit:
            # The round took as many ready tasks as it may; more may be ready, in any of its
            # workflows (the limit is shared): all of them get another round at once.
            out.again |= live
        for wid in sorted(live):
            workflow = workflows[wid]
            tasks = by_workflow.get(wid, [])
            rows = {t.id: t for t in tasks}
            views = [t.view() for t in tasks]
            due = backoff_ends(views)
            if due is not None and due > now:
                out.due[wid] = due
            for action in plan(workflow.view(), views, now, judge_leases=now >= self.leases_judged_from):
                match action:
                    case StartWorkflow():
                        to_start.append(wid)
                    case Dispatch(task_id=task_id, attempt=attempt):
                        task = rows[task_id]
                        try:
                            to_dispatch.append(await self._prepare(conn, workflow, task, attempt))
                        except TemplateError as exc:
                            # A template's error may quote a value it read (a key it did not find):
                            # the task's secrets are masked in it, as executors mask them in theirs.
                            message = scrub(str(exc), secret_texts(task, workflow))
                            failures.append(
                                (
                                    task,
                                    FailTask(task_id, attempt, Failure(ErrorClass.invalid_input, message)),
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
        if out.cancelled:
            # A correction above aborted its workflow, which cancelled every task of it: nothing
            # planned for it before the abort still happens.
            to_dispatch = [p for p in to_dispatch if p.task.workflow_id not in out.cancelled]
            failures = [f for f in failures if f[0].workflow_id not in out.cancelled]
        if failures:
            await self._apply_failures(conn, failures, now, events)
        for p in to_dispatch:
            events.add(Event(p.task.workflow_id, "queued", p.task.id, p.task.name, p.attempt, "pending", at=now))

        async def write() -> None:
            queued = [(p.task.id, p.attempt, p.resolved, _queue_deadline(p.task, now)) for p in to_dispatch]
            await store.insert_events(conn, events, queued, now)

        # The broker's confirms and the last writes overlap; both finish before the commit.
        await asyncio.gather(
            self.publisher.publish(to_dispatch, self.run_times.fast),
            self.publisher.publish_singles(out.redriven),
            write(),
        )
        for p in to_dispatch:
            metrics.TASKS_DISPATCHED.labels(p.task.type).inc()
            if p.task.id in ready_since:
                metrics.FINISH_TO_DISPATCH.observe(max(time.time() - ready_since[p.task.id], 0.0))
        out.dispatched = len(to_dispatch)
        return out

    async def _prepare(self, conn: AsyncConnection, workflow: WorkflowRow, task: TaskRow, attempt: int) -> Prepared:
        outputs = await store.outputs_of(conn, workflow.id, task.refs) if task.refs else {}
        return prepare(task, attempt, workflow, outputs, self.settings.max_template_bytes)

    def _record_started(self, reports: list[StartedMessage], started: list[store.Started], events: Events) -> None:
        by_key = {(m.task_id, m.attempt): m for m in reports}
        for row in started:
            if row.old_status != "queued":
                continue  # a repeated report only renewed the lease
            events.add(
                Event(row.workflow_id, "running", row.task_id, row.name, row.attempt, "queued", at=row.started_at)
            )
            m = by_key.get((row.task_id, row.attempt))
            if m is not None and m.dispatched_at:
                metrics.DISPATCH_TO_START.labels(m.type).observe(max(row.started_at - m.dispatched_at, 0.0))

    async def _record_successes(
        self, conn: AsyncConnection, passed: list[EvaluatedMessage], applied: list[store.Applied], events: Events
    ) -> dict[int, float]:
        """Events and metrics for the applied successes; close the correction decisions they proved
        right. Returns when each newly released child became ready (for a metric)."""
        if len(applied) < len(passed):
            metrics.RESULTS_IGNORED.labels("stale").inc(len(passed) - len(applied))
        by_key = {(m.result.task.task_id, m.result.task.attempt): m for m in passed}
        ready_since: dict[int, float] = {}
        fixed: list[tuple[int, float, float]] = []
        for row in applied:
            m = by_key[(row.task_id, row.attempt)]
            r = m.result
            if self.corrector is not None:
                self.corrector.rates.observe(row.type, False)
            metrics.RUN_SECONDS.labels(row.type).observe(r.duration)
            if row.old_status == "queued":
                _started_by_result(events, row.workflow_id, row.name, row.type, m)
            events.add(
                Event(
                    row.workflow_id,
                    "succeeded",
                    row.task_id,
                    row.name,
                    row.attempt,
                    "running",
                    at=r.finished_at,
                    data={"reward": m.evaluation.reward},
                )
            )
            metrics.TASKS_COMPLETED.labels(row.type, "succeeded").inc()
            if row.attempt > 1:
                fixed.append((row.task_id, max(r.finished_at - r.started_at, 0.0), r.finished_at))
            for kid in row.children:
                ready_since[kid] = max(ready_since.get(kid, 0.0), r.finished_at)
        if self.corrector is not None and fixed:
            # Only a corrected task can have an open decision, and a correction always means a new
            # attempt: first attempts (nearly every success) skip this statement.
            await close_fixed(conn, fixed)
        return ready_since

    async def _apply_failed(
        self,
        conn: AsyncConnection,
        failed: list[EvaluatedMessage],
        dead: list[tuple[TaskMessage, int]],
        state: store.RoundState,
        events: Events,
        now: float,
        out: RoundResult,
        budget: RoundBudget,
    ) -> int:
        """Decide on failed and dead-lettered attempts (the retry policy, or Correction Mode) and
        write the decisions. Returns how many attempts were decided."""
        tasks, workflows, live = state.failed, state.workflows, set(state.fresh)
        seen: set[tuple[int, int]] = set()
        decided: list[tuple[TaskRow, ScheduleRetry | FailTask, EvaluatedMessage | None]] = []
        totals: dict[uuid.UUID, list[float]] = defaultdict(lambda: [0.0, 0.0])
        corrected = 0
        for m in failed:
            ref = m.result.task
            task = tasks.get(ref.task_id)
            if (
                task is None
                or task.workflow_id not in live
                or task.workflow_id in out.cancelled  # aborted by a correction earlier in this loop
                or (ref.task_id, ref.attempt) in seen
            ):
                metrics.RESULTS_IGNORED.labels("duplicate_or_gone").inc()
                continue
            seen.add((ref.task_id, ref.attempt))
            err = m.evaluation.error or m.result.error
            failure = (
                Failure(err.error_class, err.message, err.details)
                if err
                else Failure(ErrorClass.unknown, "failed without an error")
            )
            action = on_result(task.view(), ref.attempt, False, failure, now)
            if isinstance(action, Ignore):
                metrics.RESULTS_IGNORED.labels("stale").inc()
                log.debug(
                    "result ignored",
                    workflow_id=str(task.workflow_id),
                    task_id=action.task_id,
                    attempt=action.attempt,
                    reason=action.reason,
                )
                continue
            if self.corrector is not None:
                self.corrector.rates.observe(task.type, True)
            totals[task.workflow_id][0] += m.evaluation.reward
            totals[task.workflow_id][1] += m.result.duration
            metrics.RUN_SECONDS.labels(task.type).observe(m.result.duration)
            if task.status == "queued":
                _started_by_result(events, task.workflow_id, task.name, task.type, m)
            workflow = workflows[task.workflow_id]
            if self._correcting(workflow):
                await self._correct(conn, workflow, task, failure, m, now, events, out, budget)
                corrected += 1
                continue
            assert isinstance(action, FailTask | ScheduleRetry)
            decided.append((task, action, m))
        started = await store.started_deliveries(conn, [msg.task_id for msg, _ in dead]) if dead else {}
        for msg, deliveries in dead:
            task = tasks.get(msg.task_id)
            metrics.DEAD_LETTERS.inc()
            if (
                task is None
                or task.workflow_id not in live
                or task.workflow_id in out.cancelled  # aborted earlier in this round: not sent again
                or accepts_result(task.view(), msg.attempt) is not None
            ):
                continue
            if (msg.task_id, msg.attempt) in seen:
                # This round already applied a result of the same attempt (the message was
                # dead-lettered after its executor's result had left): that result decides.
                metrics.RESULTS_IGNORED.labels("duplicate_or_gone").inc()
                continue
            seen.add((msg.task_id, msg.attempt))
            series, delivery = started.get(msg.task_id, (None, None))
            verdict = judge_dead_letter(deliveries, delivery if series == msg.series else None, msg.redrives)
            if isinstance(verdict, Redrive):
                metrics.REDRIVES.inc()
                log.warning(
                    "a task message was dead-lettered before an executor started its last delivery; it is sent again",
                    workflow_id=str(task.workflow_id),
                    task_id=msg.task_id,
                    attempt=msg.attempt,
                    redrives=verdict.redrives,
                )
                out.redriven.append(msg.model_copy(update={"redrives": verdict.redrives, "series": msg.series + 1}))
                continue
            failure = verdict
            workflow = workflows[task.workflow_id]
            if self._correcting(workflow):
                await self._correct(conn, workflow, task, failure, None, now, events, out, budget)
                corrected += 1
                continue
            decided.append((task, on_failure(task.view(), failure, now), None))
        if out.redriven:
            await store.requeue(
                conn, [(m.task_id, m.attempt, _queue_deadline(tasks[m.task_id], now)) for m in out.redriven]
            )
        await store.add_totals(conn, {w: (r, sec) for w, (r, sec) in totals.items()})
        await self._apply_failures(conn, decided, now, events)
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
        if workflow.id in out.cancelled:
            # An earlier correction of this round aborted the workflow (``workflow`` is the row as
            # the round found it, still running): this failure changes nothing, and a surgery now
            # would bring the failed workflow back.
            metrics.RESULTS_IGNORED.labels("duplicate_or_gone").inc()
            return
        outcome = _outcome(task.id, m, _error_json(failure), now)
        result = await self.corrector.correct(conn, workflow, task, failure, outcome, now, events, budget)
        out.again.add(workflow.id)  # dispatch what the surgery made ready, in the next round
        if result.aborted:
            out.cancelled.add(workflow.id)
            metrics.WORKFLOWS_FINISHED.labels("failed").inc()

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
            outcome = _outcome(task.id, m, error, now)
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
        if workflow.surgeries:
            await close_unresolved(conn, "workflow_cancelled", now, workflow_ids=[workflow.id])
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
                wide = len(outputs) > MAX_DEFAULT_OUTPUT_SINKS
                output = None if wide else {name: value["output"] for name, value in outputs.items()}
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
        if workflow.surgeries:  # only workflows that were corrected can have decisions left open
            await close_unresolved(conn, "workflow_finished", now, workflow_ids=[workflow.id])
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


def _latest_starts(reports: list[StartedMessage]) -> list[StartedMessage]:
    """One start report per attempt, the latest delivery's (newest series first): one UPDATE
    takes one row per task, and the delivery count is what judges a dead letter."""
    latest: dict[tuple[int, int], StartedMessage] = {}
    for m in reports:
        key = (m.task_id, m.attempt)
        seen = latest.get(key)
        if seen is None or (m.series, m.delivery) > (seen.series, seen.delivery):
            latest[key] = m
    return list(latest.values())


def _queue_deadline(task: TaskRow, now: float) -> float | None:
    return store.queue_deadline(task.spec.get("queueTimeout"), now)


def _error_json(failure: Failure) -> dict[str, Any]:
    return {"class": str(failure.error_class), "message": failure.message, "details": failure.details}


def _started_by_result(events: Events, workflow_id: uuid.UUID, name: str, task_type: str, m: EvaluatedMessage) -> None:
    """No start report came before the result: the result says when the attempt started."""
    r = m.result
    events.add(
        Event(
            workflow_id,
            "running",
            r.task.task_id,
            name,
            r.task.attempt,
            "queued",
            at=r.started_at,
            data={"executor": r.executor_id},
        )
    )
    if r.task.dispatched_at:
        metrics.DISPATCH_TO_START.labels(task_type).observe(max(r.started_at - r.task.dispatched_at, 0.0))


def _passed(m: EvaluatedMessage, now: float) -> store.Passed:
    ref = m.result.task
    return store.Passed(_outcome(ref.task_id, m, None, now), uuid.UUID(ref.workflow_id), ref.attempt, m.result.duration)


def _outcome(task_id: int, m: EvaluatedMessage | None, error: dict[str, Any] | None, now: float) -> Outcome:
    if m is None:
        return Outcome(task_id, None, error, None, None, None, None, now)
    r = m.result
    return Outcome(
        task_id=task_id,
        output=r.output if error is None else None,
        error=error,
        reward=m.evaluation.reward,
        feedback=m.evaluation.feedback,
        executor_id=r.executor_id,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )
