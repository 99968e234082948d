from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.surgery import (
    Operation,
    SurgeryConflict,
    SurgeryError,
    TaskSnapshot,
    abort,
    insert_before,
    over_budget,
    replay,
    reroute,
    retry,
    revivable,
    skip,
    tune,
)
from dagsmith.spec import CorrectionSpec


def snap(**kw: object) -> TaskSnapshot:
    base = {
        "id": 1,
        "name": "t",
        "type": "x.y",
        "status": "failed",
        "params": {"a": 1},
        "depends_on": ["p"],
        "spec": {},
    }
    base.update(kw)
    return TaskSnapshot(**base)  # type: ignore[arg-type]


def test_secret_params_are_masked_in_diffs_and_carried_to_inserted_tasks() -> None:
    task = snap(params={"a": 1, "token": "s3cret"}, spec={"secrets": ["token", "absent"]})
    plan = retry(task, params={"a": 2, "token": "n3w"})
    assert plan.params == {"a": 2, "token": "n3w"}  # the task itself gets the real values
    assert plan.diff[0]["old"] == {"a": 1, "token": "***"} and plan.diff[0]["new"] == {"a": 2, "token": "***"}
    plan = insert_before(task, task_type="json.repair", existing={"t", "p"})
    assert plan.inserted == {"name": "t_repair1", "type": "json.repair", "params": task.params, "secrets": ["token"]}
    assert plan.diff[0]["task"]["params"] == {"a": 1, "token": "***"}


def test_retry_with_params_records_the_change() -> None:
    plan = retry(snap(), params={"a": 2}, delay=3)
    assert plan.operation == Operation.retry and plan.delay == 3
    assert plan.diff[0] == {"op": "set", "task": "t", "field": "params", "old": {"a": 1}, "new": {"a": 2}}


def test_manual_surgery_on_running_task_is_a_conflict() -> None:
    with pytest.raises(SurgeryConflict, match="running"):
        retry(snap(status="running"), manual=True)
    assert retry(snap(status="running")).operation == Operation.retry  # a policy may: the attempt is failing


def test_reroute_and_insert_and_skip() -> None:
    assert reroute(snap(), "a.b").new_type == "a.b"
    with pytest.raises(SurgeryError):
        reroute(snap(), "x.y")
    plan = insert_before(snap(), task_type="fix.it", existing={"t", "t_repair1"})
    assert plan.inserted == {"name": "t_repair2", "type": "fix.it", "params": {"a": 1}}
    assert plan.diff[0]["task"]["dependsOn"] == ["p"] and plan.diff[1]["new"] == ["t_repair2"]
    with pytest.raises(SurgeryError, match="not optional"):
        skip(snap())
    assert skip(snap(spec={"optional": True, "default": {"v": 0}})).output == {"v": 0}
    assert abort(snap()).operation == Operation.abort


def test_tune() -> None:
    assert tune({"batch": 64, "n": "x"}, {"batch": "/2"}) == ({"batch": 32, "n": "x"}, None)
    assert tune({}, {"timeout": "x2"}, timeout=1.5) == (None, 3.0)
    assert tune({"timeout": 10}, {"timeout": "x2"}, timeout=1.0) == ({"timeout": 20}, None)
    assert tune({"a": True}, {"a": "x2"}) == (None, None)


def test_over_budget() -> None:
    c = CorrectionSpec(maxSurgeries=2, maxInsertedTasks=1, timeBudget="1m", taskSecondsBudget=100)
    assert over_budget(c, surgeries=1, inserted=0, elapsed=10, task_seconds=0) is None
    assert "maxSurgeries" in (over_budget(c, surgeries=2, inserted=0, elapsed=10, task_seconds=0) or "")
    plan = insert_before(snap(), task_type="f.x", existing=set())
    assert "maxInsertedTasks" in (over_budget(c, surgeries=0, inserted=1, elapsed=0, task_seconds=0, plan=plan) or "")
    assert "timeBudget" in (over_budget(c, surgeries=0, inserted=0, elapsed=61, task_seconds=0) or "")
    assert "taskSecondsBudget" in (over_budget(c, surgeries=0, inserted=0, elapsed=0, task_seconds=101) or "")


def test_replay_rebuilds_any_revision() -> None:
    tasks = [{"name": "p", "type": "a"}, {"name": "t", "type": "x.y", "dependsOn": ["p"]}]
    insert = insert_before(snap(), task_type="fix.it", existing=set()).diff
    route = reroute(snap(), "z.z").diff
    assert replay(tasks, []) == tasks
    after = replay(tasks, [insert, route])
    assert [t["name"] for t in after] == ["p", "t_repair1", "t"]
    assert after[2]["dependsOn"] == ["t_repair1"] and after[2]["type"] == "z.z"
    assert after[1]["dependsOn"] == ["p"]
    assert tasks[1]["type"] == "x.y"  # the submitted spec is not modified


def _replay_naively(tasks: list[dict[str, Any]], diffs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The obvious quadratic replay: each insert searched for and placed in the list, in order."""
    out = [dict(t) for t in tasks]
    for diff in diffs:
        for op in diff:
            if op["op"] == "add":
                index = next((i for i, t in enumerate(out) if t["name"] == op.get("before")), len(out))
                out.insert(index, dict(op["task"]))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=30), max_size=25))
def test_replay_places_inserts_as_inserting_them_one_by_one_would(targets: list[int]) -> None:
    tasks = [{"name": f"s{i}", "type": "noop"} for i in range(5)]
    names = [t["name"] for t in tasks]
    diffs = []
    for n, target in enumerate(targets):
        before = names[target] if target < len(names) else None  # past the end: an unknown target
        diffs.append([{"op": "add", "task": {"name": f"i{n}", "type": "noop"}, "before": before}])
        names.append(f"i{n}")
    assert [t["name"] for t in replay(tasks, diffs)] == [t["name"] for t in _replay_naively(tasks, diffs)]


def test_a_refused_surgery_says_what_to_do_instead() -> None:
    with pytest.raises(SurgeryConflict, match="to run it again, submit the workflow again"):
        retry(snap(status="succeeded"), manual=True)
    with pytest.raises(SurgeryConflict, match="wait for it to finish, or cancel the workflow"):
        retry(snap(status="running"), manual=True)


def test_revivable_brings_back_only_what_can_run_again() -> None:
    # a is retried. c needs a and b: b failed, so c (and e, below it) stay cancelled; d needs a
    # and the succeeded s, f needs d: both run again.
    cancelled = {"c": ["a", "b"], "d": ["a", "s"], "e": ["c", "d"], "f": ["d"]}
    status = {"b": "failed", "s": "succeeded"}
    assert revivable("a", cancelled, status) == {"d", "f"}
    # With b running again (retried before), everything comes back.
    assert revivable("a", cancelled, {"b": "pending", "s": "succeeded"}) == {"c", "d", "e", "f"}
    # A dependency cancelled for another reason (not downstream of a) blocks too.
    assert revivable("a", {"c": ["a", "x"]}, {"x": "cancelled"}) == set()


def test_revivable_is_linear_on_a_long_chain() -> None:
    chain = {f"t{i}": [f"t{i - 1}"] for i in range(1, 50_001)}
    assert len(revivable("t0", chain, {})) == 50_000


def test_a_repair_task_of_a_long_named_task_gets_a_valid_unique_name() -> None:
    long = "t" * 63
    first = insert_before(snap(name=long), task_type="json.repair", existing=set())
    assert first.inserted is not None and len(first.inserted["name"]) <= 63
    assert first.inserted["name"].endswith("_repair1")
    again = insert_before(snap(name=long), task_type="json.repair", existing={first.inserted["name"]})
    assert (
        again.inserted is not None and again.inserted["name"].endswith("_repair2") and len(again.inserted["name"]) <= 63
    )


def test_an_inserted_task_takes_the_values_the_failed_attempt_ran_with_as_literals() -> None:
    ran = snap(params={"text": "{{ tasks.p.output.text }}"}, resolved={"text": "{{ not a template }}"})
    plan = insert_before(ran, task_type="json.repair", existing=set())
    assert plan.inserted is not None
    assert plan.inserted["params"] == {"text": "{{ not a template }}"} and plan.inserted["literalParams"] is True
    assert "literalParams" not in plan.diff[0]["task"]
    never_ran = insert_before(snap(params={"text": "{{ tasks.p.output.text }}"}), task_type="x.y", existing=set())
    assert never_ran.inserted is not None and "literalParams" not in never_ran.inserted  # templates, rendered later


def test_retry_with_params_sets_only_the_keys_given_and_keeps_the_templates() -> None:
    task = snap(params={"text": "{{ tasks.p.output.text }}", "size": 10}, resolved={"text": "hello", "size": 10})
    plan = retry(task, params={"size": 5})
    assert plan.params == {"text": "{{ tasks.p.output.text }}", "size": 5} and plan.edited == ("size",)
    assert retry(task, params={"size": 10}).params is None  # nothing changes: nothing to set


def test_a_revision_marks_a_rerouted_inserted_task_as_the_current_view_does() -> None:
    from api.dag_render import structure_at

    diffs = [
        [{"op": "add", "task": {"name": "r", "type": "json.repair", "dependsOn": []}, "before": "t"}],
        [{"op": "set", "task": "r", "field": "type", "old": "json.repair", "new": "text.clean"}],
    ]
    nodes = {n["id"]: n for n in structure_at([{"name": "t", "type": "x.y"}], diffs)["nodes"]}
    assert nodes["r"] == {"id": "r", "type": "text.clean", "inserted": True, "rerouted": True}
    assert nodes["t"]["rerouted"] is False
