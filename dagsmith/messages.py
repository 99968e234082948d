"""What crosses RabbitMQ, as pydantic models. Every message is JSON.

Flow: controller --TaskMessage--> executor --ResultBatch--> evaluator --EvaluatedBatch-->
controller. Task messages travel one per task (so redelivery and the delivery limit apply per
task), except that many ready tasks of a fast type travel as a TaskBundle (see
controller.bundling); results travel in batches that form under load. Executors also send StartedMessage and
HeartbeatMessage straight to the controller, and the controller broadcasts CancelMessage to every
executor.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dagsmith.errors import ErrorClass


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TaskRef(_Message):
    """What identifies an attempt and what the evaluator needs to judge it; echoed back by executors."""

    task_id: int
    attempt: int
    workflow_id: str
    name: str
    type: str
    timeout: float | None = None
    expect: dict[str, Any] | None = None
    max_attempts: int = 1
    dispatched_at: float = 0.0

    @property
    def idempotency_key(self) -> str:
        """Stable for one attempt; executors pass it to the outside world to make side effects safe."""
        return f"{self.task_id}:{self.attempt}"


class TaskMessage(TaskRef):
    params: dict[str, Any] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)
    # A message sent again with a fresh delivery count (a dead-lettered bundle's member, or a
    # dead-lettered message whose last delivery never started) starts a new series: start reports
    # name it, so delivery counts of an earlier series are not taken for this one's.
    series: int = 0
    redrives: int = 0  # of those, the times it was sent again after its last delivery never started


class TaskBundle(_Message):
    """Several task messages of one type in one AMQP message (AMQP ``type`` property ``BUNDLE``).

    Executors run the members like single messages and ack the bundle once every member's result
    is confirmed. A bundle the broker dead-letters is split by the controller into single
    messages, so a poison task is still singled out by the delivery limit.
    """

    tasks: list[TaskMessage]


BUNDLE = "dagsmith.bundle"


def encode_bundle(bodies: list[bytes]) -> bytes:
    """A TaskBundle's JSON from its members' encoded TaskMessages (each encoded once)."""
    return b'{"tasks":[' + b",".join(bodies) + b"]}"


def without_nul(value: Any) -> Any:
    """``value`` with every NUL character replaced by U+FFFD, keys included: Postgres can store
    NUL in neither text nor jsonb, and an error quotes whatever its handler saw."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {without_nul(k): without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nul(v) for v in value]
    return value


class TaskError(_Message):
    error_class: ErrorClass = Field(alias="class")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)

    # Errors are the one thing executors report that nothing else checks for NUL (outputs with
    # one are refused): cleaning them here covers every executor, ours or not, and the evaluator.
    _storable = field_validator("message", "details")(without_nul)

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class ResultMessage(_Message):
    task: TaskRef
    executor_id: str
    ok: bool
    output: Any = None
    error: TaskError | None = None
    started_at: float
    finished_at: float

    @property
    def duration(self) -> float:
        return max(self.finished_at - self.started_at, 0.0)


class ResultBatch(_Message):
    """Executors send results in batches (see dagsmith.amqp.BatchPublisher)."""

    results: list[ResultMessage]


class Check(_Message):
    name: str
    passed: bool
    detail: str = ""


class Evaluation(_Message):
    verdict: Literal["pass", "fail"]
    reward: float
    feedback: dict[str, Any]  # stored as the task's feedback_notes
    error: TaskError | None = None  # the attempt's error, including invalid_output from checks

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


class EvaluatedMessage(_Message):
    result: ResultMessage
    evaluation: Evaluation


class EvaluatedBatch(_Message):
    items: list[EvaluatedMessage]


class StartedMessage(_Message):
    kind: Literal["started"] = "started"
    task_id: int
    attempt: int
    workflow_id: str
    type: str
    executor_id: str
    started_at: float
    dispatched_at: float = 0.0
    # The broker's count of earlier deliveries of the task's message (0 for the first): reported
    # at once, before the task runs, when it is above 0, so a message that crashes executors is
    # told apart from one returned by dropped connections.
    delivery: int = 0
    series: int = 0  # the message's series (TaskMessage.series)


class Capability(_Message):
    """What an executor declares about a task type it runs (used by the registry and correction)."""

    type: str
    description: str = ""
    repair: str | None = None  # task type that can repair this type's bad input
    tunable: dict[str, str] = Field(default_factory=dict)  # param -> how to tune it, e.g. "x2", "/2"
    fallback: list[str] = Field(default_factory=list)  # task types that can stand in for this one


class HeartbeatMessage(_Message):
    kind: Literal["heartbeat"] = "heartbeat"
    executor_id: str
    version: str
    hostname: str
    pid: int
    concurrency: int
    capabilities: list[Capability]
    running: list[tuple[int, int]] = Field(default_factory=list)  # (task_id, attempt)
    # Attempts finished recently (within a lease lifetime) whose result the broker has confirmed:
    # their leases end, since no executor can lose them any more (a stopped evaluator must not
    # expire them).
    handed_off: list[tuple[int, int]] = Field(default_factory=list)
    stopping: bool = False
    # Cancellations broadcast while the executor was not connected never reached it: until it has
    # the recent ones, it asks, and a controller sends them to its own control queue.
    control_queue: str | None = None
    wants_cancellations: bool = False


ExecutorEvent = Annotated[StartedMessage | HeartbeatMessage, Field(discriminator="kind")]


class EventEnvelope(_Message):
    event: ExecutorEvent


class CancelMessage(_Message):
    """Workflows that were cancelled or failed, each with when (``at``, epoch seconds, in the same
    order): executors stop their tasks dispatched until then. A task dispatched later belongs to
    the workflow brought back by a surgery, and runs."""

    workflow_ids: list[str]
    at: list[float] = Field(default_factory=list)
    snapshot: bool = False  # the recent cancellations, sent to one executor that just connected

    def times(self, received: float) -> dict[str, float]:
        """Each workflow's time; one without (from an older controller) counts as ``received``,
        when it reached the executor, so what was dispatched before stops and a later revival runs."""
        return {wid: self.at[i] if i < len(self.at) else received for i, wid in enumerate(self.workflow_ids)}


class DeadLetter(_Message):
    """Why RabbitMQ dead-lettered a task message (read from its x-death header)."""

    task_id: int
    attempt: int
    deliveries: int
