"""Task queues declared again with other arguments (an installation whose DAGSMITH_MAX_DELIVERIES
changed) keep working: the queue keeps its arguments, with a warning, and the channel stays open."""

from __future__ import annotations

import logging
import uuid

import aio_pika
import pytest

from dagsmith.amqp import Names, Topology, delete_topology
from tests.conftest import AMQP


async def test_a_task_queue_made_with_another_max_deliveries_is_used_as_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prefix = f"topo{uuid.uuid4().hex[:6]}"
    names = Names(prefix)
    connection = await aio_pika.connect(AMQP)
    try:
        first = await connection.channel(publisher_confirms=True)
        await Topology(first, names, max_deliveries=3).task_queue("noop")
        channel = await connection.channel(publisher_confirms=True)
        later = Topology(channel, names, max_deliveries=5)
        with caplog.at_level(logging.WARNING, logger="dagsmith.amqp"):
            queue = await later.task_queue("noop")
        assert "exists with other arguments" in caplog.text and "DAGSMITH_MAX_DELIVERIES=5" in caplog.text
        assert not channel.is_closed
        exchange = await later.tasks_exchange()
        await exchange.publish(aio_pika.Message(b"{}", delivery_mode=2), routing_key="noop")  # confirmed
        message = await queue.get(timeout=5)
        await message.ack()
    finally:
        await connection.close()
        await delete_topology(AMQP, prefix, ["noop"])


async def test_a_task_queue_deleted_under_the_controller_returns_the_message_and_comes_back() -> None:
    """The controller keeps the queues it declared; deleted by hand, a cached one would swallow
    every task message sent to it (confirmed, routed nowhere). Mandatory publishing on a channel
    that raises on returns makes it an error; the round runs again and declares the queue anew."""
    from controller.dispatch import Publisher
    from dagsmith.messages import TaskMessage

    prefix = f"topo{uuid.uuid4().hex[:6]}"
    names = Names(prefix)
    connection = await aio_pika.connect(AMQP)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = Topology(channel, names)
        publisher = Publisher(channel, topology)
        message = TaskMessage(task_id=1, attempt=1, workflow_id=str(uuid.uuid4()), name="t", type="noop")
        await publisher.publish_singles([message])
        other = await connection.channel()
        await other.queue_delete(names.task_queue("noop"))
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await publisher.publish_singles([message])
        await publisher.publish_singles([message])  # declared again, and delivered
        queue = await channel.declare_queue(names.task_queue("noop"), passive=True)
        got = await queue.get(timeout=5)
        assert TaskMessage.model_validate_json(got.body).task_id == 1
        await got.ack()
    finally:
        await connection.close()
        await delete_topology(AMQP, prefix, ["noop"])


async def test_a_cancel_broadcast_with_no_executor_connected_is_not_an_error() -> None:
    """The controller publishes on a channel that raises on returned messages (task messages are
    mandatory); its control messages are not: with no executor connected, nobody needs telling."""
    import time

    from controller.service import Controller
    from tests.conftest import make_settings

    prefix = f"topo{uuid.uuid4().hex[:6]}"
    connection = await aio_pika.connect(AMQP)
    try:
        controller = Controller(make_settings("postgresql+psycopg://unused/none", prefix))
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        controller.topology = Topology(channel, Names(prefix))
        await controller._broadcast_cancel({uuid.uuid4()}, time.time())  # no queue bound: fine
        assert not channel.is_closed
    finally:
        await connection.close()
        await delete_topology(AMQP, prefix, [])
