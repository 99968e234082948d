"""Workflows whose rounds fail are held back with a doubling delay, and let go when one succeeds."""

from __future__ import annotations

import uuid

from controller.held import HeldWorkflows


def test_the_delay_doubles_up_to_the_cap_and_a_success_lets_go() -> None:
    held = HeldWorkflows(first_delay=1.0, max_delay=5.0)
    w = uuid.uuid4()
    assert [held.failed(w, 100.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert held.split({w}, 104.0) == (set(), {w})
    assert held.due(104.0) == set() and held.next_due() == 105.0
    assert held.due(105.0) == {w}
    held.succeeded([w])
    assert len(held) == 0 and held.next_due() is None
    assert held.failed(w, 200.0) == 1.0  # a new failure starts again from the first delay


def test_only_held_workflows_wait() -> None:
    held = HeldWorkflows(first_delay=1.0)
    bad, good = uuid.uuid4(), uuid.uuid4()
    held.failed(bad, 10.0)
    assert held.split({bad, good}, 10.5) == ({good}, {bad})
    assert held.split({bad, good}, 11.0) == ({bad, good}, set())  # its delay is over: it may try again
