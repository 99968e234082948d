"""The hand-written ``rules`` policy: error class x attempt -> an ordered list of actions.

It is the baseline every learned policy is measured against and the fallback when the learned
policy cannot be trusted with a decision. It reads only the error class and the attempt number
(never the rest of the context), so it is easy to predict and to review.

Each cell lists actions in order of preference; the first one that is valid under the mask is
taken. After the cell's own actions, every cell falls through to ``skip`` (if the task is
optional) and finally ``abort``, which is always valid.

=====================  =========================  ==========================  =====================
error class            attempt 1                  attempt 2                   attempt 3+
=====================  =========================  ==========================  =====================
transient, lost,       retry_now                  retry_backoff               reroute, retry_backoff
unknown
unavailable            retry_backoff              reroute, retry_backoff      reroute, retry_backoff
rate_limited           retry_backoff              retry_backoff               retry_backoff
timeout                retry_tuned, retry_now     reroute, retry_tuned        reroute, retry_backoff
resource_exhausted     retry_tuned, reroute       retry_tuned, reroute        reroute
invalid_output         insert_repair, retry_now   insert_repair               —
invalid_input          insert_repair              —                           —
permanent, poison      —                          —                           —
=====================  =========================  ==========================  =====================

Why: a one-off blip (transient, lost) is usually gone on an immediate retry; a second failure
suggests a struggling dependency, so wait; a third, a different executor. Rate limits need time.
Timeouts and resource exhaustion are most often the task outgrowing its limits, so give it more
room first. Bad data needs repairing, not re-running. Permanent errors are not retried at all.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.correction.actions import CorrectiveAction
from controller.correction.features import FailureContext, canonical_error_class

A = CorrectiveAction
Cell = tuple[CorrectiveAction, ...]

_BLIP: tuple[Cell, Cell, Cell] = ((A.retry_now,), (A.retry_backoff,), (A.reroute, A.retry_backoff))
_NOTHING: tuple[Cell, Cell, Cell] = ((), (), ())

RULES_TABLE: dict[str, tuple[Cell, Cell, Cell]] = {
    "transient": _BLIP,
    "lost": _BLIP,
    "unknown": _BLIP,
    "unavailable": ((A.retry_backoff,), (A.reroute, A.retry_backoff), (A.reroute, A.retry_backoff)),
    "rate_limited": ((A.retry_backoff,), (A.retry_backoff,), (A.retry_backoff,)),
    "timeout": ((A.retry_tuned, A.retry_now), (A.reroute, A.retry_tuned), (A.reroute, A.retry_backoff)),
    "resource_exhausted": ((A.retry_tuned, A.reroute), (A.retry_tuned, A.reroute), (A.reroute,)),
    "invalid_output": ((A.insert_repair, A.retry_now), (A.insert_repair,), ()),
    "invalid_input": ((A.insert_repair,), (), ()),
    "permanent": _NOTHING,
    "poison": _NOTHING,
}
FALL_THROUGH: Cell = (A.skip, A.abort)
RULES_VERSION = "rules-v1"


def attempt_bucket(attempt: int) -> int:
    """0 for attempt 1, 1 for attempt 2, 2 for attempt 3 and later."""
    return min(max(attempt, 1), 3) - 1


def first_valid(preferences: Sequence[CorrectiveAction], valid: Sequence[bool]) -> CorrectiveAction:
    """The first preferred action the mask allows, else skip, else abort."""
    for action in (*preferences, *FALL_THROUGH):
        if valid[action.ordinal]:
            return action
    return A.abort  # unreachable: abort is always valid, but keep the guarantee local


def rules_action(ctx: FailureContext, valid: Sequence[bool]) -> CorrectiveAction:
    cells = RULES_TABLE[canonical_error_class(ctx.error_class)]
    return first_valid(cells[attempt_bucket(ctx.attempt)], valid)
