"""The workflow document: one shape for the REST API and, later, ``kubectl apply``.

These models check the *shape* of a document (types, names, unknown keys). Checks that need the
whole graph (duplicates, cycles, references) live in :mod:`dagsmith.validation`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from dagsmith.durations import format_duration, parse_duration

API_VERSION = "dagsmith.io/v1"
KIND = "Workflow"

# Task names appear in templates as ``tasks.<name>``, so they must be valid identifiers there.
TASK_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
# Task types are routing keys and entry-point names: dotted lowercase words, e.g. ``text.upper``.
TASK_TYPE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"
# Workflow names follow Kubernetes object names so the same file works as a custom resource.
WORKFLOW_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# What each pattern asks for, in words, for error messages (the pattern itself follows them).
PATTERN_MEANINGS = {
    TASK_NAME_PATTERN: "letters, digits and '_', not starting with a digit, at most 63 characters",
    TASK_TYPE_PATTERN: "dotted lowercase words of letters, digits and '_', e.g. text.upper",
    WORKFLOW_NAME_PATTERN: "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
    NAMESPACE_PATTERN: "lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63",
    DURATION_PATTERN: "a duration such as 500ms, 10s, 5m, 1h30m or 2d",
}


SUBMISSION = "submission"  # validation context key: the document is being submitted


def _duration(value: Any, info: ValidationInfo) -> float:
    # A submitted document writes durations as strings, as its published schema (and the CRD,
    # which the API server enforces) says; specs already stored are read leniently (numbers of
    # seconds were accepted before).
    if (info.context or {}).get(SUBMISSION) and not isinstance(value, str):
        raise ValueError(f"a duration is a string with a unit, e.g. '10s', '500ms' or '1m30s' (got {value!r})")
    return parse_duration(value)


def _boolean(value: Any, info: ValidationInfo) -> Any:
    # true or false, as the CRD's boolean says; pydantic would also take "yes", "on" or 1.
    if (info.context or {}).get(SUBMISSION) and not isinstance(value, bool):
        raise ValueError(f"write true or false (got {value!r})")
    return value


Boolean = Annotated[bool, BeforeValidator(_boolean)]

# Kubernetes label keys and values, so the document is also a valid custom resource.
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$")
LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_RULE = "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"


def label_problem(key: str, value: str) -> str | None:
    """What makes ``key: value`` an invalid Kubernetes label, or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not LABEL_PREFIX.fullmatch(prefix)):
        return f"label key {key!r}: the prefix before '/' must be a DNS subdomain (e.g. example.com)"
    if not LABEL_NAME.fullmatch(name):
        return f"label key {key!r}: the name must be {LABEL_RULE}"
    if value and not LABEL_NAME.fullmatch(value):
        return f"label {key!r}: the value {value!r} must be empty or {LABEL_RULE}"
    return None


Duration = Annotated[
    float,
    BeforeValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "example": "10s"}),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Backoff(_Model):
    """Delay before retry *n* is ``min(initial * factor**(n-1), max)``."""

    initial: Duration = 1.0
    factor: float = Field(2.0, ge=1.0, le=10.0)
    max: Duration = 300.0

    def delay(self, retry_number: int) -> float:
        return float(min(self.initial * self.factor ** max(retry_number - 1, 0), self.max))

    @model_validator(mode="after")
    def _max_not_below_initial(self, info: ValidationInfo) -> Backoff:
        # A max the author did not write (the default) is no mistake of theirs: it is raised. Set
        # in place and left out of the fields set, so the spec dumps (and is stored, and compared
        # by the operator) as written.
        if "max" not in self.model_fields_set and self.max < self.initial:
            object.__setattr__(self, "max", self.initial)
        # At submission only: a spec stored before this rule is read as it was accepted.
        if (info.context or {}).get(SUBMISSION) and self.max < self.initial:
            raise ValueError(
                f"max ({format_duration(self.max)}) is shorter than initial ({format_duration(self.initial)}): "
                "every delay would be max"
            )
        return self


class RetryPolicy(_Model):
    limit: int = Field(0, ge=0, le=100, description="How many times a failed task is retried.")
    backoff: Backoff = Field(default_factory=Backoff)


class TaskSpec(_Model):
    name: str = Field(pattern=TASK_NAME_PATTERN, description="Unique within the workflow.")
    type: str = Field(pattern=TASK_TYPE_PATTERN, max_length=100, description="The capability that runs it.")
    depends_on: list[str] = Field(default_factory=list, alias="dependsOn")
    params: dict[str, Any] = Field(default_factory=dict)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: Duration | None = None
    queue_timeout: Duration | None = Field(
        None,
        alias="queueTimeout",
        description="Fail the attempt (class unavailable) if no executor starts it within this long; "
        "without it a task of a type no executor runs waits, visibly, in its queue.",
    )
    expect: dict[str, Any] | None = Field(
        None, description="JSON Schema the evaluator checks the task's output against."
    )
    # Room for Correction Mode: what a failing task may be rerouted to, or skipped with.
    fallback: list[Annotated[str, Field(pattern=TASK_TYPE_PATTERN, max_length=100)]] = Field(
        default_factory=list, description="Capabilities to reroute to."
    )
    optional: Boolean = False
    default: Any = None
    secrets: list[str] = Field(
        default_factory=list,
        description="Names of params whose values are redacted in logs, events and the API.",
    )

    @field_validator("timeout", "queue_timeout")
    @classmethod
    def _positive(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ValueError("must be longer than 0 (a task given no time at all could never finish)")
        return value

    @field_validator("fallback", mode="before")
    @classmethod
    def _a_list(cls, value: Any, info: ValidationInfo) -> Any:
        # A list, as the CRD's array says (the API server refuses a lone string), so the file
        # POSTed is the file applied; a spec stored when one type alone was taken still reads.
        if isinstance(value, str):
            if (info.context or {}).get(SUBMISSION):
                raise ValueError(f"fallback is a list of task types: write fallback: [{value}] (got {value!r})")
            return [value]
        return value


# What each manual surgery takes besides the task (and a reason): the API's SurgeryRequest
# refuses anything else, and the CLI says so in terms of its own options first.
SURGERY_OPTIONS: dict[str, tuple[str, ...]] = {
    "retry": ("params", "delay"),
    "replace": ("type", "params"),
    "insert": ("type", "params", "name"),
    "skip": (),
}


class CorrectionMode(StrEnum):
    off = "off"
    rules = "rules"
    learned = "learned"
    shadow = "shadow"


class CorrectionSpec(_Model):
    """How the controller reacts when a task fails beyond a plain retry."""

    mode: CorrectionMode = CorrectionMode.rules
    max_retries: int = Field(
        2,
        ge=0,
        le=100,
        alias="maxRetries",
        description="Retries the policy may spend on a task whose own retry.limit is lower.",
    )
    max_surgeries: int = Field(10, ge=0, le=1000, alias="maxSurgeries")
    max_inserted_tasks: int = Field(5, ge=0, le=1000, alias="maxInsertedTasks")
    time_budget: Duration | None = Field(None, alias="timeBudget")
    task_seconds_budget: float | None = Field(None, ge=0, alias="taskSecondsBudget")

    @field_validator("time_budget")
    @classmethod
    def _positive(cls, value: float | None, info: ValidationInfo) -> float | None:
        # At submission only: a spec stored before this rule is read as it was accepted.
        if (info.context or {}).get(SUBMISSION) and value is not None and value <= 0:
            raise ValueError("must be longer than 0 (leave it out for no time budget)")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads an unquoted `mode: off` as false; that is what the author meant.
        return CorrectionMode.off if value is False else value


# Without spec.output, a workflow's result is its sink tasks' outputs by name — up to this many
# sinks; a wider workflow's result is null (validation warns), and its tasks list every output.
MAX_DEFAULT_OUTPUT_SINKS = 100


class WorkflowBody(_Model):
    params: dict[str, Any] = Field(default_factory=dict)
    tasks: list[TaskSpec] = Field(min_length=1)
    output: Any = Field(None, description="Template(s) over task outputs that form the result.")
    correction: CorrectionSpec = Field(default_factory=CorrectionSpec)
    cancel: Boolean = Field(False, description="Set to true to cancel a running workflow.")


class Metadata(_Model):
    # Kubernetes adds many fields to metadata (uid, resourceVersion, managedFields, ...); the
    # same document must pass through, so only metadata ignores what it does not know.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    name: str = Field(pattern=WORKFLOW_NAME_PATTERN, max_length=253)
    namespace: str | None = Field(None, pattern=NAMESPACE_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _kubernetes_labels(cls, labels: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        if (info.context or {}).get(SUBMISSION):
            for key, value in labels.items():
                problem = label_problem(key, value)
                if problem:
                    raise ValueError(problem)
        return labels


class WorkflowDocument(_Model):
    # Status is written by the system (the Kubernetes operator), never read from a submission.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    api_version: Literal["dagsmith.io/v1"] = Field(alias="apiVersion")
    kind: Literal["Workflow"]
    metadata: Metadata
    spec: WorkflowBody
    status: dict[str, Any] | None = Field(None, exclude=True)

    def task(self, name: str) -> TaskSpec:
        for task in self.spec.tasks:
            if task.name == name:
                return task
        raise KeyError(name)
