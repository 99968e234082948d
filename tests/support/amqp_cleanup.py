"""Delete every queue and exchange a test session created (they all share its prefix)."""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika

from dagsmith.amqp import Names
from executors.registry import load_plugins

EXTRA_TYPES = ("test.unknown", "test.nobody", "test.slow")


async def _delete(url: str, prefix: str) -> None:
    names = Names(prefix)
    connection = await aio_pika.connect(url)
    types = [*load_plugins(use_entry_points=False).types(), *EXTRA_TYPES]
    queues = [
        names.results,
        names.evaluated,
        names.events,
        names.dead_queue,
        *(names.task_queue(t) for t in types),
    ]
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
            with contextlib.suppress(Exception):
                await channel.close()
        for exchange in (names.tasks_exchange, names.dead_exchange, names.control_exchange):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
            with contextlib.suppress(Exception):
                await channel.close()


def delete_prefix(url: str, prefix: str) -> None:
    import executors.builtins  # noqa: F401  (registers the built-in types whose queues we delete)

    with contextlib.suppress(Exception):
        asyncio.run(_delete(url, prefix))
