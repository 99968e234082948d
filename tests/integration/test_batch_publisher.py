"""BatchPublisher against the real broker: a batch waits out a closed channel instead of failing,
and one its queue no longer takes comes back and goes into the queue declared again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from dagsmith.amqp import BatchPublisher
from dagsmith.settings import Settings


@pytest.fixture
async def broker(
    settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[AbstractRobustConnection, str]]:
    """A connection, and a queue name of this test's own, deleted afterwards."""
    queue_name = f"{settings.amqp_prefix}.batch-publisher.{request.node.name[-40:]}"
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    try:
        yield connection, queue_name
    finally:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.queue_delete(queue_name)
        await connection.close()


def _publisher(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> BatchPublisher[int]:
    publisher: BatchPublisher[int] = BatchPublisher(channel, queue_name, lambda items: repr(items).encode())
    publisher.start()
    return publisher


async def test_a_batch_published_while_the_channel_is_closed_goes_out_once_it_is_back(
    broker: tuple[AbstractRobustConnection, str],
) -> None:
    connection, queue_name = broker
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(queue_name, auto_delete=False)
    publisher = _publisher(channel, queue_name)
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


async def test_a_batch_for_a_deleted_queue_is_returned_and_the_queue_made_again(
    broker: tuple[AbstractRobustConnection, str],
) -> None:
    """Confirmed but routed nowhere, a batch of results would be lost (and its tasks left running):
    it comes back, the queue is declared again, and the batch goes into it."""
    connection, queue_name = broker
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await channel.queue_delete(queue_name)  # nobody declared it, or it was deleted by hand
    publisher = _publisher(channel, queue_name)
    await asyncio.wait_for(publisher.publish([4, 5]), timeout=10)
    queue = await channel.declare_queue(queue_name, passive=True)
    message = await queue.get(timeout=5)
    assert message.body == b"[4, 5]"
    await message.ack()
    await publisher.stop()
