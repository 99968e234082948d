"""Task and workflow states, and which transitions exist.

Task::

    pending ──dispatch──▶ queued ──started──▶ running ──pass──▶ succeeded
       ▲                    │                    │
       └──retry (backoff)───┴──────fail──────────┴──▶ failed (no retries left / not retryable)
    pending ──upstream failed / workflow cancelled──▶ cancelled
    pending ──skipped by correction──▶ skipped

A result may arrive while a task is still ``queued`` (fast tasks report start and finish in one
message); it then moves straight to its outcome.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    pending = "pending"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"
    cancelled = "cancelled"


class WorkflowStatus(StrEnum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_TASK = frozenset({TaskStatus.succeeded, TaskStatus.failed, TaskStatus.skipped, TaskStatus.cancelled})
# A dependency in one of these states lets its dependents run.
SATISFIES_DEPENDENTS = frozenset({TaskStatus.succeeded, TaskStatus.skipped})
IN_FLIGHT = frozenset({TaskStatus.queued, TaskStatus.running})
ACTIVE_TASK = frozenset({TaskStatus.pending, TaskStatus.queued, TaskStatus.running})
TERMINAL_WORKFLOW = frozenset({WorkflowStatus.succeeded, WorkflowStatus.failed, WorkflowStatus.cancelled})
