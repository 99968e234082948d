"""Response bodies, as pydantic models, so /openapi.json describes exactly what the API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from dagsmith.spec import SURGERY_OPTIONS, TASK_NAME_PATTERN, TASK_TYPE_PATTERN


class Problem(BaseModel):
    path: str
    message: str
    code: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Submitted(BaseModel):
    id: str
    name: str
    namespace: str
    status: str
    created: bool = Field(description="False when an earlier submission with the same Idempotency-Key is returned.")
    warnings: list[Problem] = Field(default_factory=list)


class Progress(BaseModel):
    total: int
    pending: int
    queued: int
    running: int
    succeeded: int
    failed: int
    skipped: int
    cancelled: int


class Workflow(BaseModel):
    id: str
    name: str
    namespace: str
    labels: dict[str, str]
    status: str
    source: str
    progress: Progress
    total_reward: float
    dag_revision: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: dict[str, Any] | None
    waiting_for: list[str] = Field(
        default_factory=list,
        description="Task types of its queued tasks that no live executor declares, so they wait "
        "(GET /v1/workflows/{id} only; empty in lists).",
    )


class WorkflowList(BaseModel):
    items: list[Workflow]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= to get the next page.")


class Task(BaseModel):
    id: int
    name: str
    type: str
    status: str
    depends_on: list[str]
    params: dict[str, Any]
    resolved_params: dict[str, Any] | None
    attempt: int
    retries: int
    max_retries: int
    output: Any = None
    error: dict[str, Any] | None
    reward: float | None
    feedback_notes: dict[str, Any] | None
    executor_id: str | None
    not_before: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    inserted_by_revision: int | None


class TaskList(BaseModel):
    items: list[Task]
    next_after: int | None = Field(None, description="Pass as ?after= to get the next page.")


class Result(BaseModel):
    id: str
    status: str
    output: Any = None
    error: dict[str, Any] | None
    total_reward: float


class DagNode(BaseModel):
    id: str
    task_id: int | None = Field(None, description="None for a node shown at a past revision")
    type: str
    status: str | None = Field(None, description="The current status (None at a past revision)")
    reward: float | None = None
    attempt: int | None = None
    inserted: bool = Field(description="Added by DAG surgery")
    rerouted: bool = Field(description="Runs on another type than the spec says (DAG surgery)")


class DagEdge(BaseModel):
    from_: str = Field(alias="from")
    to: str


class Dag(BaseModel):
    workflow_id: str
    revision: int
    nodes: list[DagNode]
    edges: list[DagEdge]


class Cancelled(BaseModel):
    id: str
    status: Literal["cancelling"]


class Executor(BaseModel):
    id: str
    types: list[str]
    capabilities: list[dict[str, Any]]
    version: str
    hostname: str
    pid: int
    concurrency: int
    running: int
    stopping: bool
    alive: bool
    first_seen: datetime
    last_heartbeat: datetime


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class SurgeryRequest(BaseModel):
    """A DAG surgery on a workflow (running, or finished: a retry revives it)."""

    model_config = {"extra": "forbid"}

    op: Literal["retry", "replace", "insert", "skip"] = Field(
        description="retry (optionally with changed params), replace the task's type, insert a task "
        "before it, or skip it (optional tasks only)"
    )
    task: str = Field(max_length=63, pattern=TASK_NAME_PATTERN, description="The task operated on.")
    params: dict[str, Any] | None = Field(
        None,
        description="retry, replace: params merged over the task's; insert: the new task's params "
        "(default: the task's)",
    )
    type: str | None = Field(
        None,
        max_length=100,
        pattern=TASK_TYPE_PATTERN,
        description="replace: the new type; insert: the new task's type",
    )
    name: str | None = Field(None, max_length=63, pattern=TASK_NAME_PATTERN, description="insert: the new task's name")
    delay: str | None = Field(None, description="retry: wait this long first (a duration, e.g. '30s')")
    reason: str = Field("", max_length=1000, description="Why; kept in the revision history.")

    @field_validator("reason", "delay")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("contains a NUL character (\\u0000), which cannot be stored")
        return value

    @model_validator(mode="after")
    def _options_fit_the_operation(self) -> SurgeryRequest:
        # An option the operation does not use is refused rather than silently ignored.
        allowed = SURGERY_OPTIONS[self.op]
        given = [f for f in ("params", "type", "name", "delay") if getattr(self, f) is not None]
        wrong = [f for f in given if f not in allowed]
        if wrong:
            takes = f"it takes only {', '.join(allowed)}" if allowed else "it takes no options"
            raise ValueError(f"{self.op} does not take {', '.join(wrong)} ({takes})")
        if self.op in ("replace", "insert") and self.type is None:
            raise ValueError(f"{self.op} needs the type of the task to run (type)")
        return self


class Surgery(BaseModel):
    workflow_id: str
    revision: int
    operation: str
    task: str
    inserted_task_id: int | None = None
    diff: list[dict[str, Any]]
    warnings: list[str] = Field(
        default_factory=list, description="E.g. a new task type no executor has declared yet (the task waits for one)."
    )


class Revision(BaseModel):
    revision: int
    parent_revision: int
    actor: str
    operation: str
    task: str
    reason: dict[str, Any]
    diff: list[dict[str, Any]]
    created_at: datetime
