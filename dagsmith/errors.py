"""Error classes that cross process boundaries, and the package's exception hierarchy."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorClass(StrEnum):
    """How a task attempt failed. Executors report one; the evaluator may add ``invalid_output``.

    The class drives what happens next (retry, correct, give up), so executors should pick the
    most specific one they can.
    """

    transient = "transient"
    timeout = "timeout"
    rate_limited = "rate_limited"
    invalid_input = "invalid_input"
    resource_exhausted = "resource_exhausted"
    unavailable = "unavailable"
    permanent = "permanent"
    unknown = "unknown"
    # Set by the evaluator when an executor succeeded but its output failed the task's checks.
    invalid_output = "invalid_output"
    # Set by the controller.
    lost = "lost"  # the executor stopped heartbeating (crashed or hung) while running the task
    poison = "poison"  # the task message crashed executors too many times and was dead-lettered
    cancelled = "cancelled"


# Classes a plain retry may fix. ``invalid_input`` and ``permanent`` will fail the same way again.
RETRYABLE: frozenset[ErrorClass] = frozenset(
    {
        ErrorClass.transient,
        ErrorClass.timeout,
        ErrorClass.rate_limited,
        ErrorClass.resource_exhausted,
        ErrorClass.unavailable,
        ErrorClass.unknown,
        ErrorClass.invalid_output,
        ErrorClass.lost,
    }
)


class DagsmithError(Exception):
    """Base class of every error Dagsmith raises on purpose."""


class SpecError(DagsmithError):
    """A workflow document is invalid. ``problems`` lists every problem found, each with its path."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        self.problems = problems
        first = problems[0] if problems else {"path": "", "message": "invalid spec"}
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        where = f"{first['path']}: " if first.get("path") else ""
        super().__init__(f"{where}{first['message']}{more}")


class TemplateError(DagsmithError):
    """A template could not be rendered (unknown reference, unsafe operation, result too large)."""


class NotFound(DagsmithError):
    """The thing asked for does not exist (or is not visible to the caller)."""


class Conflict(DagsmithError):
    """The request does not fit the current state (for example, a result asked for too early)."""


class Forbidden(DagsmithError):
    """The caller may see this, but not do what it asked (its token lacks the scope it needs)."""
