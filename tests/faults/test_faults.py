"""Break things on purpose while a batch of 50 workflows / 2,000 tasks runs, then check that nothing
was lost and nothing applied twice (:mod:`tests.faults.checks`). Each fault strikes mid-run, once a
share of the batch has succeeded; the last workflows of the batch are submitted after the fault,
so the API is shown to carry on too.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults import workload
from tests.faults.harness import LEASE_TTL, MAX_DELIVERIES, RESYNC, Fault, Installation

pytestmark = [pytest.mark.faults, pytest.mark.slow]

Make = Callable[..., Installation]
Report = Callable[..., None]
AFTER_FAULT = 10  # workflows of the batch submitted once the fault is over
IGNORED = "dagsmith_results_ignored_total"
REDRIVES = "dagsmith_task_redrives_total"


def begin(inst: Installation, seed: int) -> tuple[list[workload.Planned], float]:
    batch = workload.batch(seed)
    inst.submit(batch[:-AFTER_FAULT])
    return batch[-AFTER_FAULT:], time.monotonic()


def finish(
    inst: Installation,
    rest: list[workload.Planned],
    began: float,
    report: Report,
    expected: tuple[int, int] = (50, 2000),  # workflows and tasks: the batch, and what a test added
    **extra: Any,
) -> None:
    inst.submit(rest)
    inst.wait_finished()
    # Every service the fault did not end on purpose came through it (a crash would otherwise
    # go unnoticed as long as another process picked up its work).
    died = inst.stack.died()
    assert not died, "\n".join(f"{name} died:\n{inst.stack.procs[name].tail()}" for name in died)
    verdict = inst.check()
    extra.setdefault("results_ignored", inst.controller_metric(IGNORED))
    extra.setdefault("redriven", inst.controller_metric(REDRIVES))
    report(inst, verdict, time.monotonic() - began, **extra)
    assert verdict.ok, "\n".join(verdict.problems)
    assert (verdict.workflows, verdict.tasks) == expected


def strike_mid_run(inst: Installation, fraction: float = 0.25) -> int:
    done = inst.wait_succeeded(fraction)
    assert done < inst.planned_tasks(), "the batch finished before the fault"
    return done


def test_controller_sigkill_then_restart(installation: Make, report: Report) -> None:
    inst = installation()
    rest, began = begin(inst, seed=1)
    strike_mid_run(inst)
    struck = time.monotonic()
    inst.kill("controller")
    baseline = inst.succeeded()
    inst.start_controller("controller")
    back = time.monotonic()
    fault = Fault("controller SIGKILL", downtime_s=back - struck)
    fault.recover_s = inst.progress_after(back, baseline)
    inst.faults.append(fault)
    finish(inst, rest, began, report)


def test_two_controllers_one_killed(installation: Make, report: Report) -> None:
    inst = installation(controllers=2)
    rest, began = begin(inst, seed=2)
    strike_mid_run(inst)
    struck = time.monotonic()
    inst.kill("controller-2")
    baseline = inst.succeeded()
    fault = Fault("one of two controllers SIGKILL")
    fault.recover_s = inst.progress_after(struck, baseline)
    inst.faults.append(fault)
    finish(inst, rest, began, report)


def _victim_at_work(inst: Installation, name: str) -> tuple[str, list[tuple[int, int]]]:
    victim = inst.executor_id(name)
    held = inst.wait(lambda: inst.running_on(victim), 30, f"{name} to run tasks")
    return victim, held


def test_executor_sigkill_mid_task(installation: Make, report: Report) -> None:
    inst = installation()
    rest, began = begin(inst, seed=3)
    strike_mid_run(inst)
    victim, held = _victim_at_work(inst, "executor-1")
    struck = time.monotonic()
    inst.kill("executor-1")
    inst.start_executor("executor-3")  # what a supervisor does; the survivor keeps working meanwhile
    inst.wait(lambda: inst.moved_on(held, victim), 30, "the killed executor's tasks to be taken over")
    inst.faults.append(
        Fault("executor SIGKILL", recover_s=time.monotonic() - struck, notes={"tasks_in_flight": len(held)})
    )
    finish(inst, rest, began, report)
    # The broker redelivered the same attempts: the (task_id, attempt) idempotency key is stable.
    final = inst.query("SELECT id, attempt FROM tasks WHERE id = ANY(%s) AND type = 'sleep'", ([t for t, _ in held],))
    assert final and all(attempt == dict(held)[tid] for tid, attempt in final), (held, final)


def test_executor_hang_past_its_lease(installation: Make, report: Report) -> None:
    """SIGSTOP an executor: its leases expire, its tasks are retried elsewhere; after SIGCONT it
    finishes the old attempts and reports them, and those stale results change nothing."""
    inst = installation()
    rest, began = begin(inst, seed=4)
    strike_mid_run(inst)
    # Tasks long enough that the victim is surely in the middle of one when it stops (a short
    # one may have published its result just before, and then nothing is left to give up).
    long = workload.Planned(
        "long",
        "independent",
        [{"name": f"long{i}", "type": "sleep", "params": {"seconds": 5}, "retry": workload.RETRY} for i in range(4)],
    )
    (long_id,) = inst.submit([long])
    long_tasks = {r[0] for r in inst.query("SELECT id FROM tasks WHERE workflow_id = %s", (long_id,))}
    # The victim is whichever executor runs one first: the broker may hand all four to one of them.
    executors = {inst.executor_id(name): name for name in inst.stack.procs if name.startswith("executor-")}

    def running_long() -> str | None:
        return next((e for e in executors if any(t in long_tasks for t, _ in inst.running_on(e))), None)

    victim = inst.wait(running_long, 30, "an executor to run a long task")
    name = executors[victim]
    ignored_before = inst.controller_metric(IGNORED, reason="stale")
    bound = LEASE_TTL + RESYNC
    struck = time.monotonic()
    inst.signal(name, signal.SIGSTOP)
    held: set[tuple[int, int]] = set()

    def given_up() -> bool:
        running = inst.running_on(victim)  # results it published before the stop still drain in
        held.update(running)
        return not running

    try:
        # The hang itself: the executor stays stopped until the controller gave up on its attempts.
        inst.wait(given_up, bound + 15, "the hung executor's running tasks to be given up")
        recovered = time.monotonic() - struck
    finally:
        inst.signal(name, signal.SIGCONT)
    resumed = time.time()
    retried = inst.query("SELECT count(*) FROM task_events WHERE reason = 'retry after lost'")[0][0]
    inst.faults.append(
        Fault(
            "executor SIGSTOP past its lease",
            downtime_s=recovered,
            recover_s=recovered,
            notes={"attempts_held": len(held), "retried_after_lease": retried, "bound_s": bound},
        )
    )
    # No zombie: every attempt the hung executor was running was given up within the lease bound
    # (plus scheduling slack on a busy 2-core machine), and retried.
    assert recovered <= bound + 3.0, f"leases of a hung executor took {recovered:.1f}s to expire"
    assert retried >= 1, "no attempt of the hung executor was retried after its lease expired"
    # The woken executor finishes its old attempts and reports them (its heartbeat lists none running).
    inst.wait(
        lambda: inst.query(
            "SELECT 1 FROM executors WHERE id = %s AND running = 0 AND last_heartbeat > to_timestamp(%s)",
            (victim, resumed),
        ),
        30,
        "the resumed executor to finish its stale attempts",
    )
    finish(inst, rest, began, report, expected=(51, 2004))
    stale = inst.controller_metric(IGNORED, reason="stale") - ignored_before
    assert stale >= 1, "the stale results of the hung executor never reached the controller"


def test_rabbitmq_restart_and_dropped_connections(installation: Make, report: Report) -> None:
    inst = installation()
    rest, began = begin(inst, seed=5)
    rabbit = inst.infra.rabbit
    strike_mid_run(inst, 0.2)
    struck = time.monotonic()
    rabbit.stop()
    baseline = inst.succeeded()
    rabbit.start()
    back = time.monotonic()
    fault = Fault("RabbitMQ node stop/start", downtime_s=back - struck)
    fault.recover_s = inst.progress_after(back, baseline)
    inst.faults.append(fault)

    strike_mid_run(inst, 0.5)
    struck = time.monotonic()
    rabbit.close_all_connections()
    baseline = inst.succeeded()
    fault = Fault("RabbitMQ close_all_connections")
    fault.recover_s = inst.progress_after(struck, baseline)
    inst.faults.append(fault)
    finish(inst, rest, began, report)


def test_postgres_restart(installation: Make, report: Report) -> None:
    inst = installation()
    rest, began = begin(inst, seed=6)
    pg = inst.infra.pg
    strike_mid_run(inst)
    struck = time.monotonic()
    pg.stop("immediate")  # a crash: no checkpoint, WAL recovery at the next start
    # The outage itself: the services run into a dead database for a while.
    time.sleep(3.0)
    pg.start()
    back = time.monotonic()
    baseline = inst.succeeded()  # what was committed before the crash
    fault = Fault("Postgres crash (pg_ctl stop -m immediate) and start", downtime_s=back - struck)
    fault.recover_s = inst.progress_after(back, baseline)
    inst.faults.append(fault)
    assert not inst.stack.died(), f"{inst.stack.died()} died with the database:\n{inst.tails()}"
    finish(inst, rest, began, report)


def test_evaluator_down_for_a_while(installation: Make, report: Report) -> None:
    inst = installation()
    rest, began = begin(inst, seed=7)
    prefix = inst.settings.amqp_prefix
    strike_mid_run(inst)
    struck = time.monotonic()
    inst.kill("evaluator")

    def piled_up() -> bool:
        depth = inst.infra.rabbit.queue_messages()
        # every evaluated result is applied (acked after commit), and results wait for an evaluator
        return depth.get(f"{prefix}.evaluated", 0) == 0 and depth.get(f"{prefix}.results", 0) >= 20

    inst.wait(piled_up, 30, "results to wait in their queue", interval=1.0)
    baseline = inst.succeeded()
    # The outage itself: results wait in the queue for several lease lifetimes.
    time.sleep(3 * LEASE_TTL)
    waiting = inst.infra.rabbit.queue_messages().get(f"{prefix}.results", 0)
    assert inst.succeeded() == baseline, "tasks succeeded without an evaluator"
    inst.stack.start("evaluator", "evaluator")
    back = time.monotonic()
    fault = Fault("evaluator down", downtime_s=back - struck, notes={"result_batches_waiting": waiting})
    fault.recover_s = inst.progress_after(back, baseline)
    inst.faults.append(fault)
    finish(inst, rest, began, report)


def test_poison_message_ends_after_max_deliveries(installation: Make, report: Report) -> None:
    """A task that crashes every executor that takes it is failed as poison after the delivery limit."""
    inst = installation()
    rest, began = begin(inst, seed=8)
    poison = workload.Planned(
        "poison",
        "poison",
        [{"name": "boom", "type": "chaos.crash", "retry": {"limit": 3}}, {"name": "after", "type": "noop"}],
        expect_status="failed",
        fails={"boom": "poison"},
    )
    poison.tasks[1]["dependsOn"] = ["boom"]
    (wid,) = inst.submit([poison])
    strike_mid_run(inst)
    struck = time.monotonic()
    crashes = 0
    queue = f"{inst.settings.amqp_prefix}.task.chaos.crash"
    for _ in range(MAX_DELIVERIES + 3):
        status = inst.query("SELECT status FROM tasks WHERE workflow_id = %s AND name = 'boom'", (wid,))[0][0]
        if status == "failed":
            break
        proc = inst.stack.start_executor("crasher", "chaos.crash", "--allow-crash")
        code = proc.popen.wait(timeout=60)
        inst.stack.stop("crasher")
        assert code == 70, f"the crasher exited {code}:\n{proc.tail()}"
        crashes += 1
        # The broker either gives the message back to the queue (another delivery to come) or, past
        # the limit, dead-letters it and the controller fails the task.
        inst.wait(
            lambda: (
                inst.infra.rabbit.queue_messages().get(queue, 0) > 0
                or inst.query("SELECT 1 FROM tasks WHERE workflow_id = %s AND status = 'failed'", (wid,))
            ),
            30,
            "the message to come back or the task to fail",
            interval=0.5,
        )
    error = inst.query("SELECT error FROM tasks WHERE workflow_id = %s AND name = 'boom'", (wid,))[0][0]
    inst.faults.append(
        Fault("poison message", recover_s=time.monotonic() - struck, notes={"executor_crashes": crashes})
    )
    assert error is not None and error["class"] == "poison", error
    assert crashes == MAX_DELIVERIES, f"{crashes} crashes for at most {MAX_DELIVERIES} deliveries"
    assert error["details"]["deliveries"] == MAX_DELIVERIES
    inst.submit(rest)
    inst.wait_finished()
    verdict = inst.check()
    report(inst, verdict, time.monotonic() - began)
    assert verdict.ok, "\n".join(verdict.problems)


def test_controller_down_longer_than_a_lease(installation: Make, report: Report) -> None:
    """Executors keep running and heartbeating while no controller reads them; a controller that
    comes back after the leases' deadline must not take live executors' work for lost."""
    inst = installation()
    rest, began = begin(inst, seed=9)
    outage = 2 * LEASE_TTL
    long = workload.Planned(
        "long",
        "independent",
        [{"name": f"long{i}", "type": "sleep", "params": {"seconds": outage + 4}} for i in range(6)],
    )
    (wid,) = inst.submit([long])
    inst.wait(
        lambda: inst.query("SELECT n_running FROM workflows WHERE id = %s", (wid,))[0][0] == 6,
        30,
        "the long tasks to run",
    )
    strike_mid_run(inst)
    struck = time.monotonic()
    inst.kill("controller")
    baseline = inst.succeeded()
    time.sleep(outage)  # the outage itself: every lease's deadline passes
    inst.start_controller("controller")
    back = time.monotonic()
    fault = Fault("controller down for two lease lifetimes", downtime_s=back - struck)
    fault.recover_s = inst.progress_after(back, baseline)
    inst.faults.append(fault)
    inst.submit(rest)
    inst.wait_finished()
    verdict = inst.check()
    report(inst, verdict, time.monotonic() - began)
    assert verdict.ok, "\n".join(verdict.problems)
    assert verdict.lease_expiries == 0, f"{verdict.lease_expiries} attempts of live executors taken for lost"
