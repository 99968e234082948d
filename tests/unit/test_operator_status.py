"""The operator's pure parts: status from store rows, events from status changes, spec edits, the CRD."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controller.operator import crd
from controller.operator.edits import decide
from controller.operator.status import (
    MAX_STATUS_TASKS,
    StoreView,
    TaskView,
    WorkflowStatus,
    build_status,
    condition,
    events_between,
    status_patch,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def view(status: str = "running", tasks: int = 3, **counts: int) -> StoreView:
    base = {"total": tasks, "pending": 0, "queued": 0, "running": 0, "succeeded": 0, "failed": 0}
    base.update(counts)
    return StoreView(
        workflow_id="0b8f6c1e-0000-4000-8000-000000000001",
        status=status,
        counts={**base, "skipped": 0, "cancelled": base.get("cancelled", 0)},
        total_reward=1.23456,
        surgeries=0,
        policy_version=None,
        started_at=NOW if status != "pending" else None,
        finished_at=NOW + timedelta(seconds=5) if status in ("succeeded", "failed", "cancelled") else None,
        error={"code": "task_failed", "message": "task b failed"} if status == "failed" else None,
        tasks=tuple(
            TaskView(f"t{i}", "noop", "succeeded" if i < counts.get("succeeded", 0) else "pending", 1, 0.5, None)
            for i in range(min(tasks, MAX_STATUS_TASKS))
        ),
    )


def test_status_has_counts_progress_and_conditions() -> None:
    s = build_status(view(succeeded=2, running=1), previous=None, generation=1, now=NOW)
    assert s["phase"] == "Running" and s["progress"] == "2/3"
    assert (s["total"], s["succeeded"], s["failed"], s["running"]) == (3, 2, 0, 1)
    assert s["reward"] == 1.2346 and s["observedGeneration"] == 1
    assert {c["type"]: c["status"] for c in s["conditions"]} == {"Running": "True", "Completed": "False"}
    WorkflowStatus.model_validate(s)  # the CRD's status schema comes from this model


def test_unchanged_store_means_no_patch_and_stable_transition_times() -> None:
    first = build_status(view(succeeded=1, running=1), previous=None, generation=1, now=NOW)
    again = build_status(view(succeeded=1, running=1), previous=first, generation=1, now=NOW + timedelta(minutes=1))
    assert status_patch(first, again) is None
    later = build_status(view("succeeded", succeeded=3), previous=first, generation=1, now=NOW + timedelta(minutes=2))
    patch = status_patch(first, later)
    assert patch is not None and patch["phase"] == "Succeeded"
    times = {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}
    assert times["Completed"] == "2026-01-01T12:02:00Z"


def test_conditions_set_by_handlers_are_carried_over() -> None:
    rejected = {"type": "SpecChangeRejected", "status": "True", "reason": "ImmutableSpec", "message": "x"}
    previous = {"conditions": [{**rejected, "lastTransitionTime": "2026-01-01T00:00:00Z"}], "observedGeneration": 2}
    s = build_status(view(), previous=previous, generation=2, now=NOW)
    assert [c["type"] for c in s["conditions"]] == ["Running", "Completed", "SpecChangeRejected"]
    assert s["observedGeneration"] == 2


def test_large_dags_are_summarised() -> None:
    s = build_status(view(tasks=5000, succeeded=10), previous=None, generation=1, now=NOW)
    assert len(s["tasks"]) == MAX_STATUS_TASKS and s["tasksOmitted"] == 5000 - MAX_STATUS_TASKS
    assert s["detail"].endswith("/tasks")
    assert len(yaml.safe_dump(s)) < 20_000


def test_events_for_transitions_once() -> None:
    pending = build_status(view("pending"), previous=None, generation=1, now=NOW)
    running = build_status(view(running=1), previous=pending, generation=1, now=NOW)
    assert [n.reason for n in events_between(pending, running)] == ["Started"]
    assert events_between(running, running) == []
    failed_view = view("failed", tasks=2, failed=1, succeeded=1)
    failed_view = StoreView(
        **{
            **failed_view.__dict__,
            "tasks": (
                TaskView("a", "noop", "succeeded", 1, 1.0, None),
                TaskView("b", "chaos.fail", "failed", 3, -1.0, {"class": "permanent", "message": "boom"}),
            ),
        }
    )
    failed = build_status(failed_view, previous=running, generation=1, now=NOW)
    notes = events_between(running, failed)
    assert [(n.type, n.reason) for n in notes] == [("Warning", "TaskFailed"), ("Warning", "Failed")]
    assert "permanent: boom" in notes[0].message and "3 attempt(s)" in notes[0].message


def test_surgery_events_when_the_count_rises() -> None:
    before: dict[str, Any] = {"phase": "Running", "surgeries": 1, "total": 4}
    after = {**before, "surgeries": 2, "total": 5}
    [note] = events_between(before, after)
    assert note.reason == "SurgeryApplied" and "5 tasks" in note.message


def test_only_cancel_is_an_allowed_edit() -> None:
    spec = {"tasks": [{"name": "a", "type": "noop", "params": {"x": 1}}]}
    assert not decide(spec, {**spec, "cancel": True}).rejected
    assert decide(spec, {**spec, "cancel": True}).cancel
    edited = {"tasks": [{"name": "a", "type": "noop", "params": {"x": 2}}]}
    decision = decide(spec, edited)
    assert decision.differences == ("spec.tasks[0].params.x",)
    assert "immutable" in decision.message()
    assert decide(spec, {**spec, "params": None}).differences == ()


# --- the CRD ------------------------------------------------------------------------------------


def test_the_committed_crd_is_generated_from_the_models() -> None:
    committed = (ROOT / "charts" / "dagsmith" / "crds" / "workflows.yaml").read_text()
    assert committed == crd.render(), "run: python -m controller.operator.crd > charts/dagsmith/crds/workflows.yaml"


def test_the_crd_schema_is_structural() -> None:
    assert crd.structural_problems(crd.open_api_schema()) == []
    assert crd.structural_problems({"properties": {"x": {"anyOf": [{"type": "string"}]}}}) == [
        ".: no type",
        ".x: no type",
        ".x: anyOf is not allowed here",
    ]


def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI's ``nullable`` as JSON Schema, so jsonschema can check objects against the CRD."""
    if isinstance(node, dict):
        out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
        if out.pop("nullable", False):
            out = {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [openapi_to_jsonschema(v) for v in node]
    return node


CRD_SCHEMA = openapi_to_jsonschema(crd.open_api_schema())


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_validate_against_the_crd(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "Workflow":
            jsonschema.validate(doc, CRD_SCHEMA)


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"name": "1bad", "type": "noop"}]}, "name"),
        ({"tasks": [{"name": "a", "type": "noop", "timeout": "soon"}]}, "timeout"),
        ({"tasks": [{"name": "a", "type": "noop", "retry": {"limit": 1000}}]}, "limit"),
    ],
)
def test_the_crd_rejects_what_the_model_rejects(spec: dict[str, Any], where: str) -> None:
    from pydantic import ValidationError

    from dagsmith.spec import WorkflowBody

    with pytest.raises(ValidationError):
        WorkflowBody.model_validate(spec)
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate({"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "spec": spec}, CRD_SCHEMA)
    assert where in str(list(info.value.absolute_path)) or where in info.value.message


def test_conditions_record_the_generation_they_were_set_from() -> None:
    assert condition("Accepted", True, "Submitted", "ok", NOW, generation=3)["observedGeneration"] == 3
    assert "observedGeneration" not in condition("Accepted", True, "Submitted", "ok", NOW)
    status = build_status(view(), previous=None, generation=2, now=NOW)
    assert {c["observedGeneration"] for c in status["conditions"]} == {2}
