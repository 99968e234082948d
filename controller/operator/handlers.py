"""The kopf handlers: feed Workflow resources to the store, and reflect the store in ``.status``.

The operator never runs a DAG. On create it validates and submits the spec exactly as the REST
API does, with the resource's uid as the idempotency key: a create handled again (kopf lost its
record of the first) finds the workflow stored under that uid and adopts it, whatever changed on
the resource meanwhile. The controller's reconciliation loop does the rest, as under Compose. A
timer per resource copies the store's state into ``.status`` (through the status subresource,
only when it changed) and posts Events for transitions. Deleting the resource cancels the
workflow in the store; editing its spec is rejected, except ``spec.cancel: true``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.db import in_transaction, is_transient
from controller.operator.crd import GROUP, PLURAL, VERSION
from controller.operator.edits import SpecDecision, decide
from controller.operator.mirror import StoreMirror
from controller.operator.status import (
    TERMINAL_PHASES,
    Phase,
    build_status,
    condition,
    events_between,
    merge_conditions,
    phase_of,
    status_patch,
)
from controller.queries import request_cancel
from controller.schema import workflows
from controller.store import known_task_types
from controller.submit import submit
from dagsmith.errors import Conflict, NotFound, SpecError
from dagsmith.settings import Settings
from dagsmith.spec import API_VERSION, KIND, WorkflowDocument
from dagsmith.validation import validate

RESOURCE = (GROUP, VERSION, PLURAL)
MAX_PROBLEMS_SHOWN = 5


@dataclass
class OperatorContext:
    """Shared by every handler of one operator (kopf copies the memo per resource, not this)."""

    settings: Settings
    engine: AsyncEngine
    mirror: StoreMirror
    reported: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> last status sent (until final)
    finished: dict[str, float] = field(default_factory=dict)  # uid -> when its final status was sent

    @property
    def finished_memory(self) -> float:
        """How long a final status sent is remembered: as long as the mirror tracks a workflow,
        since the timer runs until the resource shows it."""
        return self.mirror.memory


def _ctx(memo: Any) -> OperatorContext:
    ctx: OperatorContext = memo["ctx"]
    return ctx


def _now() -> datetime:
    return datetime.now(UTC)


def document_of(body: Any) -> dict[str, Any]:
    """The workflow document inside a resource: what a user would POST to the REST API."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": dict(meta.get("labels") or {}),
        },
        "spec": dict(body.get("spec") or {}),
    }


async def _write(ctx: OperatorContext, what: str, work: Any) -> Any:
    """One transaction; transient database trouble becomes a kopf retry instead of a crash."""
    try:
        return await in_transaction(ctx.engine, work, what=what, attempts=3)
    except Exception as exc:
        if is_transient(exc):
            raise kopf.TemporaryError(f"{what}: the database is unavailable ({exc})", delay=5) from exc
        raise


async def on_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the service account. Elsewhere: the kubeconfig (``KUBECONFIG`` or ~/.kube/config)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


async def on_create(
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str | None,
    uid: str,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: Any,
    **_: Any,
) -> None:
    ctx = _ctx(memo)
    namespace = namespace or "default"
    stored = await _stored_by_uid(ctx, uid, namespace)
    if stored is not None:
        await _adopt(ctx, body, meta, namespace, status, patch, stored)
        return
    raw = document_of(body)
    async with ctx.engine.connect() as conn:
        types = await known_task_types(conn)
    try:
        checked = validate(raw, ctx.settings.limits(), types)
    except SpecError as exc:
        shown = "; ".join(f"{p['path'] or '.'}: {p['message']}" for p in exc.problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(exc.problems) - MAX_PROBLEMS_SHOWN} more)" if len(exc.problems) > MAX_PROBLEMS_SHOWN else ""
        message = f"invalid workflow: {shown}{more}"
        kopf.warn(body, reason="InvalidSpec", message=message)
        patch.status.update(
            {
                "phase": "Failed",
                "message": message[:500],
                "observedGeneration": meta.get("generation"),
                "conditions": merge_conditions(
                    status.get("conditions"),
                    [condition("Accepted", False, "InvalidSpec", message, _now(), generation=meta.get("generation"))],
                ),
            }
        )
        return

    async def work(conn: AsyncConnection) -> Any:
        result = await submit(conn, checked, namespace=namespace, idempotency_key=uid, source="kubernetes")
        if checked.document.spec.cancel and result.status not in ("succeeded", "failed", "cancelled"):
            await request_cancel(conn, result.id, [namespace])
        return result

    try:
        result = await _write(ctx, "submit workflow", work)
    except Conflict as exc:
        raise kopf.PermanentError(str(exc)) from exc

    update: dict[str, Any] = {
        "workflowId": str(result.id),
        "observedGeneration": meta.get("generation"),
        "conditions": merge_conditions(
            status.get("conditions"),
            [
                condition(
                    "Accepted",
                    True,
                    "Submitted",
                    f"stored as workflow {result.id}",
                    _now(),
                    generation=meta.get("generation"),
                )
            ],
        ),
    }
    if not status.get("phase") or (status.get("phase") == "Failed" and not status.get("workflowId")):
        update["phase"] = phase_of(result.status).value
        update["message"] = "submitted; waiting for the controller"
    patch.status.update(update)
    if result.created:
        kopf.info(body, reason="Submitted", message=f"stored as workflow {result.id} ({len(checked.tasks)} tasks)")
    for warning in checked.warnings:
        kopf.warn(body, reason="SpecWarning", message=f"{warning.get('path')}: {warning.get('message')}")


async def _adopt(
    ctx: OperatorContext,
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str,
    status: kopf.Status,
    patch: kopf.Patch,
    stored: Any,
) -> None:
    """The create handler found the resource's uid already stored: kopf runs it again when its
    record of the create was lost (the operator stopped before writing it). The resource may have
    changed since (labels, ``spec.cancel``, an edit), so submitting it again would be refused as a
    different document under the same key; the stored workflow is the resource's, and the spec is
    then handled as an edit of it would be."""
    generation = meta.get("generation")
    previous = {c.get("type"): c for c in status.get("conditions") or []}
    accepted = condition(
        "Accepted",
        True,
        "Submitted",
        f"stored as workflow {stored.id}",
        _now(),
        previous.get("Accepted"),
        generation=generation,
    )
    updates = [accepted, *await _follow_spec(ctx, body, meta, namespace, status, stored.id, stored)]
    change: dict[str, Any] = {
        "workflowId": str(stored.id),
        "observedGeneration": generation,
        "conditions": merge_conditions(status.get("conditions"), updates),
    }
    if not status.get("phase") or (status.get("phase") == "Failed" and not status.get("workflowId")):
        phase = phase_of(stored.status)
        if phase in TERMINAL_PHASES:
            # The timer writes a finished workflow's whole status (counts, message), but runs only
            # while the phase is not final: it starts from Pending, and its next tick ends it.
            change["phase"], change["message"] = Phase.Pending.value, "stored; its status follows"
            ctx.finished.pop(str(meta.get("uid")), None)  # the final status must be sent again
        else:
            change["phase"], change["message"] = phase.value, "submitted; waiting for the controller"
    patch.status.update(change)


def _mirroring(status: kopf.Status, **_: Any) -> bool:
    return bool(status.get("workflowId")) and status.get("phase") not in TERMINAL_PHASES


async def mirror_status(
    body: kopf.Body,
    meta: kopf.Meta,
    uid: str,
    namespace: str | None,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: Any,
    **_: Any,
) -> None:
    ctx = _ctx(memo)
    if meta.get("generation") != status.get("observedGeneration", meta.get("generation")):
        return  # a spec edit is being handled; its decision must land in .status first
    _forget_finished(ctx)
    if uid in ctx.finished:
        return  # its final status was sent; the resource seen here predates it (the timer stops once it shows)
    view = await ctx.mirror.view(uuid.UUID(status["workflowId"]), namespace or "default")
    if view is None:
        return
    current = dict(status)
    new = build_status(view, previous=current, generation=meta.get("generation"), now=_now())
    change = status_patch(current, new)
    if change is not None:
        patch.status.update(change)
        for note in events_between(ctx.reported.get(uid, current), new):
            kopf.event(body, type=note.type, reason=note.reason, message=note.message)
    _remember(ctx, uid, new)


def _remember(ctx: OperatorContext, uid: str, sent: dict[str, Any]) -> None:
    """The status sent is what the next tick compares with: the resource that tick is given may
    not show the patch yet (the watch lags), and the same Events must not be posted twice. A final
    status is not kept, or every finished Workflow would hold its whole status here until it is
    deleted: the timer stops once the resource shows it. Until then, only the uid is kept (for
    ``finished_memory``), so that a tick in between neither patches nor posts again."""
    if sent.get("phase") in TERMINAL_PHASES:
        ctx.reported.pop(uid, None)
        ctx.finished.pop(uid, None)
        ctx.finished[uid] = time.monotonic()  # at the end: the oldest come first
    else:
        ctx.reported[uid] = sent


def _forget_finished(ctx: OperatorContext) -> None:
    expired = time.monotonic() - ctx.finished_memory
    while ctx.finished:
        uid, at = next(iter(ctx.finished.items()))
        if at > expired:
            return
        del ctx.finished[uid]


async def _stored_by_uid(ctx: OperatorContext, uid: str, namespace: str) -> Any:
    """The workflow a resource was stored as, found by its uid (the idempotency key), or None."""
    async with ctx.engine.connect() as conn:
        query = sa.select(workflows.c.id, workflows.c.spec, workflows.c.status, workflows.c.cancel_requested)
        query = query.where(workflows.c.idempotency_key == uid, workflows.c.namespace == namespace)
        return (await conn.execute(query)).first()


async def _stored(ctx: OperatorContext, workflow_id: uuid.UUID, namespace: str) -> Any:
    async with ctx.engine.connect() as conn:
        query = sa.select(workflows.c.spec, workflows.c.status, workflows.c.cancel_requested)
        query = query.where(workflows.c.id == workflow_id, workflows.c.namespace == namespace)
        return (await conn.execute(query)).first()


def _decision(stored_spec: dict[str, Any], body: kopf.Body) -> SpecDecision:
    try:
        doc = WorkflowDocument.model_validate(document_of(body))
    except ValidationError:
        return SpecDecision(bool((body.get("spec") or {}).get("cancel")), ("spec (no longer a valid workflow)",))
    return decide(stored_spec, doc.model_dump(mode="json", by_alias=True, exclude_unset=True)["spec"])


async def on_spec_change(
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str | None,
    status: kopf.Status,
    patch: kopf.Patch,
    memo: Any,
    **kw: Any,
) -> None:
    ctx = _ctx(memo)
    if not status.get("workflowId"):
        # Never stored (the first spec was invalid): a fixed spec is submitted now.
        await on_create(body=body, meta=meta, namespace=namespace, status=status, patch=patch, memo=memo, **kw)
        return
    workflow_id = uuid.UUID(status["workflowId"])
    stored = await _stored(ctx, workflow_id, namespace or "default")
    if stored is None:
        raise kopf.PermanentError(f"workflow {workflow_id} is not in the store any more")
    updates = await _follow_spec(ctx, body, meta, namespace or "default", status, workflow_id, stored)
    patch.status["observedGeneration"] = meta.get("generation")
    if updates:
        patch.status["conditions"] = merge_conditions(status.get("conditions"), updates)


async def _follow_spec(
    ctx: OperatorContext,
    body: kopf.Body,
    meta: kopf.Meta,
    namespace: str,
    status: kopf.Status,
    workflow_id: uuid.UUID,
    stored: Any,
) -> list[dict[str, Any]]:
    """The resource's spec against the stored one: ``spec.cancel: true`` cancels, any other
    difference is reported. Returns the conditions to update."""
    decision = _decision(stored.spec.get("spec", {}), body)
    if decision.cancel and not stored.cancel_requested and stored.status not in ("succeeded", "failed", "cancelled"):
        try:
            await _write(ctx, "cancel workflow", lambda conn: request_cancel(conn, workflow_id, [namespace]))
            kopf.info(body, reason="CancelRequested", message=f"spec.cancel is true: cancelling {workflow_id}")
        except Conflict:
            pass  # finished meanwhile
    updates = []
    if decision.rejected:
        kopf.warn(body, reason="SpecChangeRejected", message=decision.message())
        updates.append(
            condition(
                "SpecChangeRejected",
                True,
                "ImmutableSpec",
                decision.message(),
                _now(),
                generation=meta.get("generation"),
            )
        )
    elif any(c.get("type") == "SpecChangeRejected" for c in status.get("conditions") or []):
        updates.append(
            condition(
                "SpecChangeRejected",
                False,
                "SpecMatches",
                decision.message(),
                _now(),
                generation=meta.get("generation"),
            )
        )
    return updates


async def on_delete(
    body: kopf.Body, uid: str, namespace: str | None, status: kopf.Status, memo: Any, logger: Any, **_: Any
) -> None:
    ctx = _ctx(memo)
    ctx.reported.pop(uid, None)
    ctx.finished.pop(uid, None)
    if status.get("workflowId"):
        workflow_id = uuid.UUID(status["workflowId"])
    else:
        # Stored, but its status never said so (the status patch failed): found by its uid.
        found = await _stored_by_uid(ctx, uid, namespace or "default")
        if found is None:
            return  # never stored: nothing to cancel
        workflow_id = found.id
    ctx.mirror.forget(workflow_id)
    try:
        ns = namespace or "default"
        await _write(ctx, "cancel workflow", lambda conn: request_cancel(conn, workflow_id, [ns]))
        logger.info(f"resource deleted: cancelling workflow {workflow_id}")
    except (Conflict, NotFound):
        pass  # already finished, or gone


def build_registry(status_interval: float) -> kopf.OperatorRegistry:
    """Handlers for one operator. A registry per operator, so tests can run two side by side."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(on_login)
    kopf.on.create(*RESOURCE, registry=registry, backoff=5)(on_create)
    kopf.on.update(*RESOURCE, field="spec", registry=registry, backoff=5)(on_spec_change)
    kopf.on.delete(*RESOURCE, registry=registry, backoff=5)(on_delete)
    kopf.timer(*RESOURCE, interval=status_interval, when=_mirroring, registry=registry, backoff=5)(mirror_status)
    return registry
