"""One LISTEN connection per API process, fanned out to the event streams that watch a workflow."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import psycopg
import structlog

from controller.db import CHANNEL_EVENTS

log = structlog.get_logger(__name__)


class EventsHub:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.watchers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def watch(self, workflow_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self.watchers[workflow_id].add(event)
        return event

    def unwatch(self, workflow_id: str, event: asyncio.Event) -> None:
        self.watchers[workflow_id].discard(event)
        if not self.watchers[workflow_id]:
            del self.watchers[workflow_id]

    @property
    def streams(self) -> int:
        return sum(len(w) for w in self.watchers.values())

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL_EVENTS}")
                    # Wake everyone after a (re)connect: they re-read what they may have missed.
                    for events in self.watchers.values():
                        for e in events:
                            e.set()
                    async for note in conn.notifies():
                        for e in self.watchers.get(note.payload, ()):
                            e.set()
            except (psycopg.Error, OSError) as exc:
                log.warning("event LISTEN connection lost; reconnecting", error=str(exc)[:200])
                await asyncio.sleep(1.0)
