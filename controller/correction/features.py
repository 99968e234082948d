"""What a correction decision may look at, and the versioned feature vector built from it.

:class:`FailureContext` is everything the controller knows when a task attempt has failed. It is
stored as JSON with every decision (``to_dict`` / ``from_dict``), so a decision can be replayed
and a policy retrained from the log. :func:`featurize` turns it into the network's input.

The vector is tied to ``FEATURE_SCHEMA_VERSION``: a policy trained on one version is never fed
another (the learned policy falls back to the rules instead). Change anything in the table below,
the error-class list, the bucket count or the action order, and bump the version.

Feature schema v1 (``FEATURE_DIM`` = 43):

=======  ==========================  ===========================================================
index    feature                     encoding
=======  ==========================  ===========================================================
0-10     error class                 one-hot over :data:`ERROR_CLASSES`; any other name (and
                                     ``cancelled``) counts as ``unknown``
11-18    task type                   one-hot over 8 buckets, ``crc32(type) % 8`` (stable across
                                     processes; types may share a bucket)
19       attempt                     ``(min(attempt, 6) - 1) / 5`` — the attempt that failed
20       retries left                ``min(max_retries - retries_used, 5) / 5``, floored at 0
21       surgeries left              ``min(max_surgeries - surgeries_used, 10) / 10``
22       inserted tasks left         ``min(max_inserted - inserted_used, 5) / 5``
23       this attempt's reward       evaluator reward, clipped to [-1, 1]
24       upstream mean reward        clipped to [-1, 1]; 0 when there is no upstream task
25       has upstream                1 if the task has upstream tasks with rewards
26       duration / timeout          clipped to [0, 2], then / 2; 0 when unknown
27       has duration ratio          1 if the task had a timeout and a measured duration
28       executor failure rate       recent failure rate of this task type, clipped to [0, 1]
29-32    has fallback, has repair,   0/1: reroute, insert_repair, retry_tuned, skip possible
         has tunable, optional       in principle (budgets aside)
33       workflow progress           finished tasks / all tasks, clipped to [0, 1]
34       time budget used            fraction of ``spec.correction.timeBudget``, clipped to [0, 1]
35       has time budget             1 if the workflow has a time budget
36-42    actions tried on this task  per action in :data:`ACTIONS` order: ``min(n, 3) / 3``
=======  ==========================  ===========================================================
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from controller.correction.actions import ACTIONS, N_ACTIONS

FEATURE_SCHEMA_VERSION = 1

ERROR_CLASSES: tuple[str, ...] = (
    "transient",
    "timeout",
    "rate_limited",
    "invalid_input",
    "resource_exhausted",
    "unavailable",
    "permanent",
    "unknown",
    "invalid_output",
    "lost",
    "poison",
)
_CLASS_INDEX = {name: i for i, name in enumerate(ERROR_CLASSES)}
TYPE_BUCKETS = 8
FEATURE_DIM = len(ERROR_CLASSES) + TYPE_BUCKETS + 17 + N_ACTIONS


def canonical_error_class(name: str) -> str:
    """The class as the features see it: names outside :data:`ERROR_CLASSES` become ``unknown``."""
    return name if name in _CLASS_INDEX else "unknown"


@dataclass(frozen=True)
class FailureContext:
    """One failed attempt and its surroundings, as the correction policy sees it."""

    error_class: str  # an ErrorClass value; unknown names are allowed (they map to "unknown")
    task_type: str
    attempt: int = 1  # the attempt that just failed (1 = first run)
    retries_used: int = 0
    max_retries: int = 0
    surgeries_used: int = 0  # in this workflow
    max_surgeries: int = 0
    inserted_used: int = 0  # in this workflow
    max_inserted: int = 0
    reward: float = -1.0  # the evaluator's reward for this attempt
    upstream_reward: float | None = None  # mean evaluator reward of the task's upstream tasks
    duration_ratio: float | None = None  # this attempt's duration / the task's timeout
    executor_failure_rate: float = 0.0  # recent failures / attempts for this task type
    has_fallback: bool = False
    has_repair: bool = False
    has_tunable: bool = False
    optional: bool = False  # the task may be skipped with its default
    progress: float = 0.0  # fraction of the workflow's tasks finished
    time_budget_used: float | None = None  # fraction of the correction time budget, None if none
    tried: tuple[int, ...] = field(default=(0,) * N_ACTIONS)  # per action, on this task

    def __post_init__(self) -> None:
        if len(self.tried) != N_ACTIONS:
            raise ValueError(f"tried must have {N_ACTIONS} counts (one per action), got {len(self.tried)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``tried`` is keyed by action name so the log stays readable."""
        out = asdict(self)
        out["tried"] = {str(a): n for a, n in zip(ACTIONS, self.tried, strict=True)}
        out["feature_schema_version"] = FEATURE_SCHEMA_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FailureContext:
        """The inverse of :meth:`to_dict`. Unknown keys are an error: they mean another schema."""
        data = dict(data)
        version = data.pop("feature_schema_version", FEATURE_SCHEMA_VERSION)
        if version != FEATURE_SCHEMA_VERSION:
            raise ValueError(f"feature schema version {version} is not {FEATURE_SCHEMA_VERSION}")
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown failure-context fields: {sorted(unknown)}")
        tried = data.get("tried")
        if isinstance(tried, dict):
            data["tried"] = tuple(int(tried.get(str(a), 0)) for a in ACTIONS)
        elif tried is not None:
            data["tried"] = tuple(int(n) for n in tried)
        return cls(**data)


def _clip(value: float, low: float, high: float) -> float:
    return low if value < low else high if value > high else value


def type_bucket(task_type: str) -> int:
    return zlib.crc32(task_type.encode()) % TYPE_BUCKETS


def featurize(ctx: FailureContext) -> list[float]:
    """The feature vector of schema v1 (see the module docstring for the table)."""
    x = [0.0] * FEATURE_DIM
    x[_CLASS_INDEX.get(ctx.error_class, _CLASS_INDEX["unknown"])] = 1.0
    base = len(ERROR_CLASSES)
    x[base + type_bucket(ctx.task_type)] = 1.0
    i = base + TYPE_BUCKETS
    x[i] = (min(max(ctx.attempt, 1), 6) - 1) / 5
    x[i + 1] = _clip(ctx.max_retries - ctx.retries_used, 0, 5) / 5
    x[i + 2] = _clip(ctx.max_surgeries - ctx.surgeries_used, 0, 10) / 10
    x[i + 3] = _clip(ctx.max_inserted - ctx.inserted_used, 0, 5) / 5
    x[i + 4] = _clip(ctx.reward, -1.0, 1.0)
    if ctx.upstream_reward is not None:
        x[i + 5] = _clip(ctx.upstream_reward, -1.0, 1.0)
        x[i + 6] = 1.0
    if ctx.duration_ratio is not None:
        x[i + 7] = _clip(ctx.duration_ratio, 0.0, 2.0) / 2
        x[i + 8] = 1.0
    x[i + 9] = _clip(ctx.executor_failure_rate, 0.0, 1.0)
    x[i + 10] = float(ctx.has_fallback)
    x[i + 11] = float(ctx.has_repair)
    x[i + 12] = float(ctx.has_tunable)
    x[i + 13] = float(ctx.optional)
    x[i + 14] = _clip(ctx.progress, 0.0, 1.0)
    if ctx.time_budget_used is not None:
        x[i + 15] = _clip(ctx.time_budget_used, 0.0, 1.0)
        x[i + 16] = 1.0
    i += 17
    for k, n in enumerate(ctx.tried):
        x[i + k] = min(n, 3) / 3
    return x
