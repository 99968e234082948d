"""A workflow whose rounds keep failing is held back; the controller neither spins on it nor lets
it block the other workflows, and still stops when asked."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from controller.db import create_engine
from controller.engine import Engine, Inbound, RoundResult
from controller.migrate import upgrade
from controller.service import Controller
from controller.submit import submit
from dagsmith.amqp import delete_topology
from dagsmith.validation import validate
from tests.conftest import AMQP, create_database, drop_database, make_settings

BAD: set[uuid.UUID] = set()
ATTEMPTS: list[float] = []  # when each round touching a bad workflow began


class BrokenForSome(Engine):
    """Rounds that touch a workflow in BAD fail at once, before any I/O: the worst case for a loop
    that retries straight away, as it would never yield to the event loop."""

    async def _round(self, conn: AsyncConnection, inbound: Inbound) -> RoundResult:
        if inbound.dirty & BAD:
            ATTEMPTS.append(time.monotonic())
            raise RuntimeError("a bug that only this workflow's data triggers")
        return await super()._round(conn, inbound)


def _doc(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"tasks": [{"name": "t", "type": "noop"}]},
    }


async def _task_status(db: Any, workflow_id: uuid.UUID) -> str:
    async with db.connect() as conn:
        row = await conn.exec_driver_sql(f"SELECT status FROM tasks WHERE workflow_id = '{workflow_id}'")
        return str(row.scalar())


async def test_a_workflow_whose_rounds_fail_is_held_back_and_blocks_nothing() -> None:
    name = f"dagsmith_held_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    prefix = f"held{uuid.uuid4().hex[:6]}"
    upgrade(url)
    settings = make_settings(url, prefix)
    db = create_engine(url, pool_size=1, name="held-test")
    stop = asyncio.Event()
    controller = Controller(settings, engine_class=BrokenForSome)
    running = asyncio.create_task(controller.run(stop))
    try:
        async with db.begin() as conn:
            bad = (await submit(conn, validate(_doc("bad")), namespace="default")).id
            BAD.add(bad)
            good = (await submit(conn, validate(_doc("good")), namespace="default")).id
        async with asyncio.timeout(20):
            while len(ATTEMPTS) < 4 or await _task_status(db, good) != "queued":
                assert not running.done(), running
                await asyncio.sleep(0.05)
        # The failed round is run again alone (attempt 2), then the workflow is held 1 s, then 2 s,
        # and each later try is a round of its own: not retried straight away (a loop that retries
        # at once makes thousands of attempts a second and starves everything else).
        assert ATTEMPTS[2] - ATTEMPTS[1] >= 0.9, ATTEMPTS[:4]
        assert ATTEMPTS[3] - ATTEMPTS[2] >= 1.9, ATTEMPTS[:4]
        assert controller.held.split({bad, good}, time.time()) == ({good}, {bad})
        assert await _task_status(db, bad) == "pending"
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await db.dispose()
        await delete_topology(AMQP, prefix, ["noop"])
        drop_database(name)
