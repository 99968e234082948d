"""Which ready tasks travel together in one message: pure decisions, no I/O.

For a task that runs in microseconds, the cost of moving it dominates: an AMQP publish and its
confirm, an entry in the quorum queue's log, a delivery and an ack, and the Python around each.
When many tasks of a *fast* type become ready in one round, the controller sends them in bundles
(``TaskBundle``) and those costs are shared.

Only fast types are bundled. A bundle goes to one executor, so bundling slow tasks would pile
work on one executor while others wait; and a burst is spread over at least ``SPREAD`` messages
so that every executor gets a share. A type counts as fast while the moving average of its recent
attempts' run times is under ``bundle_fast_below``; the controller learns it from the results it
applies, so a new or restarted controller sends one task per message until it has seen enough.
"""

from __future__ import annotations

import math
from collections.abc import Callable

MIN_SEEN = 20  # results of a type before its average is trusted
ALPHA = 0.1  # weight of the newest run time in the moving average
BUNDLE_MIN = 4  # fewer ready tasks of a type than this travel one per message
SPREAD = 8  # a burst of one type goes out in at least this many messages
MAX_MEMBER_BYTES = 8 * 1024  # larger task messages travel alone (a bundle stays under 256 KiB)


class RunTimes:
    """A moving average of each task type's run time, from the results the controller applies."""

    def __init__(self, fast_below: float) -> None:
        self.fast_below = fast_below
        self._average: dict[str, float] = {}
        self._seen: dict[str, int] = {}

    def observe(self, task_type: str, seconds: float) -> None:
        average = self._average.get(task_type)
        self._average[task_type] = seconds if average is None else average + ALPHA * (seconds - average)
        self._seen[task_type] = self._seen.get(task_type, 0) + 1

    def fast(self, task_type: str) -> bool:
        return self._seen.get(task_type, 0) >= MIN_SEEN and self._average[task_type] < self.fast_below


def plan_bundles(items: list[tuple[str, int]], fast: Callable[[str], bool], max_size: int) -> list[list[int]]:
    """Group ready task messages, given as (task type, encoded size), into messages to send.

    Returns lists of indexes into ``items``: a list of one is a single task message, a longer one
    a bundle. Every index appears exactly once; a bundle holds one type only.
    """
    groups: list[list[int]] = []
    eligible: dict[str, list[int]] = {}
    for index, (task_type, size) in enumerate(items):
        if max_size > 1 and size <= MAX_MEMBER_BYTES and fast(task_type):
            eligible.setdefault(task_type, []).append(index)
        else:
            groups.append([index])
    for indexes in eligible.values():
        if len(indexes) < BUNDLE_MIN:
            groups.extend([i] for i in indexes)
            continue
        size = min(max_size, math.ceil(len(indexes) / SPREAD))
        groups.extend(indexes[i : i + size] for i in range(0, len(indexes), size))
    return groups
