"""Against Postgres: what the operator's status mirror may read."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from controller.operator.mirror import StoreMirror
from controller.submit import submit
from dagsmith.validation import validate


async def test_the_mirror_reads_only_the_resources_own_namespace(db: AsyncEngine) -> None:
    """A Workflow's status names a workflow id; a resource in namespace B naming A's workflow
    (someone who may write B's status) must not get A's tasks, errors and rewards copied in."""
    ns = f"mirror-{uuid.uuid4().hex[:8]}"
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "w"},
        "spec": {"tasks": [{"name": "a", "type": "test.nobody"}, {"name": "b", "type": "test.nobody"}]},
    }
    async with db.begin() as conn:
        wid = (await submit(conn, validate(doc), namespace=ns, idempotency_key=None, source="kubernetes")).id
    mirror = StoreMirror(db, interval=60.0)
    assert await mirror.view(wid, f"{ns}-other") is None
    seen = await mirror.view(wid, ns)
    assert seen is not None and seen.counts["total"] == 2  # (the e2e suite's controller may have started it)
    assert await mirror.view(wid, f"{ns}-other") is None  # from memory too
