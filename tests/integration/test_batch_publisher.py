"""BatchPublisher against the real broker: a batch waits out a closed channel instead of failing."""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika

from dagsmith.amqp import BatchPublisher
from dagsmith.settings import Settings


async def test_a_batch_published_while_the_channel_is_closed_goes_out_once_it_is_back(settings: Settings) -> None:
    queue_name = settings.amqp_prefix + ".batch-publisher"
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(queue_name, auto_delete=False)
        publisher: BatchPublisher[int] = BatchPublisher(channel, queue_name, lambda items: repr(items).encode())
        publisher.start()
        await channel.close()  # as between a dropped connection and its channels' restoration
        sending = asyncio.create_task(publisher.publish([1, 2, 3]))
        await asyncio.wait({sending}, timeout=0.5)  # a failing publisher fails at once
        assert not sending.done(), sending
        await channel.reopen()
        await asyncio.wait_for(sending, timeout=10)  # confirmed, not failed
        async with asyncio.timeout(10):
            while (message := await queue.get(fail=False)) is None:
                await asyncio.sleep(0.05)
        assert message.body == b"[1, 2, 3]"
        await message.ack()
        await publisher.stop()
    finally:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.queue_delete(queue_name)
        await connection.close()


async def test_a_batch_for_a_deleted_queue_is_returned_and_the_queue_made_again(settings: Settings) -> None:
    """Confirmed but routed nowhere, a batch of results would be lost (and its tasks left running):
    it comes back, the queue is declared again, and the batch goes into it."""
    queue_name = settings.amqp_prefix + ".batch-publisher-gone"
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.queue_delete(queue_name)  # nobody declared it, or it was deleted by hand
        publisher: BatchPublisher[int] = BatchPublisher(channel, queue_name, lambda items: repr(items).encode())
        publisher.start()
        await asyncio.wait_for(publisher.publish([4, 5]), timeout=10)
        queue = await channel.declare_queue(queue_name, passive=True)
        message = await queue.get(timeout=5)
        assert message.body == b"[4, 5]"
        await message.ack()
        await publisher.stop()
    finally:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.queue_delete(queue_name)
        await connection.close()
