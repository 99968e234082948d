"""The corrective actions a policy may choose, and which of them are valid in a situation.

The order of :class:`CorrectiveAction` is the action index of every policy, network output,
logged distribution and mask. It is part of the feature/action schema: changing it means a new
``FEATURE_SCHEMA_VERSION``.

=====  ===============  ==========================================================================
index  action           what the controller does (DAG surgery)
=====  ===============  ==========================================================================
0      retry_now        new attempt of the same task, no delay
1      retry_backoff    new attempt after the spec's exponential backoff delay
2      retry_tuned      new attempt with tuned parameters (what the executor declares: timeout x2, ...)
3      reroute          replace the task's type by a fallback capability and run it
4      insert_repair    insert the type's repair task before the failed one, then re-run it
5      skip             mark the task skipped with its ``default`` output; the workflow goes on
6      abort            give up: fail the task and the workflow
=====  ===============  ==========================================================================

Validity (:func:`mask`) — an invalid action is never offered to a policy, it is not merely
penalised:

- every action except ``skip`` and ``abort`` changes the DAG, so it needs surgery budget left
  (``surgeries_used < max_surgeries``) and time budget left (``time_budget_used < 1``);
- ``retry_now`` and ``retry_backoff`` also need task retries left, and a retryable error class:
  a plain retry of ``invalid_input``, ``permanent`` or ``poison`` fails the same way again;
- ``retry_tuned`` needs retries left and tunable parameters declared for the task type;
- ``reroute`` needs a fallback capability (the spec's ``fallback`` or a registry alternative);
- ``insert_repair`` needs a repair task type and inserted-task budget left;
- ``skip`` needs the task to be ``optional`` (it then has a default); it is allowed past the
  budgets because it ends the correction gracefully;
- ``abort`` is always valid, so every mask has at least one valid action.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from dagsmith.errors import RETRYABLE, ErrorClass

if TYPE_CHECKING:
    from controller.correction.features import FailureContext


class CorrectiveAction(StrEnum):
    retry_now = "retry_now"
    retry_backoff = "retry_backoff"
    retry_tuned = "retry_tuned"
    reroute = "reroute"
    insert_repair = "insert_repair"
    skip = "skip"
    abort = "abort"

    @property
    def ordinal(self) -> int:
        """The action's index in every distribution, mask and network output."""
        return _ORDINAL[self]


ACTIONS: tuple[CorrectiveAction, ...] = tuple(CorrectiveAction)
N_ACTIONS = len(ACTIONS)
_ORDINAL = {action: i for i, action in enumerate(ACTIONS)}

# Actions that end the correction of a task, whatever happens next.
TERMINAL_ACTIONS = frozenset({CorrectiveAction.skip, CorrectiveAction.abort})

_RETRYABLE_NAMES = frozenset(str(c) for c in RETRYABLE)


def is_plain_retryable(error_class: str) -> bool:
    """Whether a plain retry may fix this class. Unrecognised class names count as ``unknown``."""
    known = error_class in ErrorClass.__members__
    return error_class in _RETRYABLE_NAMES or not known


def limits_reached(ctx: FailureContext) -> list[str]:
    """The correction budgets that ruled actions out in this situation, named as in the spec
    (for the message of a workflow the policy aborts)."""
    out_of_time = ctx.time_budget_used is not None and ctx.time_budget_used >= 1.0
    reached = []
    if ctx.surgeries_used >= ctx.max_surgeries:
        reached.append(f"maxSurgeries ({ctx.max_surgeries}) used up")
    if out_of_time:
        reached.append("timeBudget used up")
    if ctx.retries_used >= ctx.max_retries and (is_plain_retryable(ctx.error_class) or ctx.has_tunable):
        reached.append(f"maxRetries ({ctx.max_retries}) used up")
    if ctx.has_repair and ctx.inserted_used >= ctx.max_inserted:
        reached.append(f"maxInsertedTasks ({ctx.max_inserted}) reached")
    return reached


def mask(ctx: FailureContext) -> tuple[bool, ...]:
    """Validity of each action (in :data:`ACTIONS` order) for this failure."""
    out_of_time = ctx.time_budget_used is not None and ctx.time_budget_used >= 1.0
    can_change = ctx.surgeries_used < ctx.max_surgeries and not out_of_time
    can_retry = can_change and ctx.retries_used < ctx.max_retries
    plain = can_retry and is_plain_retryable(ctx.error_class)
    return (
        plain,  # retry_now
        plain,  # retry_backoff
        can_retry and ctx.has_tunable,  # retry_tuned
        can_change and ctx.has_fallback,  # reroute
        can_change and ctx.has_repair and ctx.inserted_used < ctx.max_inserted,  # insert_repair
        ctx.optional,  # skip
        True,  # abort
    )
