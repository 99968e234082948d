"""Reading the store for many Workflow resources at once.

Every Workflow resource has a kopf timer that asks :meth:`StoreMirror.view` for its workflow.
The mirror answers from memory, and refreshes all tracked workflows with one query per
``interval`` (the first timer to find the cache stale does it, under a lock), plus one bounded
task query for the workflows whose counters changed. Work per refresh is one indexed lookup per
tracked workflow and nothing at all for the ones that did not change.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.operator.status import MAX_STATUS_TASKS, StoreView, TaskView
from controller.schema import TASK_STATUSES

_ROWS = sa.text("SELECT * FROM workflows WHERE id = ANY(CAST(:ids AS uuid[]))")

# Failed tasks first, then the ones in flight, then the rest in submission order.
_TASKS = sa.text(
    """
    SELECT workflow_id, name, type, status, attempt, reward, error FROM (
        SELECT t.*, row_number() OVER (
            PARTITION BY t.workflow_id
            ORDER BY CASE t.status WHEN 'failed' THEN 0 WHEN 'running' THEN 1 WHEN 'queued' THEN 2 ELSE 3 END, t.id
        ) AS rank
        FROM tasks t WHERE t.workflow_id = ANY(CAST(:ids AS uuid[]))
    ) ranked
    WHERE rank <= :limit
    ORDER BY workflow_id, rank
    """
)


def _fingerprint(row: Any) -> tuple[Any, ...]:
    m = row._mapping
    return (
        m["status"],
        m["dag_revision"],
        m["total_reward"],
        m.get("surgeries", 0),
        m.get("policy_version"),
        *(m[f"n_{s}"] for s in TASK_STATUSES),
    )


def view_of(row: Any, tasks: list[Any]) -> StoreView:
    m = row._mapping
    policy = m.get("policy_version")
    return StoreView(
        workflow_id=str(m["id"]),
        status=m["status"],
        counts={"total": m["n_total"], **{s: m[f"n_{s}"] for s in TASK_STATUSES}},
        total_reward=float(m["total_reward"] or 0.0),
        surgeries=int(m.get("surgeries") or 0),
        policy_version=None if policy is None else str(policy),
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        error=m["error"],
        tasks=tuple(
            TaskView(name=t.name, type=t.type, status=t.status, attempt=t.attempt, reward=t.reward, error=t.error)
            for t in tasks
        ),
    )


class StoreMirror:
    def __init__(self, engine: AsyncEngine, interval: float, max_tasks: int = MAX_STATUS_TASKS) -> None:
        self.engine = engine
        self.interval = interval
        self.max_tasks = max_tasks
        self._views: dict[uuid.UUID, StoreView] = {}
        self._prints: dict[uuid.UUID, tuple[Any, ...]] = {}
        self._namespaces: dict[uuid.UUID, str] = {}
        self._seen: dict[uuid.UUID, float] = {}  # last time a timer asked: untrack the forgotten
        self._queried: set[uuid.UUID] = set()  # asked for by the last refresh, found or not
        self._refreshed = 0.0
        self._lock = asyncio.Lock()

    @property
    def memory(self) -> float:
        """How long a workflow no timer asks about stays tracked: longer than a watch can lag
        behind (a dropped stream is noticed within a minute)."""
        return 10 * self.interval + 60

    async def view(self, workflow_id: uuid.UUID, namespace: str) -> StoreView | None:
        """The latest known view of a workflow (None until the first refresh that found it, and
        for a workflow of another namespace: a resource's status names its workflow, and whoever
        may write that status must not read another namespace's workflow through it).

        A workflow not seen before is looked up at once; after that, only with the others, once
        per interval. So one whose row is gone (deleted by retention) costs nothing more than one
        in flight: not a refresh of every tracked workflow on each of its timer's ticks."""
        now = time.monotonic()
        self._seen[workflow_id] = now
        if workflow_id not in self._queried or now - self._refreshed >= self.interval:
            async with self._lock:
                if workflow_id not in self._queried or time.monotonic() - self._refreshed >= self.interval:
                    await self.refresh()
        if self._namespaces.get(workflow_id) != namespace:
            return None
        return self._views.get(workflow_id)

    def forget(self, workflow_id: uuid.UUID) -> None:
        self._views.pop(workflow_id, None)
        self._prints.pop(workflow_id, None)
        self._namespaces.pop(workflow_id, None)
        self._seen.pop(workflow_id, None)
        self._queried.discard(workflow_id)

    async def refresh(self) -> None:
        now = time.monotonic()
        for wid in [w for w, at in self._seen.items() if now - at > self.memory]:
            self.forget(wid)
        tracked = set(self._seen)
        ids = [str(w) for w in tracked]
        self._refreshed = now
        changed: dict[uuid.UUID, Any] = {}
        tasks: dict[uuid.UUID, list[Any]] = {}
        # One snapshot for both reads: counters read before a task changed and its line read after
        # would disagree, and the Events derived from them would count the failure twice.
        if ids:
            async with self.engine.connect() as plain:
                conn = await plain.execution_options(isolation_level="REPEATABLE READ")
                async with conn.begin():
                    rows = list(await conn.execute(_ROWS, {"ids": ids}))
                    changed = {row.id: row for row in rows if self._prints.get(row.id) != _fingerprint(row)}
                    tasks = {wid: [] for wid in changed}
                    if changed:
                        params = {"ids": [str(w) for w in changed], "limit": self.max_tasks}
                        for t in await conn.execute(_TASKS, params):
                            tasks[t.workflow_id].append(t)
        for wid, row in changed.items():
            self._views[wid] = view_of(row, tasks[wid])
            self._prints[wid] = _fingerprint(row)
            self._namespaces[wid] = row.namespace
        self._queried = tracked  # a workflow asked for meanwhile is not in it: looked up at once
