"""RabbitMQ topology: the one place that names exchanges and queues, and declares them.

- ``<prefix>.tasks`` (direct exchange) routes a TaskMessage (or a TaskBundle of one type) by its
  task type to the quorum queue ``<prefix>.task.<type>``. Quorum queues count deliveries; after
  ``max_deliveries`` deliveries a message is dead-lettered to ``<prefix>.dead`` and the controller fails the
  task as poison (or, for a bundle, sends its tasks again one per message).
- ``<prefix>.results``: executors → evaluator. ``<prefix>.evaluated``: evaluator → controller.
- ``<prefix>.events``: executors → controller (started, heartbeats).
- ``<prefix>.control`` (fanout exchange): controller → every executor (cancellations).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import ArgumentsType

from dagsmith.errors import DagsmithError
from dagsmith.settings import DEFAULT_MAX_DELIVERIES, masked

log = logging.getLogger(__name__)
T = TypeVar("T")

# The connection or channel is gone or being restored; aio-pika's robust connection brings it back.
BROKER_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError)


@dataclass(frozen=True)
class Names:
    prefix: str

    @property
    def tasks_exchange(self) -> str:
        return f"{self.prefix}.tasks"

    def task_queue(self, task_type: str) -> str:
        return f"{self.prefix}.task.{task_type}"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def results(self) -> str:
        return f"{self.prefix}.results"

    @property
    def evaluated(self) -> str:
        return f"{self.prefix}.evaluated"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def control_exchange(self) -> str:
        return f"{self.prefix}.control"


class StoppedWaiting(Exception):
    """The service was told to stop while it waited for the broker."""


class BrokerUnreachable(DagsmithError):
    """RabbitMQ did not answer within the time a service waits for it at start."""


async def connect(
    url: str, *, name: str, heartbeat: int = 15, attempts: int = 60, stop: asyncio.Event | None = None
) -> AbstractRobustConnection:
    """A robust connection (it reconnects and restores channels and consumers after a broker restart).

    The first connection is retried for about ``attempts`` × 2 seconds so services can start
    before the broker is ready; then BrokerUnreachable. ``stop`` being set ends the wait with
    StoppedWaiting (a service told to stop while RabbitMQ is down stops at once). ``heartbeat`` is
    ``DAGSMITH_AMQP_HEARTBEAT``.
    """
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return await aio_pika.connect_robust(
                url, client_properties={"connection_name": name}, heartbeat=heartbeat, timeout=10
            )
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            if attempt == attempts:
                raise BrokerUnreachable(
                    f"RabbitMQ at {masked(url)} did not answer in {attempts} attempts: {exc}"
                ) from None
            log.warning("rabbitmq not reachable (%s); retrying in %.1fs", exc, delay)
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                if stop.is_set():
                    raise StoppedWaiting from None
            delay = min(delay * 2, 2.0)
    raise RuntimeError("unreachable")


class Topology:
    """Declares (idempotently) and hands out the exchanges and queues of one installation."""

    def __init__(self, channel: AbstractChannel, names: Names, max_deliveries: int = DEFAULT_MAX_DELIVERIES) -> None:
        self.channel = channel
        self.names = names
        self.max_deliveries = max_deliveries
        self._task_queues: dict[str, AbstractQueue] = {}
        self._tasks_exchange: AbstractExchange | None = None

    def forget(self) -> None:
        """Declare everything again on next use: a queue was deleted under us (a message came back
        unroutable), and declaring is how it comes back."""
        self._task_queues.clear()
        self._tasks_exchange = None

    async def tasks_exchange(self) -> AbstractExchange:
        if self._tasks_exchange is None:
            self._tasks_exchange = await self.channel.declare_exchange(
                self.names.tasks_exchange, aio_pika.ExchangeType.DIRECT, durable=True
            )
        return self._tasks_exchange

    async def dead_queue(self) -> AbstractQueue:
        dead = await self.channel.declare_exchange(self.names.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        queue = await self.channel.declare_queue(self.names.dead_queue, durable=True)
        await queue.bind(dead)
        return queue

    async def task_queue(self, task_type: str) -> AbstractQueue:
        """The durable quorum queue for one task type, bound to the tasks exchange."""
        queue = self._task_queues.get(task_type)
        if queue is None:
            exchange = await self.tasks_exchange()
            await self.dead_queue()
            name = self.names.task_queue(task_type)
            arguments: ArgumentsType = {
                "x-queue-type": "quorum",
                # The broker's limit counts returns: past it, the next return dead-letters the message.
                "x-delivery-limit": self.max_deliveries - 1,
                "x-dead-letter-exchange": self.names.dead_exchange,
                # The dead letter is the controller's only word that a task is poison: the broker
                # keeps the message until the dead-letter queue has confirmed it (RabbitMQ 3.10+;
                # needs reject-publish, which without a length limit rejects nothing).
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            }
            # A queue's arguments are fixed when it is first declared, and declaring it again with
            # others is a channel error. Try on a channel of its own, so that a queue made with
            # another DAGSMITH_MAX_DELIVERIES is used as it is (with a warning) instead of breaking
            # every publish on the shared channel.
            trial = await (await self.channel.get_underlay_channel()).connection.channel()
            try:
                await trial.queue_declare(name, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                log.warning(
                    "queue %s exists with other arguments and keeps them (%s); to apply this version's "
                    "(DAGSMITH_MAX_DELIVERIES=%d, at-least-once dead-lettering), delete the queue while it is empty",
                    name,
                    exc,
                    self.max_deliveries,
                )
            finally:
                if not trial.is_closed:
                    await trial.close()
            queue = await self.channel.declare_queue(name, passive=True)
            await queue.bind(exchange, routing_key=task_type)
            self._task_queues[task_type] = queue
        return queue

    async def queue(self, name: str) -> AbstractQueue:
        """One of the plain durable pipeline queues (results, evaluated, events)."""
        return await self.channel.declare_queue(name, durable=True)

    async def control_exchange(self) -> AbstractExchange:
        return await self.channel.declare_exchange(
            self.names.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )


class BatchPublisher(Generic[T]):
    """Publishes items in batches that form by themselves: whatever arrives while one batch is
    being confirmed goes into the next. Idle, an item leaves at once (no timer, no added latency);
    under load, batches grow and the per-message cost is shared.

    ``await publish(items)`` returns once the broker has confirmed the batch holding the items, so
    the caller can ack its inputs after it. While the connection is being restored, a batch is
    tried again until it goes out: callers keep their inputs unacked meanwhile (a dropped
    connection gives them back to the broker), rather than fail, and leave an input unacked on a
    consumer channel that was restored before the publishing one — which once stopped the whole
    pipeline when every prefetched input of the evaluator was held that way.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        routing_key: str,
        encode: Callable[[list[T]], bytes],
        max_items: int = 500,
    ) -> None:
        self.channel = channel
        self.routing_key = routing_key
        self.encode = encode
        self.max_items = max_items
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, future in self._pending:  # nobody will publish these now
            future.cancel()
        self._pending.clear()

    async def publish(self, items: list[T]) -> None:
        if not items:
            return
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        self._wake.set()
        await asyncio.gather(*futures)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_items]
                del self._pending[: len(batch)]
                try:
                    await self._send(self.encode([item for item, _ in batch]))
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except Exception as exc:  # not the broker's doing: the callers decide
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)

    async def _send(self, body: bytes) -> None:
        """Publish one batch and wait for its confirm, trying again while the broker is away."""
        delay = 0.2
        while True:
            try:
                # Mandatory, on a channel with on_return_raises: a batch its queue no longer
                # takes (deleted by hand) comes back instead of vanishing, and the queue is made again.
                await self.channel.default_exchange.publish(
                    persistent(body), routing_key=self.routing_key, mandatory=True
                )
                return
            except aiormq.exceptions.DeliveryError as exc:  # returned (no such queue) or nacked
                log.warning("%s took no batch (%s); declaring it, retrying in %.1fs", self.routing_key, exc, delay)
                with contextlib.suppress(*BROKER_ERRORS):
                    await self.channel.declare_queue(self.routing_key, durable=True)
            except BROKER_ERRORS as exc:
                log.warning("publish to %s failed (%s); retrying in %.1fs", self.routing_key, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def persistent(body: bytes, *, message_id: str | None = None, type: str | None = None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=type,
    )


async def delete_topology(url: str, prefix: str, task_types: list[str]) -> None:
    """Delete every queue and exchange of one installation (tests, benchmarks, uninstall)."""
    names = Names(prefix)
    queues = [
        names.results,
        names.evaluated,
        names.events,
        names.dead_queue,
        *(names.task_queue(t) for t in task_types),
    ]
    connection = await aio_pika.connect(url)
    async with connection:
        for kind, name in [("queue", q) for q in queues] + [
            ("exchange", e) for e in (names.tasks_exchange, names.dead_exchange, names.control_exchange)
        ]:
            channel = await connection.channel()  # a failed delete closes its channel: one each
            try:
                if kind == "queue":
                    await channel.queue_delete(name)
                else:
                    await channel.exchange_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
