"""Against Postgres: a page of tasks is bounded in bytes as well as in count."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from controller import queries
from controller.submit import submit
from dagsmith.validation import validate


async def test_a_page_of_big_outputs_ends_early_and_says_where_the_next_starts(db: AsyncEngine) -> None:
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "big-outputs"},
        # No executor runs this type: nothing else touches the tasks while the test writes them.
        "spec": {"tasks": [{"name": f"t{i}", "type": "test.nobody"} for i in range(10)]},
    }
    async with db.begin() as conn:
        wid = (await submit(conn, validate(doc), namespace="default", idempotency_key=None, source="api")).id
        await conn.exec_driver_sql(
            "UPDATE tasks SET output = jsonb_build_object('blob', repeat('x', 1000)) WHERE workflow_id = %(w)s",
            {"w": wid},
        )
    seen: list[str] = []
    after = None
    async with db.connect() as conn:
        while True:
            rows, after = await queries.list_tasks(conn, wid, status=None, after=after, limit=100, max_bytes=2500)
            assert 1 <= len(rows) <= 2  # two outputs of ~1 KB fit in 2.5 KB, a third does not
            seen += [r.name for r in rows]
            if after is None:
                break
        rows, after = await queries.list_tasks(conn, wid, status=None, after=None, limit=100, max_bytes=10)
    assert seen == [f"t{i}" for i in range(10)]  # every task once, in order
    assert len(rows) == 1 and after == rows[0].id  # a page holds at least one task, however big
