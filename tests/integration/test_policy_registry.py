"""The policy registry on Postgres: the gate guards activation, and rollbacks walk back through
the activations instead of flipping between the last two."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from controller import policies
from dagsmith.errors import Conflict


async def _register(db: AsyncEngine, version: str, *, passed: bool = True, schema: int | None = None) -> None:
    from controller.correction import FEATURE_SCHEMA_VERSION

    async with db.begin() as conn:
        await policies.register(
            conn,
            version=version,
            weights=b"not loaded by these tests",
            feature_schema_version=FEATURE_SCHEMA_VERSION if schema is None else schema,
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


async def test_activation_refuses_a_version_of_another_feature_schema_unless_forced(
    db: AsyncEngine, run_id: str
) -> None:
    old = f"schema-{run_id}"
    await _register(db, old, schema=-1)
    with pytest.raises(Conflict, match="reads features of schema version -1, these controllers version"):
        await _activate(db, old)
    assert await _activate(db, old, force=True) == old
    assert await _rollback(db) is None


async def test_a_trained_version_does_not_replace_one_activated_while_it_trained(db: AsyncEngine, run_id: str) -> None:
    """The trainer compared its candidate with `old`; someone activated `chosen` meanwhile."""
    old, chosen, trained = (f"race-{run_id}-{n}" for n in ("old", "chosen", "trained"))
    for version in (old, chosen, trained):
        await _register(db, version)
    await _activate(db, old)
    await _activate(db, chosen)
    with pytest.raises(
        Conflict, match=f"the active policy changed to {chosen} while {trained} was compared with {old}"
    ):
        await _activate(db, trained, replacing=old)
    assert (await _statuses(db, chosen, trained)) == {chosen: "active", trained: "candidate"}
    assert await _activate(db, trained, replacing=chosen) == trained  # compared with what is active: fine
    assert await _rollback(db) == chosen
    assert await _rollback(db) == old
    assert await _rollback(db) is None
    with pytest.raises(Conflict, match=f"changed to the rules while {trained} was compared with {old}"):
        await _activate(db, trained, replacing=old)


async def test_a_policy_that_cannot_be_loaded_leaves_the_rules_deciding(db: AsyncEngine, run_id: str) -> None:
    """Not the version active before it, which was retired."""
    from controller.correction import FailureContext
    from controller.policies import PolicyBox
    from dagsmith.spec import CorrectionMode

    broken = f"broken-{run_id}"
    await _register(db, broken)  # its weights are not a checkpoint
    box = PolicyBox()
    box.learned = _Stub()  # as if an earlier version were loaded
    box.version = f"earlier-{run_id}"
    await _activate(db, broken)
    try:
        await box.refresh(db, force=True)
        assert box.learned is None and box.version == broken
        ctx = FailureContext(error_class="transient", task_type="x", max_retries=2, max_surgeries=3)
        choice = box.choose(CorrectionMode.learned, ctx)
        assert choice.decision.policy_version.startswith("rules")
        assert choice.decision.fallback_reason == "no_active_policy"
    finally:
        assert await _rollback(db) is None


class _Stub:
    version = "stub"

    def decide(self, ctx: Any) -> Any:
        raise AssertionError("the retired policy decided")
