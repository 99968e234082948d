"""Turning ready tasks into task messages (resolving their templates) and publishing them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from controller.bundling import plan_bundles
from controller.store import TaskRow, WorkflowRow
from dagsmith.amqp import Topology, persistent
from dagsmith.errors import TemplateError
from dagsmith.logs import secret_values
from dagsmith.messages import BUNDLE, TaskMessage, encode_bundle
from dagsmith.templating import is_template, iter_templates, references, render


@dataclass(frozen=True)
class Prepared:
    task: TaskRow
    attempt: int
    message: TaskMessage
    resolved: dict[str, Any] | None  # None when the params had no templates


def template_context(
    workflow: WorkflowRow, task: TaskRow | None, outputs: dict[str, Any], attempt: int = 0
) -> dict[str, Any]:
    return {
        "params": workflow.params,
        "tasks": outputs,
        "workflow": {"id": str(workflow.id), "name": workflow.name, "namespace": workflow.namespace},
        "task": {"name": task.name, "attempt": attempt} if task else {},
    }


def secret_texts(task: TaskRow, workflow: WorkflowRow) -> list[str]:
    """What must not appear in a message about ``task``: its secret params' own texts, and the
    workflow params their templates read (a secret rendered from ``{{ params.key }}`` is secret)."""
    secrets = task.spec.get("secrets") or []
    if not secrets:
        return []
    fed: set[str] = set()
    for name in secrets:
        for _, template in iter_templates(task.params.get(name), name):
            with contextlib.suppress(TemplateError):
                fed |= references(template).params
    texts = set(secret_values(task.params, secrets)) | set(secret_values(workflow.params, sorted(fed)))
    return sorted(texts, key=len, reverse=True)


def has_templates(params: dict[str, Any]) -> bool:
    return any(True for _ in iter_templates(params, "")) if params else False


def prepare(
    task: TaskRow, attempt: int, workflow: WorkflowRow, outputs: dict[str, Any], max_template_bytes: int
) -> Prepared:
    """Build the message for one attempt. Raises TemplateError if the params cannot be resolved."""
    params = task.params
    spec = task.spec
    resolved: dict[str, Any] | None = None
    # A repair task inserted by surgery takes the failed task's params as values: never rendered.
    if params and not spec.get("literalParams") and has_templates(params):
        context = template_context(workflow, task, outputs, attempt)
        resolved = render(params, context, max_bytes=max_template_bytes, path="params")
        params = resolved
    repaired_by = spec.get("repairedBy")
    if repaired_by:
        # A repair task was inserted before this one (DAG surgery): its output replaces the params
        # it names, e.g. json.repair's {"text": ...} over json.parse's {"text": ...} — except
        # those a later surgery set explicitly.
        repair = (outputs.get(repaired_by) or {}).get("output")
        if isinstance(repair, dict):
            kept = set(spec.get("editedParams") or ())
            resolved = params = {**params, **{k: v for k, v in repair.items() if k in params and k not in kept}}
    message = TaskMessage(
        task_id=task.id,
        attempt=attempt,
        workflow_id=str(task.workflow_id),
        name=task.name,
        type=task.type,
        timeout=task.timeout_s,
        expect=spec.get("expect"),
        max_attempts=task.max_retries + 1,
        dispatched_at=time.time(),
        params=params,
        secrets=spec.get("secrets") or [],
    )
    return Prepared(task, attempt, message, resolved)


class Publisher:
    """Publishes task messages with publisher confirms; returns once the broker has them all.

    Many ready tasks of a fast type go out as bundles (``controller.bundling``); ``bundle_max``
    of 1 turns bundling off.
    """

    def __init__(self, channel: AbstractChannel, topology: Topology, bundle_max: int = 1) -> None:
        self.channel = channel
        self.topology = topology
        self.bundle_max = bundle_max

    async def publish(self, prepared: list[Prepared], fast: Callable[[str], bool] = lambda _: False) -> None:
        messages = [p.message for p in prepared]
        bodies = [m.model_dump_json().encode() for m in messages]
        groups = plan_bundles([(m.type, len(b)) for m, b in zip(messages, bodies, strict=True)], fast, self.bundle_max)
        await self._send(messages, bodies, groups)

    async def publish_singles(self, messages: list[TaskMessage]) -> None:
        """One message per task, whatever its type (the members of a dead-lettered bundle)."""
        bodies = [m.model_dump_json().encode() for m in messages]
        await self._send(messages, bodies, [[i] for i in range(len(messages))])

    async def _send(self, messages: list[TaskMessage], bodies: list[bytes], groups: list[list[int]]) -> None:
        if not messages:
            return
        exchange = await self.topology.tasks_exchange()
        for task_type in {m.type for m in messages}:
            await self.topology.task_queue(task_type)  # the queue holds tasks until an executor comes
        try:
            await asyncio.gather(
                *(
                    exchange.publish(
                        persistent(bodies[g[0]], message_id=messages[g[0]].idempotency_key)
                        if len(g) == 1
                        else persistent(encode_bundle([bodies[i] for i in g]), type=BUNDLE),
                        routing_key=messages[g[0]].type,
                        mandatory=True,  # with the channel's on_return_raises: unroutable is an error
                    )
                    for g in groups
                )
            )
        except aio_pika.exceptions.DeliveryError:
            # A queue was deleted while we knew it (by hand, say): the message came back instead
            # of being dropped. The round commits nothing and runs again, declaring the queues anew.
            self.topology.forget()
            raise


__all__ = ["Prepared", "Publisher", "TemplateError", "is_template", "prepare", "secret_texts", "template_context"]
