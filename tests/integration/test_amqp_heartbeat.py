"""DAGSMITH_AMQP_HEARTBEAT bounds how long a hung process keeps the task messages it had received
but not started: RabbitMQ closes its silent connection and gives them back to the queue."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import aio_pika

from tests.conftest import AMQP

HOLDER = """
import asyncio, sys
from dagsmith.amqp import connect

async def main() -> None:
    connection = await connect(sys.argv[1], name="holder", heartbeat=int(sys.argv[3]))
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1)
    queue = await channel.get_queue(sys.argv[2])

    async def hold(message) -> None:  # received, never acked: a task not yet started
        print("held", flush=True)

    await queue.consume(hold)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_hung_consumers_unacked_message_comes_back_after_a_few_heartbeats() -> None:
    name = f"hb-test-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel()
    queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    holder = None
    try:
        await channel.default_exchange.publish(aio_pika.Message(b"task", delivery_mode=2), routing_key=name)
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, AMQP, name, "1"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)  # a hang: the process is alive, its socket open and silent
        hung_at = time.monotonic()
        async with asyncio.timeout(15):
            while (message := await queue.get(fail=False)) is None:
                await asyncio.sleep(0.1)
        back_after = time.monotonic() - hung_at
        assert message.body == b"task" and message.redelivered
        await message.ack()
        # With a 1 s heartbeat the broker gives up on the connection after two or three of them.
        assert back_after < 6.0, back_after
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        await queue.delete(if_unused=False, if_empty=False)
        await connection.close()
