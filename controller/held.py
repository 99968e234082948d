"""Workflows whose rounds keep failing wait, with a growing delay, instead of being retried at once.

A round that fails for a reason other than a lost connection or a lock conflict (those are retried
by :func:`controller.db.in_transaction`) is a bug or bad data in one workflow. Retrying that
workflow straight away would spin: the controller would burn a core on it and the other
workflows' rounds would queue behind. So the controller holds it back — 1 s after the first
failure, doubling up to a minute — and lets it go as soon as one of its rounds succeeds. Pure
bookkeeping, no I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

FIRST_DELAY = 1.0  # seconds held after the first failed round
MAX_DELAY = 60.0  # the delay doubles with each failure up to this


@dataclass
class _Held:
    failures: int
    until: float


class HeldWorkflows:
    def __init__(self, first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._held: dict[uuid.UUID, _Held] = {}

    def __len__(self) -> int:
        return len(self._held)

    def failed(self, workflow_id: uuid.UUID, now: float) -> float:
        """Record a failed round of the workflow; returns how long it is now held (seconds)."""
        held = self._held.get(workflow_id)
        failures = 1 if held is None else held.failures + 1
        delay = min(self.first_delay * 2 ** (failures - 1), self.max_delay)
        self._held[workflow_id] = _Held(failures, now + delay)
        return delay

    def succeeded(self, workflow_ids: Iterable[uuid.UUID]) -> None:
        for workflow_id in workflow_ids:
            self._held.pop(workflow_id, None)

    def split(self, workflow_ids: Iterable[uuid.UUID], now: float) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
        """The workflows that may run a round now, and those still held."""
        free: set[uuid.UUID] = set()
        waiting: set[uuid.UUID] = set()
        for workflow_id in workflow_ids:
            held = self._held.get(workflow_id)
            (waiting if held is not None and held.until > now else free).add(workflow_id)
        return free, waiting

    def due(self, now: float) -> set[uuid.UUID]:
        """Held workflows whose delay is over: they get their next try (and stay tracked until a
        round of theirs succeeds, so another failure holds them longer)."""
        return {w for w, held in self._held.items() if held.until <= now}

    def next_due(self) -> float | None:
        """When the earliest held workflow's delay is over, if any is still waiting."""
        return min((held.until for held in self._held.values()), default=None)
