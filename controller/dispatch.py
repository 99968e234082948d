"""Turning ready tasks into task messages (resolving their templates) and publishing them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel

from controller.store import TaskRow, WorkflowRow
from dagsmith.amqp import Topology, persistent
from dagsmith.errors import TemplateError
from dagsmith.messages import TaskMessage
from dagsmith.templating import is_template, iter_templates, render


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


def has_templates(params: dict[str, Any]) -> bool:
    return any(True for _ in iter_templates(params, "")) if params else False


def prepare(
    task: TaskRow, attempt: int, workflow: WorkflowRow, outputs: dict[str, Any], max_template_bytes: int
) -> Prepared:
    """Build the message for one attempt. Raises TemplateError if the params cannot be resolved."""
    params = task.params
    resolved: dict[str, Any] | None = None
    if params and has_templates(params):
        context = template_context(workflow, task, outputs, attempt)
        resolved = render(params, context, max_bytes=max_template_bytes, path="params")
        params = resolved
    spec = task.spec
    repaired_by = spec.get("repairedBy")
    if repaired_by:
        # A repair task was inserted before this one (DAG surgery): its output replaces the params
        # it names, e.g. json.repair's {"text": ...} over json.parse's {"text": ...}.
        repair = (outputs.get(repaired_by) or {}).get("output")
        if isinstance(repair, dict):
            resolved = params = {**params, **{k: v for k, v in repair.items() if k in params}}
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
    """Publishes task messages with publisher confirms; returns once the broker has them all."""

    def __init__(self, channel: AbstractChannel, topology: Topology) -> None:
        self.channel = channel
        self.topology = topology

    async def publish(self, prepared: list[Prepared]) -> None:
        if not prepared:
            return
        exchange = await self.topology.tasks_exchange()
        for task_type in {p.task.type for p in prepared}:
            await self.topology.task_queue(task_type)  # the queue holds tasks until an executor comes
        await asyncio.gather(
            *(
                exchange.publish(
                    persistent(p.message.model_dump_json().encode(), message_id=p.message.idempotency_key),
                    routing_key=p.task.type,
                    mandatory=True,
                )
                for p in prepared
            )
        )


__all__ = ["Prepared", "Publisher", "TemplateError", "is_template", "prepare", "template_context"]
