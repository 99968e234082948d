"""The evaluator process: results in, evaluated results out. Stateless; run as many as needed."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from dagsmith.amqp import BatchPublisher, Names, Topology, connect
from dagsmith.errors import ErrorClass
from dagsmith.messages import EvaluatedBatch, EvaluatedMessage, Evaluation, ResultBatch, ResultMessage, TaskError
from dagsmith.metrics_http import serve_metrics
from dagsmith.settings import Settings
from evaluator.reward import REWARD_VERSION, evaluate

log = structlog.get_logger(__name__)

DEFAULT_METRICS_PORT = 9102
EVALUATIONS = Counter("dagsmith_evaluations_total", "Task attempts evaluated.", ["type", "verdict"])
REWARD = Histogram(
    "dagsmith_task_reward",
    "Reward per evaluated attempt.",
    ["type"],
    buckets=(-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0),
)


def _scored(result: ResultMessage, limit: int | None, expect_seconds: float | None = None) -> Evaluation:
    """The evaluation of one result; a result the evaluator cannot score fails with the reason,
    rather than stalling its whole batch (and the tasks whose results share it) unacknowledged."""
    try:
        return evaluate(result, limit, expect_seconds)
    except Exception as exc:
        log.exception("could not score a result", task_id=result.task.task_id, attempt=result.task.attempt)
        error = TaskError(
            error_class=ErrorClass.unknown,
            message=f"the evaluator could not score this result: {type(exc).__name__}: {str(exc)[:300]}",
        )
        feedback = {"verdict": "fail", "evaluator_error": True}
        return Evaluation(verdict="fail", reward=-1.0, feedback=feedback, error=error)


class Evaluator:
    def __init__(self, settings: Settings, prefetch: int = 200) -> None:
        self.settings = settings
        self.names = Names(settings.amqp_prefix)
        self.prefetch = prefetch
        self.evaluated = 0

    async def _on_results(self, message: AbstractIncomingMessage) -> None:
        try:
            batch = ResultBatch.model_validate_json(message.body)
        except ValidationError as exc:
            log.error("dropping unreadable result batch", error=str(exc)[:300])
            await message.reject()
            return
        limit = self.settings.max_output_bytes
        seconds = self.settings.expect_time_limit
        out = [EvaluatedMessage(result=r, evaluation=_scored(r, limit, seconds)) for r in batch.results]
        await self.publisher.publish(out)
        await message.ack()
        self.evaluated += len(out)
        for item in out:
            EVALUATIONS.labels(item.result.task.type, item.evaluation.verdict).inc()
            REWARD.labels(item.result.task.type).observe(item.evaluation.reward)

    async def run(self, stop: asyncio.Event) -> None:
        serve_metrics(self.settings.metrics_port, DEFAULT_METRICS_PORT, "evaluator", self.settings.metrics_host)
        connection = await connect(
            self.settings.amqp_url.get_secret_value(),
            name="dagsmith-evaluator",
            heartbeat=self.settings.amqp_heartbeat,
            stop=stop,
        )
        channel: AbstractChannel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self.publisher: BatchPublisher[EvaluatedMessage] = BatchPublisher(
            channel,
            self.names.evaluated,
            lambda items: EvaluatedBatch(items=items).model_dump_json(by_alias=True).encode(),
        )
        self.publisher.start()
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=self.prefetch)
        topology = Topology(consume, self.names)
        await topology.queue(self.names.evaluated)
        results = await topology.queue(self.names.results)
        tag = await results.consume(self._on_results)
        log.info("evaluator started", reward_version=REWARD_VERSION)
        await stop.wait()
        with contextlib.suppress(Exception):
            await results.cancel(tag)
        await self.publisher.stop()
        await connection.close()
        log.info("evaluator stopped", evaluated=self.evaluated)
