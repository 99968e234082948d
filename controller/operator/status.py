"""The Workflow resource's ``.status``: a pure function of what the store says.

Nothing here does I/O. :func:`build_status` turns a :class:`StoreView` (one workflow row and a
bounded sample of its tasks) into the status body; :func:`status_patch` says what to send, or
``None`` when nothing changed; :func:`events_between` names the Kubernetes Events a change
deserves (started, task failed or retried, surgery applied, finished). The schema of the status
in the CRD is generated from :class:`WorkflowStatus`, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Large DAGs must not blow the object size limit (1.5 MiB in etcd): the status lists at most this
# many tasks (failed first, then running), and points to the REST API for the rest.
MAX_STATUS_TASKS = 50
MAX_MESSAGE = 500
MAX_TASK_ERROR = 200

# Conditions this module computes; any other condition in the previous status (Accepted,
# SpecChangeRejected: set by the operator's handlers) is carried over untouched.
OWNED_CONDITIONS = ("Running", "Completed")


class Phase(StrEnum):
    Pending = "Pending"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Cancelled = "Cancelled"


TERMINAL_PHASES = frozenset({Phase.Succeeded, Phase.Failed, Phase.Cancelled})
_PHASES = {"pending": Phase.Pending, "running": Phase.Running, "succeeded": Phase.Succeeded}
_PHASES.update({"failed": Phase.Failed, "cancelled": Phase.Cancelled})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Condition(_Model):
    type: str = Field(description="Accepted, Running, Completed or SpecChangeRejected.")
    status: str = Field(pattern="^(True|False|Unknown)$")
    reason: str = Field(pattern="^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field(alias="lastTransitionTime", json_schema_extra={"format": "date-time"})
    observed_generation: int | None = Field(None, alias="observedGeneration", ge=0)


class TaskLine(_Model):
    name: str
    type: str
    phase: str = Field(description="pending, queued, running, succeeded, failed, skipped or cancelled.")
    attempts: int = 0
    reward: float | None = None
    error: str | None = Field(None, description="Error class and the start of the message of the last failure.")


class WorkflowStatus(_Model):
    """What ``kubectl get dwf`` and ``kubectl describe dwf`` show."""

    phase: Phase | None = None
    progress: str | None = Field(None, description="Finished tasks / all tasks, e.g. 7/12.")
    total: int | None = None
    succeeded: int | None = None
    failed: int | None = None
    running: int | None = None
    surgeries: int | None = Field(None, description="DAG surgeries applied by Correction Mode.")
    reward: float | None = Field(None, description="Sum of the evaluator's rewards over task attempts.")
    policy_version: str | None = Field(None, alias="policyVersion")
    workflow_id: str | None = Field(None, alias="workflowId", description="The workflow's id in the REST API.")
    started_at: str | None = Field(None, alias="startedAt", json_schema_extra={"format": "date-time"})
    finished_at: str | None = Field(None, alias="finishedAt", json_schema_extra={"format": "date-time"})
    message: str | None = None
    observed_generation: int | None = Field(None, alias="observedGeneration")
    conditions: list[Condition] = Field(default_factory=list)
    tasks: list[TaskLine] = Field(
        default_factory=list, description=f"At most {MAX_STATUS_TASKS} tasks: failed first, then running."
    )
    tasks_omitted: int | None = Field(None, alias="tasksOmitted", description="Tasks not listed in .status.tasks.")
    detail: str | None = Field(None, description="Where the REST API has every task and the result.")


@dataclass(frozen=True)
class TaskView:
    name: str
    type: str
    status: str
    attempt: int
    reward: float | None
    error: Mapping[str, Any] | None


@dataclass(frozen=True)
class StoreView:
    """One workflow as the store has it: the row's counters and a bounded sample of tasks."""

    workflow_id: str
    status: str
    counts: Mapping[str, int]  # total, pending, queued, running, succeeded, failed, skipped, cancelled
    total_reward: float
    surgeries: int
    policy_version: str | None
    started_at: datetime | None
    finished_at: datetime | None
    error: Mapping[str, Any] | None
    tasks: tuple[TaskView, ...]


@dataclass(frozen=True)
class EventNote:
    type: str  # Normal | Warning
    reason: str
    message: str


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at is not None else None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_text(error: Mapping[str, Any] | None) -> str | None:
    if not error:
        return None
    klass = error.get("class") or error.get("code") or "error"
    message = str(error.get("message") or "")
    return _cut(f"{klass}: {message}" if message else str(klass), MAX_TASK_ERROR)


def phase_of(store_status: str) -> Phase:
    return _PHASES[store_status]


def finished_count(counts: Mapping[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("succeeded", "failed", "skipped", "cancelled"))


def _message(view: StoreView, phase: Phase) -> str:
    c = view.counts
    done, total = finished_count(c), c.get("total", 0)
    if phase is Phase.Pending:
        text = f"submitted; waiting for the controller ({total} tasks)"
    elif phase is Phase.Running:
        text = f"{done}/{total} tasks finished, {c.get('running', 0) + c.get('queued', 0)} in flight"
        if c.get("failed"):
            text += f", {c['failed']} failed"
    elif phase is Phase.Succeeded:
        text = f"succeeded: {c.get('succeeded', 0)}/{total} tasks succeeded"
    else:
        text = _outcome(phase.value.lower(), view.error)
    return _cut(text, MAX_MESSAGE)


def _outcome(word: str, error: Mapping[str, Any] | None) -> str:
    """``failed: task_failed: …``, but the phase said once: a cancelled workflow's error is
    ``{code: cancelled, message: cancelled by request}``, which reads as "cancelled by request"."""
    error = error or {}
    code = error.get("class") or error.get("code")
    parts = [str(code) if code and code != word else "", str(error.get("message") or "")]
    text = ": ".join(part for part in parts if part) or "no reason given"
    if text == word or text.startswith((f"{word} ", f"{word}:")):
        return text
    return f"{word}: {text}"


def condition(
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    previous: Mapping[str, Any] | None = None,
    generation: int | None = None,
) -> dict[str, Any]:
    """A condition; ``lastTransitionTime`` moves only when ``status`` changes. ``generation`` is
    the ``metadata.generation`` it was set from (Kubernetes' condition convention)."""
    value = "True" if status else "False"
    since = _iso(now)
    if previous and previous.get("status") == value and previous.get("lastTransitionTime"):
        since = previous["lastTransitionTime"]
    out: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": _cut(message, MAX_MESSAGE),
        "lastTransitionTime": since,
    }
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def merge_conditions(previous: list[Mapping[str, Any]] | None, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace conditions of the updated types, keep the others, in a stable order."""
    by_type = {c["type"]: dict(c) for c in previous or []}
    for c in updates:
        by_type[c["type"]] = c
    order = ["Accepted", "Running", "Completed", "SpecChangeRejected"]
    return sorted(by_type.values(), key=lambda c: (order.index(c["type"]) if c["type"] in order else 99, c["type"]))


def _task_lines(view: StoreView) -> list[dict[str, Any]]:
    lines = []
    for t in view.tasks[:MAX_STATUS_TASKS]:
        line: dict[str, Any] = {"name": t.name, "type": t.type, "phase": t.status, "attempts": t.attempt}
        if t.reward is not None:
            line["reward"] = round(t.reward, 4)
        error = _error_text(t.error)
        if error and t.status != "succeeded":
            line["error"] = error
        lines.append(line)
    return lines


def build_status(
    view: StoreView,
    *,
    previous: Mapping[str, Any] | None,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """The whole ``.status`` for ``view``. Fields the store does not know are carried over."""
    previous = previous or {}
    phase = phase_of(view.status)
    c = view.counts
    total = c.get("total", 0)
    old_conditions = {cond.get("type"): cond for cond in previous.get("conditions") or []}
    observed = previous.get("observedGeneration", generation)  # the spec that runs (edits are refused)
    running = condition(
        "Running",
        phase is Phase.Running,
        "TasksInFlight" if phase is Phase.Running else phase.value,
        _message(view, phase),
        now,
        old_conditions.get("Running"),
        observed,
    )
    completed = condition(
        "Completed",
        phase in TERMINAL_PHASES,
        phase.value if phase in TERMINAL_PHASES else "NotFinished",
        _message(view, phase),
        now,
        old_conditions.get("Completed"),
        observed,
    )
    lines = _task_lines(view)
    status: dict[str, Any] = {
        "phase": phase.value,
        "progress": f"{finished_count(c)}/{total}",
        "total": total,
        "succeeded": c.get("succeeded", 0),
        "failed": c.get("failed", 0),
        "running": c.get("running", 0) + c.get("queued", 0),
        "surgeries": view.surgeries,
        "reward": round(view.total_reward, 4),
        "policyVersion": view.policy_version,
        "workflowId": view.workflow_id,
        "startedAt": _iso(view.started_at),
        "finishedAt": _iso(view.finished_at),
        "message": _message(view, phase),
        "observedGeneration": observed,
        "conditions": merge_conditions(previous.get("conditions"), [running, completed]),
        "tasks": lines,
        "tasksOmitted": max(total - len(lines), 0),
        "detail": f"GET /v1/workflows/{view.workflow_id}/tasks",
    }
    return {k: v for k, v in status.items() if v is not None}


def status_patch(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch from ``previous`` to ``new`` (top-level keys), or None when they are equal."""
    previous = previous or {}
    patch: dict[str, Any] = {k: v for k, v in new.items() if previous.get(k) != v}
    patch.update({k: None for k in previous if k not in new})
    return patch or None


def _lines_by_name(status: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {line["name"]: line for line in status.get("tasks") or []}


def events_between(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[EventNote]:
    """The Events worth posting for a status change. Replaying the same pair posts nothing new."""
    previous = previous or {}
    notes: list[EventNote] = []
    old_phase, phase = previous.get("phase"), new.get("phase")
    wid = new.get("workflowId", "?")
    if phase != old_phase and phase in (Phase.Running, *TERMINAL_PHASES) and old_phase in (None, Phase.Pending):
        notes.append(EventNote("Normal", "Started", f"workflow {wid} started: {new.get('total', 0)} tasks"))

    old_lines = _lines_by_name(previous)
    named_failures = 0
    for name, line in _lines_by_name(new).items():
        before = old_lines.get(name, {})
        if line.get("phase") == "failed" and before.get("phase") != "failed":
            named_failures += 1
            notes.append(
                EventNote(
                    "Warning",
                    "TaskFailed",
                    f"task {name} ({line.get('type')}) failed after {line.get('attempts', 0)} attempt(s): "
                    f"{line.get('error') or 'no error recorded'}",
                )
            )
        elif line.get("error") and line.get("attempts", 0) > max(before.get("attempts", 0), 1):
            notes.append(
                EventNote(
                    "Warning",
                    "TaskRetried",
                    f"task {name} ({line.get('type')}) is on attempt {line['attempts']} after: {line['error']}",
                )
            )
    unnamed = new.get("failed", 0) - previous.get("failed", 0) - named_failures
    if unnamed > 0:
        notes.append(
            EventNote("Warning", "TaskFailed", f"{unnamed} more task(s) failed; see {new.get('detail', 'the API')}")
        )

    surgeries, old_surgeries = new.get("surgeries", 0), previous.get("surgeries", 0)
    if surgeries > old_surgeries:
        notes.append(
            EventNote(
                "Normal",
                "SurgeryApplied",
                f"{surgeries - old_surgeries} DAG surgery(ies) applied; {surgeries} in total, "
                f"{new.get('total', 0)} tasks now",
            )
        )

    if phase != old_phase and phase in TERMINAL_PHASES:
        kind = "Normal" if phase == Phase.Succeeded else "Warning"
        text = f"{new.get('message', phase)} (reward {new.get('reward', 0)})"
        notes.append(EventNote(kind, str(phase), text))
    return notes
