"""What must hold after any fault, read from Postgres: nothing lost, nothing applied twice.

- every accepted workflow is terminal, with the status its plan expects (succeeded unless the
  workload planned a failure);
- every task is terminal and consistent with its DAG: a succeeded task's dependencies all
  succeeded; a failed task is a planned failure with the planned error class; a cancelled task
  has a failed or cancelled dependency; a flaky task needed at least the attempts it fails;
- no result was applied twice: per task attempt at most one ending transition (succeeded,
  failed, or back to pending for a retry), exactly one ``succeeded`` event per succeeded task,
  and each attempt queued exactly once (no double dispatch);
- the workflow counters equal a GROUP BY over the tasks, and both equal the final states
  replayed from the event history; each workflow has exactly one terminal event.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import psycopg

from tests.faults.workload import Planned

TERMINAL = {"succeeded", "failed", "cancelled", "skipped"}
STATUSES = ("pending", "queued", "running", "succeeded", "failed", "skipped", "cancelled")


@dataclass
class Verdict:
    workflows: int = 0
    tasks: int = 0
    lost: int = 0  # accepted workflows or their tasks that did not reach a terminal state
    duplicated: int = 0  # results applied (or attempts queued) more than once
    wrong: int = 0  # terminal, but not what the plan expects or not consistent with the DAG
    attempts: int = 0  # attempts dispatched in all
    extra_attempts: int = 0  # beyond the workload's own needs (first run + planned flaky retries)
    lease_expiries: int = 0  # attempts ended because their lease expired (class lost)
    problems: list[str] = field(default_factory=list)

    def problem(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.problems) < 30:
            self.problems.append(f"{kind}: {text}")

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.wrong == 0

    def figures(self) -> dict[str, Any]:
        return {
            "workflows": self.workflows,
            "tasks": self.tasks,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "wrong": self.wrong,
            "attempts": self.attempts,
            "extra_attempts": self.extra_attempts,
            "lease_expiries": self.lease_expiries,
        }


def check(conn: psycopg.Connection[Any], planned: dict[str, Planned]) -> Verdict:
    ids = list(planned)
    v = Verdict(workflows=len(ids), tasks=sum(len(p.tasks) for p in planned.values()))
    counters = {
        str(r[0]): r
        for r in conn.execute(
            f"SELECT id, name, status, n_total, {', '.join(f'n_{s}' for s in STATUSES)} "
            "FROM workflows WHERE id = ANY(%s::uuid[])",
            (ids,),
        )
    }
    tasks: dict[str, list[Any]] = defaultdict(list)
    for r in conn.execute(
        "SELECT workflow_id, id, name, status, attempt, retries, depends_on, error, output "
        "FROM tasks WHERE workflow_id = ANY(%s::uuid[])",
        (ids,),
    ):
        tasks[str(r[0])].append(r)
    events: dict[str, list[Any]] = defaultdict(list)
    for r in conn.execute(
        "SELECT workflow_id, task_id, attempt, to_status, reason FROM task_events "
        "WHERE workflow_id = ANY(%s::uuid[]) ORDER BY id",
        (ids,),
    ):
        events[str(r[0])].append(r)

    for wid, plan in planned.items():
        row = counters.get(wid)
        if row is None:
            v.problem("lost", f"workflow {plan.name} ({wid}) is not in the database")
            continue
        status = row[2]
        if status not in TERMINAL:
            v.problem("lost", f"workflow {plan.name} is still {status}")
        elif status != plan.expect_status:
            v.problem("wrong", f"workflow {plan.name} ended {status}, expected {plan.expect_status}")
        _check_tasks(v, plan, tasks[wid])
        _check_counts(v, plan, row, tasks[wid], events[wid])
        _check_events(v, plan, status, tasks[wid], events[wid])
    return v


def _check_tasks(v: Verdict, plan: Planned, rows: list[Any]) -> None:
    if len(rows) != len(plan.tasks):
        v.problem("lost", f"{plan.name}: {len(rows)} task rows for {len(plan.tasks)} planned tasks")
    by_name = {r[2]: r for r in rows}
    for _, _, name, status, attempt, retries, deps, error, output in rows:
        where = f"{plan.name}/{name}"
        v.attempts += attempt
        needed = plan.flaky.get(name, 0) + 1 if status != "cancelled" else 0
        v.extra_attempts += max(attempt - needed, 0)
        dep_status = [by_name[d][3] for d in deps]
        if status not in TERMINAL:
            v.problem("lost", f"{where} is still {status} (attempt {attempt})")
        elif status == "succeeded":
            if any(s != "succeeded" for s in dep_status):
                v.problem("wrong", f"{where} succeeded but its dependencies are {dep_status}")
            if output is None:
                v.problem("wrong", f"{where} succeeded without an output")
            if attempt < needed:
                v.problem("wrong", f"{where} succeeded at attempt {attempt}; it fails {needed - 1} times first")
        elif status == "failed":
            expected = plan.fails.get(name)
            got = (error or {}).get("class")
            if expected is None or got != expected:
                v.problem("wrong", f"{where} failed with {got}: {(error or {}).get('message')!r} (planned: {expected})")
        elif status == "cancelled" and not any(s in ("failed", "cancelled") for s in dep_status):
            v.problem("wrong", f"{where} was cancelled but no dependency failed ({dep_status})")
        if status in ("succeeded", "failed") and retries != attempt - 1:
            v.problem("wrong", f"{where}: attempt {attempt} with {retries} retries")


def _check_counts(v: Verdict, plan: Planned, row: Any, rows: list[Any], events: list[Any]) -> None:
    by_status = Counter(r[3] for r in rows)
    counters = dict(zip(STATUSES, row[4:], strict=True))
    if row[3] != len(rows) or any(counters[s] != by_status.get(s, 0) for s in STATUSES):
        v.problem("wrong", f"{plan.name}: counters {counters} (total {row[3]}) but tasks say {dict(by_status)}")
    last: dict[int, str] = {}
    for _, task_id, _, to_status, _ in events:
        if task_id is not None:
            last[task_id] = to_status
    replayed = Counter(last.get(r[1], "pending") for r in rows)
    if replayed != by_status:
        v.problem("wrong", f"{plan.name}: the event history replays to {dict(replayed)}, tasks say {dict(by_status)}")


def _check_events(v: Verdict, plan: Planned, status: str, rows: list[Any], events: list[Any]) -> None:
    per_task: dict[int, list[Any]] = defaultdict(list)
    finishes = []
    for e in events:
        if e[1] is None:
            if e[3] in TERMINAL:
                finishes.append(e[3])
        else:
            per_task[e[1]].append(e)
    if status in TERMINAL and finishes != [status]:
        v.problem("duplicated" if len(finishes) > 1 else "wrong", f"{plan.name}: terminal events {finishes}")
    for _, task_id, name, task_status, attempt, retries, *_ in rows:
        where = f"{plan.name}/{name}"
        history = per_task.get(task_id, [])
        queued = Counter(e[2] for e in history if e[3] == "queued")
        if sorted(queued) != list(range(1, attempt + 1)):
            v.problem("wrong", f"{where}: queued attempts {sorted(queued)} for attempt {attempt}")
        for a, n in queued.items():
            if n > 1:
                v.problem("duplicated", f"{where}: attempt {a} queued {n} times")
        endings = Counter(e[2] for e in history if _ends_attempt(e))
        for a, n in endings.items():
            if n > 1:
                v.problem("duplicated", f"{where}: attempt {a} ended {n} times")
        succeeded = [e[2] for e in history if e[3] == "succeeded"]
        if len(succeeded) > 1:
            v.problem("duplicated", f"{where}: {len(succeeded)} succeeded events (attempts {succeeded})")
        elif task_status == "succeeded" and succeeded != [attempt]:
            v.problem("wrong", f"{where} succeeded at attempt {attempt}, events say {succeeded}")
        elif task_status != "succeeded" and succeeded:
            v.problem("wrong", f"{where} is {task_status} but has a succeeded event")
        retried = [e for e in history if e[3] == "pending" and (e[4] or "").startswith("retry after")]
        if len(retried) != retries:
            v.problem("wrong", f"{where}: {retries} retries but {len(retried)} retry events")
        v.lease_expiries += sum(1 for e in retried if e[4] == "retry after lost")
        v.lease_expiries += sum(1 for e in history if e[3] == "failed" and e[4] == "lost")


def _ends_attempt(event: Any) -> bool:
    to_status, reason = event[3], event[4] or ""
    return to_status in ("succeeded", "failed") or (to_status == "pending" and reason.startswith("retry after"))


def succeeded_total(conn: psycopg.Connection[Any]) -> int:
    """Tasks succeeded in all workflows: rises only when results flow end to end and commit."""
    return int(conn.execute("SELECT coalesce(sum(n_succeeded), 0) FROM workflows").fetchone()[0])  # type: ignore[index]


def terminal_count(conn: psycopg.Connection[Any], ids: list[str]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM workflows WHERE id = ANY(%s::uuid[]) AND status IN ('succeeded', 'failed', 'cancelled')",
        (ids,),
    ).fetchone()
    return int(row[0])  # type: ignore[index]
