"""Which acks go out for which finished task messages (the pure part of executors.acks)."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from executors.acks import Unsettled


def test_a_run_from_the_oldest_is_one_multiple_ack() -> None:
    state = Unsettled(order=deque([1, 2, 3, 4]), finished=[2, 1, 3])
    assert state.plan() == (3, [])
    assert list(state.order) == [4] and not state.settled


def test_finished_behind_a_running_one_are_acked_alone_and_passed_over_later() -> None:
    state = Unsettled(order=deque([1, 2, 3, 4]), finished=[2, 4])
    assert state.plan() == (None, [2, 4])
    state.finished = [1]
    assert state.plan() == (1, [])  # 2 is settled already: popped, not acked again
    assert list(state.order) == [3, 4]
    state.finished = [3]
    assert state.plan() == (3, [])
    assert not state.order and not state.settled


def test_rejected_tags_do_not_block_a_run() -> None:
    state = Unsettled(order=deque([1, 2, 3]), finished=[1, 3], settled={2})
    assert state.plan() == (3, [])
    assert not state.order and not state.settled


def test_a_tag_registered_late_still_stops_a_run() -> None:
    state = Unsettled()
    for tag in (1, 3, 2, 4):
        state.add(tag)
    state.finished = [1, 3]
    assert state.plan() == (1, [3])  # 2 has not finished: the run stops before it


@given(st.permutations(list(range(1, 30))), st.integers(min_value=1, max_value=29))
def test_every_tag_is_acked_exactly_once_and_never_before_it_finished(order: list[int], step: int) -> None:
    """Finish the tags in any order, a few per flush: each tag is covered by exactly one ack, and
    no ack (single, or multiple up to a tag) covers a tag that has not finished."""
    state = Unsettled(order=deque(range(1, 30)))
    finished: set[int] = set()
    acked: set[int] = set()
    for i in range(0, len(order), step):
        batch = order[i : i + step]
        finished.update(batch)
        state.finished = list(batch)
        upto, singles = state.plan()
        covered = set(singles)
        if upto is not None:
            covered |= {t for t in range(1, upto + 1) if t not in acked}
        assert covered <= finished
        assert not set(singles) & acked
        acked |= covered
    assert acked == set(range(1, 30))
    assert not state.order and not state.settled
