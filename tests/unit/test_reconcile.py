"""The reconciler's decisions, without I/O: examples, then properties over random DAGs and histories.

The property test drives ``plan``/``on_result`` with an in-memory model of what the database shell
does (claim, release children, cancel descendants) and a hostile world: results are duplicated,
reordered and lost, executors vanish mid-task. Whatever happens, every attempt is dispatched at
most once, no task is dispatched before all its dependencies succeeded, and every workflow ends.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.reconcile import (
    MAX_REDRIVES,
    CancelWorkflow,
    Counts,
    Dispatch,
    FailTask,
    Failure,
    FinishWorkflow,
    Ignore,
    Redrive,
    ScheduleRetry,
    StartWorkflow,
    Succeed,
    TaskView,
    WorkflowView,
    backoff_ends,
    finish_status,
    judge_dead_letter,
    on_failure,
    on_result,
    plan,
)
from controller.states import TaskStatus as S
from controller.states import WorkflowStatus as W
from dagsmith.errors import ErrorClass
from dagsmith.spec import Backoff


def task(**kw: object) -> TaskView:
    base = {"id": 1, "name": "t", "status": S.pending, "attempt": 0, "waiting_on": 0}
    base.update(kw)
    return TaskView(**base)  # type: ignore[arg-type]


def wf(status: W = W.running, **counts: int) -> WorkflowView:
    return WorkflowView("w", status, Counts(**counts))


def test_pending_workflow_starts_and_dispatches_roots_only() -> None:
    actions = plan(
        wf(W.pending, pending=2),
        [task(id=1), task(id=2, waiting_on=1)],
        now=0,
    )
    assert actions == [StartWorkflow(), Dispatch(1, 1)]


def test_backoff_delays_dispatch() -> None:
    assert plan(wf(pending=1), [task(not_before=10.0, attempt=1)], now=5) == []
    assert plan(wf(pending=1), [task(not_before=10.0, attempt=1)], now=10) == [Dispatch(1, 2)]


def test_expired_lease_is_a_lost_attempt() -> None:
    running = task(status=S.running, attempt=1, lease_expires_at=4.0, max_retries=1)
    (action,) = plan(wf(running=1), [running], now=5)
    assert isinstance(action, ScheduleRetry)
    assert action.failure.error_class == ErrorClass.lost
    assert plan(wf(running=1), [running], now=3) == []
    # A controller that has not yet read the heartbeats leaves an expired lease alone.
    assert plan(wf(running=1), [running], now=5, judge_leases=False) == []


def test_results_for_stale_or_finished_attempts_are_ignored() -> None:
    queued = task(status=S.queued, attempt=2)
    assert isinstance(on_result(queued, 1, True, None, 0), Ignore)
    assert on_result(queued, 2, True, None, 0) == Succeed(1, 2)
    assert isinstance(on_result(task(status=S.succeeded, attempt=2), 2, True, None, 0), Ignore)
    assert isinstance(on_result(task(status=S.pending, attempt=2), 2, True, None, 0), Ignore)


def test_retry_policy() -> None:
    t = task(status=S.running, attempt=1, max_retries=2, backoff=Backoff(initial=1, factor=2, max=3))
    retry = on_failure(t, Failure(ErrorClass.transient, "x"), now=100)
    assert retry == ScheduleRetry(1, 1, 101.0, Failure(ErrorClass.transient, "x"))
    third = on_failure(replace(t, retries=1), Failure(ErrorClass.timeout, "x"), now=100)
    assert isinstance(third, ScheduleRetry) and third.not_before == 102.0
    assert isinstance(on_failure(replace(t, retries=2), Failure(ErrorClass.transient, "x"), 0), FailTask)
    permanent = on_failure(t, Failure(ErrorClass.permanent, "x"), 0)
    assert isinstance(permanent, FailTask) and permanent.failure.details == {"retryable": False}


def test_a_dead_letter_is_poison_only_if_its_last_delivery_started() -> None:
    # Four deliveries (counts 0..3): the last one started and never finished, so it crashed.
    poison = judge_dead_letter(4, started_delivery=3, redrives=0)
    assert isinstance(poison, Failure) and poison.error_class == ErrorClass.poison
    assert poison.details == {"deliveries": 4, "redrives": 0}
    # The last delivery never started (returned by dropped connections): sent again, a bounded number of times.
    assert judge_dead_letter(4, started_delivery=None, redrives=0) == Redrive(1)
    assert judge_dead_letter(4, started_delivery=2, redrives=1) == Redrive(2)
    given_up = judge_dead_letter(4, started_delivery=None, redrives=MAX_REDRIVES)
    assert isinstance(given_up, Failure) and given_up.error_class == ErrorClass.poison
    assert "given up" in given_up.message and given_up.details["redrives"] == MAX_REDRIVES


def test_cancel_and_finish() -> None:
    assert plan(WorkflowView("w", W.running, Counts(running=1), True), [], 0) == [CancelWorkflow()]
    assert plan(wf(succeeded=3), [], 0) == [FinishWorkflow(W.succeeded)]
    assert plan(wf(succeeded=2, failed=1), [], 0) == [FinishWorkflow(W.failed)]
    assert plan(wf(W.succeeded, succeeded=1), [], 0) == []
    assert finish_status(Counts(succeeded=1, skipped=1)) == W.succeeded
    assert finish_status(Counts(succeeded=1, running=1)) is None


def test_backoff_ends_when_the_earliest_waiting_retry_may_go() -> None:
    waiting = [task(not_before=5.0), task(not_before=4.0, waiting_on=1), task(status=S.running, lease_expires_at=3.0)]
    assert backoff_ends(waiting) == 5.0
    assert backoff_ends([task(status=S.succeeded), task()]) is None


# --- Property test: a model of the shell, driven by a hostile world. ---


@dataclass
class Model:
    deps: dict[int, list[int]]
    max_retries: dict[int, int]
    tasks: dict[int, TaskView] = field(default_factory=dict)
    status: W = W.pending
    cancel_requested: bool = False
    dispatched: set[tuple[int, int]] = field(default_factory=set)
    in_flight: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for tid, deps in self.deps.items():
            self.tasks[tid] = TaskView(
                id=tid,
                name=f"t{tid}",
                status=S.pending,
                attempt=0,
                waiting_on=len(deps),
                max_retries=self.max_retries[tid],
                backoff=Backoff(initial=1, factor=2, max=4),
            )

    def children(self, tid: int) -> list[int]:
        return [c for c, deps in self.deps.items() if tid in deps]

    def counts(self) -> Counts:
        n = {s.value: 0 for s in S}
        for t in self.tasks.values():
            n[t.status.value] += 1
        return Counts(**n)

    def set(self, tid: int, **changes: object) -> None:
        self.tasks[tid] = replace(self.tasks[tid], **changes)  # type: ignore[arg-type]

    def apply(self, action: object, now: float) -> None:
        match action:
            case StartWorkflow():
                self.status = W.running
            case Dispatch(task_id=tid, attempt=attempt):
                t = self.tasks[tid]
                assert (tid, attempt) not in self.dispatched, "an attempt was dispatched twice"
                assert all(self.tasks[d].status == S.succeeded for d in self.deps[tid]), "dispatched too early"
                assert attempt == t.attempt + 1
                self.dispatched.add((tid, attempt))
                self.set(tid, status=S.queued, attempt=attempt, not_before=None)
                self.in_flight.append((tid, attempt))
            case Succeed(task_id=tid):
                self.set(tid, status=S.succeeded, lease_expires_at=None)
                for child in self.children(tid):
                    self.set(child, waiting_on=self.tasks[child].waiting_on - 1)
            case ScheduleRetry(task_id=tid, not_before=nb):
                self.set(
                    tid,
                    status=S.pending,
                    retries=self.tasks[tid].retries + 1,
                    not_before=nb,
                    lease_expires_at=None,
                )
            case FailTask(task_id=tid):
                self.set(tid, status=S.failed, lease_expires_at=None)
                stack = self.children(tid)
                while stack:
                    c = stack.pop()
                    if self.tasks[c].status == S.pending:
                        self.set(c, status=S.cancelled)
                        stack.extend(self.children(c))
            case CancelWorkflow():
                for tid, t in self.tasks.items():
                    if t.status in (S.pending, S.queued, S.running):
                        self.set(tid, status=S.cancelled)
                self.status = W.cancelled
            case FinishWorkflow(status=status):
                self.status = status
            case Ignore():
                pass
            case _:
                raise AssertionError(action)

    def reconcile(self, now: float) -> None:
        view = WorkflowView("w", self.status, self.counts(), self.cancel_requested)
        for action in plan(view, list(self.tasks.values()), now):
            self.apply(action, now)


@st.composite
def dags(draw: st.DrawFn) -> tuple[dict[int, list[int]], dict[int, int]]:
    n = draw(st.integers(1, 10))
    deps = {i: sorted(draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else []) for i in range(n)}
    retries = {i: draw(st.integers(0, 2)) for i in range(n)}
    return deps, retries


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=dags(), seed=st.integers(0, 2**32 - 1), cancel_at=st.one_of(st.none(), st.integers(0, 60)))
def test_every_dag_terminates_safely(
    dag: tuple[dict[int, list[int]], dict[int, int]], seed: int, cancel_at: int | None
) -> None:
    rng = random.Random(seed)
    model = Model(*dag)
    now = 0.0
    for step in range(2000):
        if cancel_at is not None and step == cancel_at:
            model.cancel_requested = True
        model.reconcile(now)
        if model.status in (W.succeeded, W.failed, W.cancelled):
            break
        now += rng.choice([0.1, 0.5, 2.0])
        if not model.in_flight:
            continue
        tid, attempt = model.in_flight[rng.randrange(len(model.in_flight))]
        roll = rng.random()
        t = model.tasks[tid]
        if roll < 0.15:
            # the executor dies or hangs: the attempt was started, and its lease will expire
            model.in_flight.remove((tid, attempt))
            if t.status == S.queued and t.attempt == attempt:
                model.set(tid, status=S.running, lease_expires_at=now + 3)
            continue
        if roll < 0.25:
            model.in_flight.append((tid, attempt))  # duplicate delivery (at-least-once)
        else:
            model.in_flight.remove((tid, attempt))
        if rng.random() < 0.3 and t.status == S.queued and t.attempt == attempt:
            model.set(tid, status=S.running, lease_expires_at=now + 3)
        passed = rng.random() < 0.7
        failure = None if passed else Failure(rng.choice(list(ErrorClass)), "boom")
        model.apply(on_result(model.tasks[tid], attempt, passed, failure, now), now)
    else:
        raise AssertionError("the workflow never finished")

    statuses = {t.status for t in model.tasks.values()}
    assert not statuses & {S.pending, S.queued, S.running} or model.status == W.cancelled
    if model.status == W.succeeded:
        assert statuses == {S.succeeded}
    if model.status == W.failed:
        assert S.failed in statuses or S.cancelled in statuses
    for tid, t in model.tasks.items():
        if t.status == S.succeeded:
            assert all(model.tasks[d].status == S.succeeded for d in model.deps[tid])
        assert t.retries <= model.max_retries[tid]


def test_queued_past_its_queue_deadline_is_an_unavailable_attempt() -> None:
    queued = task(status=S.queued, attempt=1, queue_deadline=10.0)
    assert plan(wf(queued=1), [queued], now=9) == []
    (action,) = plan(wf(queued=1), [queued], now=10)
    assert isinstance(action, FailTask) and action.failure.error_class == ErrorClass.unavailable
