"""The evaluator process against the real broker: results in, evaluated results out, acked after."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika

from dagsmith.amqp import Names, Topology, delete_topology
from dagsmith.messages import EvaluatedBatch, ResultBatch, ResultMessage, TaskRef
from evaluator.service import Evaluator
from tests.conftest import AMQP, make_settings


async def test_results_come_out_evaluated_and_the_input_is_acked() -> None:
    prefix = f"eval{uuid.uuid4().hex[:6]}"
    settings = make_settings("postgresql+psycopg://unused@127.0.0.1/none", prefix)
    names = Names(prefix)
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel()
    topology = Topology(channel, names)
    await topology.queue(names.results)
    evaluated = await topology.queue(names.evaluated)
    evaluator = Evaluator(settings)
    stop = asyncio.Event()
    running = asyncio.create_task(evaluator.run(stop))
    now = time.time()

    def result(task_id: int, ok: bool, output: object, expect: dict[str, object] | None = None) -> ResultMessage:
        ref = TaskRef(task_id=task_id, attempt=1, workflow_id="w", name=f"t{task_id}", type="x.y", expect=expect)
        return ResultMessage(task=ref, executor_id="e", ok=ok, output=output, started_at=now - 0.1, finished_at=now)

    batch = ResultBatch(
        results=[
            result(1, True, {"text": "hi"}, {"type": "object", "required": ["text"]}),
            result(2, True, {"other": 1}, {"type": "object", "required": ["text"]}),
        ]
    )
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(batch.model_dump_json().encode()), routing_key=names.results
        )
        items = []
        async with asyncio.timeout(20):
            async with evaluated.iterator() as it:
                async for incoming in it:
                    items += EvaluatedBatch.model_validate_json(incoming.body).items
                    await incoming.ack()
                    if len(items) >= 2:
                        break
        verdicts = {i.result.task.task_id: i.evaluation for i in items}
        assert verdicts[1].passed and verdicts[1].reward > 0
        assert not verdicts[2].passed and verdicts[2].error is not None
        assert str(verdicts[2].error.error_class) == "invalid_output"  # the output fails `expect`
        assert verdicts[2].feedback["reward_version"] and verdicts[2].reward < verdicts[1].reward

        # Stopped, the evaluator's connection closes: an input it had not acked would be back.
        stop.set()
        await asyncio.wait_for(running, 20)
        queue = await channel.declare_queue(names.results, passive=True)
        assert queue.declaration_result.message_count == 0
        assert evaluator.evaluated == 2
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)  # (a second wait on a finished task returns at once)
        await connection.close()
        await delete_topology(AMQP, prefix, [])
