"""Which ready tasks travel together (controller.bundling, pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from controller.bundling import BUNDLE_MIN, MAX_MEMBER_BYTES, MIN_SEEN, SPREAD, RunTimes, plan_bundles


def fast_noop(task_type: str) -> bool:
    return task_type == "noop"


def test_a_burst_of_a_fast_type_is_bundled_and_spread() -> None:
    groups = plan_bundles([("noop", 100)] * 1000, fast_noop, max_size=32)
    assert [len(g) for g in groups] == [32] * 31 + [8]
    groups = plan_bundles([("noop", 100)] * 40, fast_noop, max_size=32)
    assert len(groups) == SPREAD and {len(g) for g in groups} == {5}  # spread over executors


def test_slow_types_few_tasks_big_messages_and_max_one_travel_alone() -> None:
    assert plan_bundles([("sleep", 100)] * 50, fast_noop, max_size=32) == [[i] for i in range(50)]
    assert plan_bundles([("noop", 100)] * (BUNDLE_MIN - 1), fast_noop, 32) == [[0], [1], [2]]
    assert plan_bundles([("noop", MAX_MEMBER_BYTES + 1)] * 50, fast_noop, 32) == [[i] for i in range(50)]
    assert plan_bundles([("noop", 100)] * 50, fast_noop, max_size=1) == [[i] for i in range(50)]


@given(
    st.lists(st.tuples(st.sampled_from(["noop", "sleep", "text.upper"]), st.integers(1, 20_000)), max_size=300),
    st.integers(1, 64),
)
def test_every_task_goes_out_once_and_bundles_hold_one_fast_type(items: list[tuple[str, int]], max_size: int) -> None:
    fast = {"noop", "text.upper"}.__contains__
    groups = plan_bundles(items, fast, max_size)
    assert sorted(i for g in groups for i in g) == list(range(len(items)))
    for g in groups:
        if len(g) > 1:
            assert len(g) <= max_size
            assert len({items[i][0] for i in g}) == 1 and fast(items[g[0]][0])
            assert all(items[i][1] <= MAX_MEMBER_BYTES for i in g)


def test_a_type_is_fast_only_once_seen_enough_and_while_its_average_is_short() -> None:
    times = RunTimes(fast_below=0.02)
    for _ in range(MIN_SEEN - 1):
        times.observe("noop", 0.0001)
    assert not times.fast("noop")  # not seen enough yet
    times.observe("noop", 0.0001)
    assert times.fast("noop")
    for _ in range(30):
        times.observe("noop", 1.0)  # it became slow: the moving average follows
    assert not times.fast("noop")
    assert not times.fast("never-seen")
