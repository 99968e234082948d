"""The broker's share of a hop: one persistent message, published and consumed with aio-pika.

    python -m benchmarks.broker_floor [--messages 300] [--amqp URL]

A hop of the chain benchmark crosses RabbitMQ three times (executor → evaluator → controller over
classic queues, controller → executor over a quorum queue). This measures what one crossing costs
with nothing of Dagsmith around it — publish, route, store, deliver, in one process on one
connection — for a classic and a quorum queue, so the rest of a hop can be told apart from the
broker's floor. Messages go one at a time (a chain has one in flight), 300 bytes each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage


async def one_way(url: str, queue_type: str, messages: int) -> list[float]:
    """Milliseconds from publish to the consumer's callback, per message."""
    connection = await aio_pika.connect(url)
    try:
        publish = await connection.channel()
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=10)
        name = f"dagsmith-floor-{queue_type}-{uuid.uuid4().hex[:8]}"
        queue = await consume.declare_queue(name, durable=True, arguments={"x-queue-type": queue_type})
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            arrived.put_nowait(time.perf_counter())
            await message.ack()

        tag = await queue.consume(on_message)
        body = b"x" * 300
        latencies = []
        for _ in range(messages):
            sent = time.perf_counter()
            await publish.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=name
            )
            latencies.append((await asyncio.wait_for(arrived.get(), 10) - sent) * 1000)
            await asyncio.sleep(0.002)  # one message in flight at a time, as in a chain
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return latencies[20:]  # the first few warm the channel up
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    for queue_type in ("classic", "quorum"):
        ms = asyncio.run(one_way(args.amqp, queue_type, args.messages))
        p95 = statistics.quantiles(ms, n=20)[-1]
        print(f"{queue_type:8s} one way: p50 {statistics.median(ms):.2f} ms, p95 {p95:.2f} ms ({len(ms)} messages)")


if __name__ == "__main__":
    main()
