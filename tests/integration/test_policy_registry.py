"""The policy registry on Postgres: the gate guards activation, and rollbacks walk back through
the activations instead of flipping between the last two."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from controller import policies
from dagsmith.errors import Conflict


async def _register(db: AsyncEngine, version: str, *, passed: bool = True) -> None:
    async with db.begin() as conn:
        await policies.register(
            conn,
            version=version,
            weights=b"not loaded by these tests",
            feature_schema_version=1,
            reward_version="test",
            training={},
            evaluation={"gate": {"passed": passed, "reason": "test gate"}},
        )


async def _activate(db: AsyncEngine, version: str, **kwargs: Any) -> str:
    async with db.begin() as conn:
        return str((await policies.activate(conn, version, **kwargs))["version"])


async def _rollback(db: AsyncEngine) -> str | None:
    async with db.begin() as conn:
        active = await policies.rollback(conn)
    return None if active is None else str(active["version"])


async def _statuses(db: AsyncEngine, *versions: str) -> dict[str, str]:
    async with db.connect() as conn:
        return {p["version"]: p["status"] for p in await policies.list_versions(conn) if p["version"] in versions}


async def test_rollbacks_walk_back_through_the_activations(db: AsyncEngine, run_id: str) -> None:
    a, b, c = (f"walk-{run_id}-{n}" for n in "abc")
    for version in (a, b, c):
        await _register(db, version)
        assert await _activate(db, version) == version
    assert await _rollback(db) == b
    assert await _rollback(db) == a  # not back to c
    assert await _rollback(db) is None  # nothing was active before a: the rules
    assert set((await _statuses(db, a, b, c)).values()) == {"retired"}
    with pytest.raises(Conflict, match="no policy is active"):
        await _rollback(db)


async def test_a_version_activated_twice_is_rolled_back_one_activation_at_a_time(db: AsyncEngine, run_id: str) -> None:
    a, b = (f"twice-{run_id}-{n}" for n in "ab")
    await _register(db, a)
    await _register(db, b)
    for version in (a, b, a):
        await _activate(db, version)
    await _activate(db, a)  # already active: not a new step in the history
    assert await _rollback(db) == b
    assert await _rollback(db) == a
    assert await _rollback(db) is None


async def test_activation_refuses_a_version_that_failed_the_gate_unless_forced(db: AsyncEngine, run_id: str) -> None:
    bad = f"gate-{run_id}"
    await _register(db, bad, passed=False)
    with pytest.raises(Conflict, match="did not pass the gate \\(test gate\\)"):
        await _activate(db, bad)
    assert (await _statuses(db, bad))[bad] == "candidate"
    assert await _activate(db, bad, force=True) == bad
    assert await _rollback(db) is None
