"""A reconciliation engine on a test database and the real broker, for tests that drive rounds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aio_pika

from controller.correct import Corrector
from controller.db import create_engine
from controller.dispatch import Publisher
from controller.engine import Engine
from dagsmith.amqp import Names, Topology, delete_topology
from dagsmith.settings import Settings
from tests.conftest import AMQP


@contextlib.asynccontextmanager
async def round_engine(
    url: str, settings: Settings, name: str, corrector: Corrector | None = None
) -> AsyncIterator[tuple[Engine, Any]]:
    """The engine (with ``corrector``, in Correction Mode) and its database engine; the
    installation's queues are deleted afterwards."""
    db = create_engine(url, pool_size=1, name=name)
    connection = await aio_pika.connect(AMQP)
    channel = await connection.channel(publisher_confirms=True)
    topology = Topology(channel, Names(settings.amqp_prefix))
    try:
        yield Engine(db, Publisher(channel, topology), settings, corrector), db
    finally:
        await connection.close()
        await db.dispose()
        await delete_topology(AMQP, settings.amqp_prefix, ["noop"])
