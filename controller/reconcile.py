"""The reconciler's decisions, as pure functions: state in, actions out. No I/O here.

The controller's shell (:mod:`controller.engine`) loads a *view* of a workflow — its row and the
tasks that may need action — calls these functions and applies the actions in one transaction.
Each decision about a task needs only that task's own row (``waiting_on`` counts its unfinished
dependencies) and the workflow's counters, so the shell never has to load a whole DAG: work per
round is proportional to what changed, not to the size of the workflow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controller.states import IN_FLIGHT, TERMINAL_TASK, TaskStatus, WorkflowStatus
from dagsmith.errors import RETRYABLE, ErrorClass
from dagsmith.spec import Backoff


@dataclass(frozen=True)
class TaskView:
    id: int
    name: str
    status: TaskStatus
    attempt: int  # the attempt dispatched last (0: never dispatched)
    waiting_on: int  # dependencies not yet succeeded or skipped
    retries: int = 0  # retries used so far
    max_retries: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    not_before: float | None = None
    lease_expires_at: float | None = None
    queue_deadline: float | None = None  # queued past this: no executor took it (spec queueTimeout)


@dataclass(frozen=True)
class Counts:
    pending: int = 0
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    cancelled: int = 0

    @property
    def active(self) -> int:
        return self.pending + self.queued + self.running

    @property
    def total(self) -> int:
        return self.active + self.succeeded + self.failed + self.skipped + self.cancelled


@dataclass(frozen=True)
class WorkflowView:
    id: str
    status: WorkflowStatus
    counts: Counts
    cancel_requested: bool = False


@dataclass(frozen=True)
class Failure:
    """One failed attempt, as the shell hands it to the decision functions."""

    error_class: ErrorClass
    message: str
    details: dict[str, Any] = field(default_factory=dict)


# --- Actions: what the shell must do. Frozen values; the shell pattern-matches on them. ---


@dataclass(frozen=True)
class StartWorkflow:
    pass


@dataclass(frozen=True)
class Dispatch:
    task_id: int
    attempt: int


@dataclass(frozen=True)
class Succeed:
    task_id: int
    attempt: int


@dataclass(frozen=True)
class ScheduleRetry:
    task_id: int
    attempt: int  # the attempt that failed
    not_before: float
    failure: Failure


@dataclass(frozen=True)
class FailTask:
    """The task has failed for good; its descendants are cancelled."""

    task_id: int
    attempt: int
    failure: Failure


@dataclass(frozen=True)
class Ignore:
    task_id: int
    attempt: int
    reason: str


@dataclass(frozen=True)
class CancelWorkflow:
    pass


@dataclass(frozen=True)
class FinishWorkflow:
    status: WorkflowStatus


Action = StartWorkflow | Dispatch | Succeed | ScheduleRetry | FailTask | Ignore | CancelWorkflow | FinishWorkflow


def accepts_result(task: TaskView, attempt: int) -> str | None:
    """Why a result for ``attempt`` must be ignored, or None if it applies.

    Results are at-least-once: duplicates and results of superseded attempts change nothing.
    """
    if task.status in TERMINAL_TASK:
        return f"task already {task.status}"
    if attempt != task.attempt:
        return f"stale attempt {attempt} (current attempt is {task.attempt})"
    if task.status not in IN_FLIGHT:
        return f"task is {task.status}, not in flight"
    return None


def on_result(task: TaskView, attempt: int, passed: bool, failure: Failure | None, now: float) -> Action:
    """Decide what an evaluated result means for its task."""
    why = accepts_result(task, attempt)
    if why is not None:
        return Ignore(task.id, attempt, why)
    if passed:
        return Succeed(task.id, attempt)
    return on_failure(task, failure or Failure(ErrorClass.unknown, "failed without an error"), now)


def on_failure(task: TaskView, failure: Failure, now: float) -> ScheduleRetry | FailTask:
    """The retry policy from the spec: retry retryable errors while retries are left, with backoff."""
    if failure.error_class in RETRYABLE and task.retries < task.max_retries:
        delay = task.backoff.delay(task.retries + 1)
        return ScheduleRetry(task.id, task.attempt, now + delay, failure)
    if failure.error_class not in RETRYABLE:
        failure = Failure(
            failure.error_class,
            failure.message,
            {**failure.details, "retryable": False},
        )
    return FailTask(task.id, task.attempt, failure)


def plan(
    workflow: WorkflowView, candidates: Iterable[TaskView], now: float, *, judge_leases: bool = True
) -> list[Action]:
    """The actions that move a workflow forward.

    ``candidates`` are tasks that may need action: ready ones (pending, nothing to wait on) and
    in-flight ones whose lease may have expired. Counts are the workflow's counters as they are
    before these actions. With ``judge_leases`` false, an expired lease is left alone: the
    controller has not yet read the heartbeats that may have renewed it.
    """
    if workflow.status not in (WorkflowStatus.pending, WorkflowStatus.running):
        return []
    if workflow.cancel_requested:
        return [CancelWorkflow()]
    actions: list[Action] = []
    if workflow.status == WorkflowStatus.pending:
        actions.append(StartWorkflow())
    for task in candidates:
        if task.status == TaskStatus.pending and task.waiting_on == 0 and not _waiting(task, now):
            actions.append(Dispatch(task.id, task.attempt + 1))
        elif task.status == TaskStatus.running and judge_leases and _lease_expired(task, now):
            actions.append(on_failure(task, LEASE_EXPIRED, now))
        elif task.status == TaskStatus.queued and task.queue_deadline is not None and task.queue_deadline <= now:
            actions.append(on_failure(task, QUEUE_TIMEOUT, now))
    if not actions or actions == [StartWorkflow()]:
        finished = finish_status(workflow.counts)
        if finished is not None:
            actions.append(FinishWorkflow(finished))
    return actions


QUEUE_TIMEOUT = Failure(
    ErrorClass.unavailable,
    "no executor started the task within its queueTimeout (does any running executor declare its type?)",
)
LEASE_EXPIRED = Failure(ErrorClass.lost, "the executor stopped reporting while running this task (lease expired)")


# A dead-lettered message whose last delivery no executor started is sent again at most this often.
MAX_REDRIVES = 2


@dataclass(frozen=True)
class Redrive:
    """Send the attempt's message again, with a fresh delivery count."""

    redrives: int  # how often it will then have been sent again


def judge_dead_letter(deliveries: int, started_delivery: int | None, redrives: int) -> Redrive | Failure:
    """What a dead-lettered task message means.

    The broker counts every return of a message towards its delivery limit: a crash of the
    executor holding it, and also a dropped connection or a broker restart, which return every
    message an executor had prefetched. Executors report the start of a redelivered message
    before they run it, with its delivery count (``started_delivery``). If the last delivery
    (count ``deliveries - 1``) started and then neither finished nor came back with a result, the
    message killed its executor: poison. If it never started, the returns were churn, and the
    message goes out again, up to :data:`MAX_REDRIVES` times.
    """
    last = deliveries - 1
    if started_delivery is not None and started_delivery >= last:
        return Failure(
            ErrorClass.poison,
            f"the task message was delivered {deliveries} times and crashed or was rejected by an "
            "executor each time; it was dead-lettered",
            {"deliveries": deliveries, "redrives": redrives},
        )
    if redrives < MAX_REDRIVES:
        return Redrive(redrives + 1)
    return Failure(
        ErrorClass.poison,
        f"the task message was dead-lettered {redrives + 1} times ({deliveries} deliveries each) without an "
        "executor starting its last delivery; it was given up (executors that reject or crash on it before "
        "they start it, or a broker that keeps dropping connections)",
        {"deliveries": deliveries, "redrives": redrives},
    )


def _waiting(task: TaskView, now: float) -> bool:
    return task.not_before is not None and task.not_before > now


def _lease_expired(task: TaskView, now: float) -> bool:
    return task.lease_expires_at is not None and task.lease_expires_at <= now


def finish_status(counts: Counts) -> WorkflowStatus | None:
    """The workflow's final status once no task is active, else None."""
    if counts.active > 0 or counts.total == 0:
        return None
    if counts.failed or counts.cancelled:
        return WorkflowStatus.failed
    return WorkflowStatus.succeeded


def backoff_ends(candidates: Iterable[TaskView]) -> float | None:
    """When the earliest retry waiting out its backoff may be dispatched."""
    return min(
        (
            t.not_before
            for t in candidates
            if t.status == TaskStatus.pending and t.waiting_on == 0 and t.not_before is not None
        ),
        default=None,
    )
