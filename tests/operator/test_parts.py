"""The operator's parts without a Kubernetes API: the status timer's memory, kopf's record of the
last handled spec, the terminal message, and the mirror's reads of a workflow that is gone."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import kopf
from kopf._core.engines import posting
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.operator.handlers import OperatorContext, mirror_status
from controller.operator.mirror import StoreMirror
from controller.operator.runner import SpecDigestStorage
from controller.operator.status import StoreView, build_status

UID = "0b8f6c1e-0000-4000-8000-00000000aaaa"
WORKFLOW_ID = "0b8f6c1e-0000-4000-8000-000000000001"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def store_view(status: str, error: dict[str, Any] | None = None) -> StoreView:
    running = int(status == "running")
    return StoreView(
        workflow_id=WORKFLOW_ID,
        status=status,
        counts={"total": 1, "pending": 0, "queued": 0, "running": running, "succeeded": 0, "failed": 0}
        | {"skipped": 0, "cancelled": 1 - running},
        total_reward=0.0,
        surgeries=0,
        policy_version=None,
        started_at=NOW,
        finished_at=None if running else NOW,
        error=error,
        tasks=(),
    )


CANCELLED = store_view("cancelled", {"code": "cancelled", "message": "cancelled by request"})


class ScriptedMirror(StoreMirror):
    """Answers with the view the test sets, as the store would."""

    def __init__(self) -> None:
        super().__init__(engine=None, interval=1.0)  # type: ignore[arg-type]
        self.current: StoreView | None = None

    async def view(self, workflow_id: uuid.UUID, namespace: str) -> StoreView | None:
        return self.current


def resource(status: dict[str, Any]) -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "dagsmith.io/v1",
            "kind": "Workflow",
            "metadata": {"name": "w", "namespace": "default", "uid": UID, "generation": 1},
            "spec": {"tasks": [{"name": "nap", "type": "sleep"}]},
            "status": status,
        }
    )


def collect_events() -> asyncio.Queue[Any]:
    """Where kopf.event puts Events (in the operator, a task posts them from there)."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    posting.settings_var.set(kopf.OperatorSettings())
    posting.event_queue_loop_var.set(asyncio.get_running_loop())
    posting.event_queue_var.set(queue)
    return queue


async def tick(ctx: OperatorContext, body: kopf.Body, events: asyncio.Queue[Any]) -> tuple[dict[str, Any], list[str]]:
    """One run of the status timer: the status patch it sends, and the Events it posts."""
    patch = kopf.Patch()
    await mirror_status(
        body=body, meta=body.meta, uid=UID, namespace="default", status=body.status, patch=patch, memo={"ctx": ctx}
    )
    reasons = []
    while not events.empty():
        reasons.append(events.get_nowait().reason)
    return dict(patch.get("status") or {}), reasons


async def test_a_finished_workflow_leaves_nothing_behind_and_is_not_patched_again() -> None:
    """Each Workflow's last status was kept until the resource was deleted: an operator serving
    many finished Workflows held all their statuses. It is dropped once the phase is final; until
    the watch shows that final status, the timer still runs on the resource as it was, and must
    neither patch it nor post its Events again."""
    events = collect_events()
    mirror = ScriptedMirror()
    ctx = OperatorContext(settings=None, engine=None, mirror=mirror)  # type: ignore[arg-type]
    pending = {"workflowId": WORKFLOW_ID, "phase": "Pending", "observedGeneration": 1}

    mirror.current = store_view("running")
    sent, reasons = await tick(ctx, resource(pending), events)
    assert sent["phase"] == "Running" and reasons == ["Started"]
    assert UID in ctx.reported
    running = resource({**pending, **sent})  # as the watch shows it

    mirror.current = CANCELLED
    sent, reasons = await tick(ctx, running, events)
    assert sent["phase"] == "Cancelled" and reasons == ["Cancelled"]
    assert ctx.reported == {}

    for _ in range(3):  # the watch has not shown the final status yet
        assert await tick(ctx, running, events) == ({}, [])

    # Remembered for a while only: had the final status never arrived (a lost patch), it is sent again.
    ctx.finished[UID] -= ctx.finished_memory + 1
    sent, _ = await tick(ctx, running, events)
    assert sent["phase"] == "Cancelled"
    assert list(ctx.finished) == [UID] and ctx.reported == {}


def test_the_terminal_message_says_the_phase_once() -> None:
    status = build_status(CANCELLED, previous=None, generation=1, now=NOW)
    assert status["message"] == "cancelled by request"
    completed = next(c for c in status["conditions"] if c["type"] == "Completed")
    assert completed["message"] == "cancelled by request"
    failed = store_view("failed", {"code": "task_failed", "message": "task 'b' failed: permanent: boom"})
    assert build_status(failed, previous=None, generation=1, now=NOW)["message"] == (
        "failed: task_failed: task 'b' failed: permanent: boom"
    )
    assert build_status(store_view("cancelled"), previous=None, generation=1, now=NOW)["message"] == (
        "cancelled: no reason given"
    )


def test_kopfs_record_of_the_last_handled_spec_stays_small() -> None:
    """kopf's own record holds every label and annotation besides the whole spec: a Workflow with
    150 KB of annotations of its own got a second 150 KB annotation, and the two went over the API
    server's limit (256 KiB), refusing every later patch. Only a digest of the spec is kept."""
    storage = SpecDigestStorage(prefix="dagsmith.io", key="last-handled-configuration")
    tasks = [{"name": f"t{i:04}", "type": "sleep", "params": {"seconds": 60}} for i in range(3000)]
    raw: dict[str, Any] = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "w", "labels": {"team": "a"}, "annotations": {"example.com/notes": "x" * 150_000}},
        "spec": {"tasks": tasks},
    }
    essence = storage.build(body=kopf.Body(raw))
    assert len(json.dumps(essence)) < 200
    assert set(essence) == {"spec"}

    # What the update handler needs still shows: a spec edit, and spec.cancel as it is.
    relabelled = {**raw, "metadata": {**raw["metadata"], "labels": {"team": "b"}, "annotations": {}}}
    assert storage.build(body=kopf.Body(relabelled)) == essence
    edited = {**raw, "spec": {"tasks": tasks[:-1]}}
    assert storage.build(body=kopf.Body(edited))["spec"]["sha256"] != essence["spec"]["sha256"]
    cancelled = storage.build(body=kopf.Body({**raw, "spec": {"tasks": tasks, "cancel": True}}))
    assert cancelled["spec"] == {**essence["spec"], "cancel": True}


class CountingMirror(StoreMirror):
    def __init__(self, engine: AsyncEngine, interval: float) -> None:
        super().__init__(engine, interval)
        self.refreshes = 0

    async def refresh(self) -> None:
        self.refreshes += 1
        await super().refresh()


async def test_a_workflow_whose_row_is_gone_is_read_once_per_interval(db: AsyncEngine) -> None:
    """A Workflow whose stored copy retention deleted keeps its timer: each tick made the mirror
    refresh every tracked workflow, as it knew no view of that one. It is looked up once, then
    with the others, once per interval."""
    mirror = CountingMirror(db, interval=60)
    gone = uuid.uuid4()
    for _ in range(5):
        assert await mirror.view(gone, "default") is None
    assert mirror.refreshes == 1
    other = uuid.uuid4()  # one not asked for before is still looked up at once
    assert await mirror.view(other, "default") is None
    assert await mirror.view(gone, "default") is None
    assert mirror.refreshes == 2
    mirror.forget(gone)  # the resource was deleted: asked for again, it is a new one
    assert await mirror.view(gone, "default") is None
    assert mirror.refreshes == 3
