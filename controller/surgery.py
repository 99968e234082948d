"""DAG surgery, planned as data: what changes, checked against the graph and the budgets.

Five operations, each applied by :mod:`controller.revisions` in one transaction that also writes a
DAG revision row (actor, reason, diff):

- ``retry``   — a new attempt, optionally after a delay and with changed params;
- ``reroute`` — the same task on another capability (task type), then a new attempt;
- ``insert``  — a new task *before* the failed one (it takes over the failed task's dependencies,
  and the failed task then depends on it alone; its output is merged over the failed task's
  params), then a new attempt;
- ``skip``    — the task is skipped and its spec's ``default`` becomes its output (optional tasks
  only); its dependents run;
- ``abort``   — the workflow fails, and whatever runs is cancelled.

None of them can create a cycle: an inserted task has the failed task's dependencies and the
failed task as its only dependent, so every path through it existed before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dagsmith.errors import DagsmithError
from dagsmith.logs import redact
from dagsmith.spec import TASK_NAME_PATTERN, TASK_TYPE_PATTERN, CorrectionSpec


class SurgeryError(DagsmithError):
    """A surgery that cannot be applied; the message says why."""


class SurgeryConflict(SurgeryError):
    """The surgery is fine but not in the task's current state (e.g. it is running)."""


class Operation(StrEnum):
    retry = "retry"
    reroute = "reroute"
    insert = "insert"
    skip = "skip"
    abort = "abort"


# A task in these states can be operated on. Policy decisions happen while the failing attempt is
# still in flight; users operate on failed, cancelled or not-yet-started tasks — queued ones too,
# so that a task no executor takes (a type nobody runs) can be rerouted or retried without
# cancelling the workflow. revisions.manual refuses a queued task whose type a live executor runs
# (it may start at any moment). Its message stays in its queue: an executor for the old type that
# comes later runs an attempt that is no longer current, and its result is ignored.
OPERABLE = {"pending", "queued", "running", "failed", "cancelled"}
MANUAL_OPERABLE = {"pending", "queued", "failed", "cancelled"}


@dataclass(frozen=True)
class TaskSnapshot:
    """What planning needs to know about the task operated on."""

    id: int
    name: str
    type: str
    status: str
    params: dict[str, Any]
    depends_on: list[str]
    spec: dict[str, Any]
    attempt: int = 0
    retries: int = 0
    max_retries: int = 0
    # The params as the last attempt received them (templates rendered, a repair task's output
    # merged in); None if no attempt got that far. ``params`` keeps the templates.
    resolved: dict[str, Any] | None = None

    @property
    def optional(self) -> bool:
        return bool(self.spec.get("optional"))

    @property
    def secrets(self) -> list[str]:
        """Params whose values are masked wherever they are shown (the spec's ``secrets``)."""
        return list(self.spec.get("secrets") or [])


@dataclass(frozen=True)
class Plan:
    operation: Operation
    task: str
    delay: float = 0.0
    params: dict[str, Any] | None = None  # new params (retry with params)
    edited: tuple[str, ...] = ()  # the params set explicitly: a repair task's output no longer replaces them
    timeout: float | None = None  # new task timeout (retry with a tuned timeout)
    new_type: str | None = None  # reroute
    inserted: dict[str, Any] | None = None  # insert: {"name", "type", "params"}
    output: Any = None  # skip: the output the task gets
    diff: list[dict[str, Any]] = field(default_factory=list)

    @property
    def inserts(self) -> int:
        return 1 if self.inserted else 0


def _check_operable(task: TaskSnapshot, manual: bool) -> None:
    allowed = MANUAL_OPERABLE if manual else OPERABLE
    if task.status not in allowed:
        hints = {
            "running": " (wait for it to finish, or cancel the workflow)",
            "succeeded": " (its output may already be in use downstream: to run it again, submit the workflow again)",
            "skipped": " (it was skipped with its default output, which tasks after it may have used)",
        }
        hint = hints.get(task.status, "")
        state = {"succeeded": "has succeeded", "skipped": "was skipped"}.get(task.status, f"is {task.status}")
        raise SurgeryConflict(f"task {task.name!r} {state}: it cannot be operated on now{hint}")


def retry(
    task: TaskSnapshot,
    *,
    delay: float = 0.0,
    params: dict[str, Any] | None = None,
    timeout: float | None = None,
    old_timeout: float | None = None,
    manual: bool = False,
) -> Plan:
    """A new attempt. ``params``, if given, are merged over the task's own (templates kept):
    the keys given are set, the rest stay as the spec has them."""
    _check_operable(task, manual)
    if delay < 0:
        raise SurgeryError("delay cannot be negative")
    merged, edited, diff = _set_params(task, params)
    if timeout is not None:
        diff.append({"op": "set", "task": task.name, "field": "timeout", "old": old_timeout, "new": timeout})
    diff.append({"op": "status", "task": task.name, "to": "pending", "delay": delay})
    return Plan(Operation.retry, task.name, delay=delay, params=merged, edited=edited, timeout=timeout, diff=diff)


def reroute(task: TaskSnapshot, new_type: str, *, params: dict[str, Any] | None = None, manual: bool = False) -> Plan:
    """Run the task as another type; ``params``, if given, are merged over its own (the new type
    may want different ones)."""
    _check_operable(task, manual)
    if not re.match(TASK_TYPE_PATTERN, new_type):
        raise SurgeryError(f"{new_type!r} is not a task type (e.g. 'text.upper')")
    if new_type == task.type:
        raise SurgeryError(f"task {task.name!r} already runs as {new_type!r}")
    diff: list[dict[str, Any]] = [{"op": "set", "task": task.name, "field": "type", "old": task.type, "new": new_type}]
    merged, edited, set_diff = _set_params(task, params)
    diff += set_diff
    diff.append({"op": "status", "task": task.name, "to": "pending"})
    return Plan(Operation.reroute, task.name, new_type=new_type, params=merged, edited=edited, diff=diff)


def _set_params(
    task: TaskSnapshot, params: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, tuple[str, ...], list[dict[str, Any]]]:
    """(the task's params with ``params`` set over them, the keys set, the diff)."""
    if not params:
        return None, (), []
    merged = {**task.params, **params}
    if merged == task.params:
        return None, (), []
    edited = tuple(sorted(k for k, v in params.items() if task.params.get(k, _ABSENT) != v))
    # Revisions and events are shown to users: secret values stay masked there.
    old, new = redact(task.params, task.secrets), redact(merged, task.secrets)
    return merged, edited, [{"op": "set", "task": task.name, "field": "params", "old": old, "new": new}]


_ABSENT = object()


def insert_before(
    task: TaskSnapshot,
    *,
    task_type: str,
    existing: set[str],
    params: dict[str, Any] | None = None,
    name: str | None = None,
    manual: bool = False,
) -> Plan:
    """A new task between the failed task and its dependencies; by default it gets the params the
    failed task last ran with (as values, never rendered again), which is the contract of repair
    task types."""
    _check_operable(task, manual)
    if not re.match(TASK_TYPE_PATTERN, task_type):
        raise SurgeryError(f"{task_type!r} is not a task type")
    if name is None:
        prefix, n = repair_prefix(task.name), 1
        while f"{prefix}{n}" in existing:
            n += 1
        name = f"{prefix}{n}"
    if not re.match(TASK_NAME_PATTERN, name):
        raise SurgeryError(f"{name!r} is not a valid task name (letters, digits and _; at most 63)")
    if name in existing:
        raise SurgeryError(f"a task named {name!r} already exists")
    inserted: dict[str, Any] = {"name": name, "type": task_type}
    if params is not None:
        inserted["params"] = dict(params)
    elif task.resolved is not None:
        # Values an upstream task produced may contain template syntax ("{{ name }}" in an LLM's
        # answer): they are data, so the inserted task takes them as they are.
        inserted["params"] = dict(task.resolved)
        inserted["literalParams"] = True
    else:
        inserted["params"] = dict(task.params)
    # The repair task gets the failed task's params, secrets included: they stay masked for it too.
    secrets = [key for key in task.secrets if key in inserted["params"]]
    if secrets:
        inserted["secrets"] = secrets
    shown = {k: v for k, v in inserted.items() if k != "literalParams"}
    shown["params"] = redact(inserted["params"], secrets)
    diff: list[dict[str, Any]] = [
        {"op": "add", "task": {**shown, "dependsOn": list(task.depends_on)}, "before": task.name},
        {"op": "set", "task": task.name, "field": "dependsOn", "old": list(task.depends_on), "new": [name]},
        {"op": "status", "task": task.name, "to": "pending"},
    ]
    return Plan(Operation.insert, task.name, inserted=inserted, diff=diff)


REPAIR_SUFFIX = "_repair"


def repair_prefix(task_name: str) -> str:
    """What an inserted repair task's name starts with (a number follows): the task's name, cut
    so that the whole name stays within the 63 characters a name may have, up to 9999 repairs."""
    return task_name[: 63 - len(REPAIR_SUFFIX) - 4] + REPAIR_SUFFIX


def skip(task: TaskSnapshot, *, manual: bool = False) -> Plan:
    _check_operable(task, manual)
    if not task.optional:
        raise SurgeryError(
            f"task {task.name!r} is not optional: only tasks marked optional (with a default) are skipped"
        )
    output = task.spec.get("default")
    return Plan(Operation.skip, task.name, output=output, diff=[{"op": "status", "task": task.name, "to": "skipped"}])


def abort(task: TaskSnapshot) -> Plan:
    return Plan(Operation.abort, task.name, diff=[{"op": "abort", "task": task.name}])


# Statuses of a dependency that will not stop a revived task from running.
_NOT_BLOCKING = frozenset({"succeeded", "skipped", "pending", "queued", "running"})


def revivable(root: str, cancelled: dict[str, list[str]], status: dict[str, str]) -> set[str]:
    """Which of the tasks cancelled downstream of ``root`` (name → its dependencies) run again when
    ``root`` does (retried, or skipped): those whose every dependency is ``root``, a task that can
    still finish (``status`` gives each one's), or another of them that runs again. A task that also
    depends on a failed task, or on one cancelled for another reason, stays cancelled; operating on
    that one brings it back in turn. Linear in the tasks and edges given."""
    inner: dict[str, list[str]] = {name: [] for name in cancelled}  # edges within the cancelled set
    waiting = dict.fromkeys(cancelled, 0)
    for name, deps in cancelled.items():
        for dep in deps:
            if dep in cancelled:
                inner[dep].append(name)
                waiting[name] += 1
    ready = [name for name, count in waiting.items() if count == 0]
    back: set[str] = set()
    while ready:  # Kahn's order: a task is judged after all of its cancelled dependencies
        name = ready.pop()
        if all(
            dep == root or dep in back or (dep not in cancelled and status.get(dep) in _NOT_BLOCKING)
            for dep in cancelled[name]
        ):
            back.add(name)
        for child in inner[name]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    return back


def _apply_rule(value: float, rule: str) -> float | None:
    match = re.fullmatch(r"\s*([x*/+-])\s*([0-9.]+)\s*", rule)
    if not match:
        return None
    op, amount = match.group(1), float(match.group(2))
    if op == "/" and amount == 0:
        return None
    results = {"x": value * amount, "*": value * amount, "+": value + amount, "-": value - amount}
    return value / amount if op == "/" else results[op]


def tune(
    params: dict[str, Any], tunable: dict[str, str], timeout: float | None = None
) -> tuple[dict[str, Any] | None, float | None]:
    """Apply an executor's declared tuning (``"x2"``, ``"/2"``, ``"+10"``) to what it names.

    A rule names a param; ``timeout`` names the task's own timeout when the params have no
    ``timeout`` of their own. Returns (new params, new timeout), each None when unchanged.
    """
    tuned = dict(params)
    changed = False
    new_timeout = None
    for key, rule in tunable.items():
        value = params.get(key)
        if key == "timeout" and value is None and timeout is not None:
            new_timeout = _apply_rule(timeout, rule)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        new = _apply_rule(float(value), rule)
        if new is None:
            continue
        tuned[key] = int(new) if isinstance(value, int) and float(new).is_integer() else new
        changed = changed or tuned[key] != value
    return (tuned if changed else None), new_timeout


def over_budget(
    correction: CorrectionSpec,
    *,
    surgeries: int,
    inserted: int,
    elapsed: float,
    task_seconds: float,
    plan: Plan | None = None,
) -> str | None:
    """Why no further surgery is allowed on this workflow, or None."""
    if surgeries >= correction.max_surgeries:
        return f"the workflow used its {correction.max_surgeries} surgeries (spec.correction.maxSurgeries)"
    if plan is not None and plan.inserts and inserted + plan.inserts > correction.max_inserted_tasks:
        return (
            f"inserting would exceed {correction.max_inserted_tasks} inserted tasks (spec.correction.maxInsertedTasks)"
        )
    if correction.time_budget is not None and elapsed > correction.time_budget:
        return (
            f"the workflow ran longer than its time budget of {correction.time_budget:g}s (spec.correction.timeBudget)"
        )
    if correction.task_seconds_budget is not None and task_seconds > correction.task_seconds_budget:
        return (
            f"tasks ran {task_seconds:.1f}s, over the budget of {correction.task_seconds_budget:g}s "
            "(spec.correction.taskSecondsBudget)"
        )
    return None


def replay(tasks: list[dict[str, Any]], diffs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The DAG's structure after applying revision diffs in order to the submitted tasks."""
    submitted = [dict(t) for t in tasks]
    by_name = {t["name"]: t for t in submitted}
    # An inserted task goes right before the task it was inserted before (after those inserted
    # there earlier); one whose target is unknown goes last. Placing them all in one pass at the
    # end keeps replay linear in the DAG, however many tasks were inserted.
    before: dict[str, list[dict[str, Any]]] = {}
    appended: list[dict[str, Any]] = []
    for diff in diffs:
        for op in diff:
            if op["op"] == "add":
                new = dict(op["task"])
                target = op.get("before")
                if isinstance(target, str) and target in by_name:
                    before.setdefault(target, []).append(new)
                else:
                    appended.append(new)
                by_name[new["name"]] = new
            elif op["op"] == "set":
                by_name[op["task"]][op["field"]] = op["new"]
    out: list[dict[str, Any]] = []
    for task in [*submitted, *appended]:
        # Emit everything inserted before `task` (recursively, without recursion), then the task.
        stack: list[tuple[dict[str, Any], bool]] = [(task, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                out.append(node)
                continue
            stack.append((node, True))
            stack.extend((inserted, False) for inserted in reversed(before.get(node["name"], [])))
    return out
