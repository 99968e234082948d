"""Against Postgres: what the trainer service counts as new since its last run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from controller.db import create_engine
from controller.migrate import upgrade
from tests.conftest import create_database, drop_database
from trainer.service import TrainerService

DECISION = (
    "INSERT INTO correction_decisions (workflow_id, task_id, task_name, task_type, attempt, error_class, mode, "
    "policy_version, feature_schema_version, features, observation, mask, action, probability, probabilities, "
    "outcome, outcome_at, created_at) VALUES (NULL, 1, 't', 'x', 1, 'transient', 'rules', 'rules', 1, '{}', '{0}', "
    "'{true}', 'retry_now', 1, '{1}', CAST(:outcome AS jsonb), :closed, :made)"
)


async def test_a_decision_that_closes_after_a_run_counts_for_the_next_and_a_restart_forgets_nothing() -> None:
    name = f"dagsmith_trainer_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    db = create_engine(url, pool_size=1, name="trainer-test")
    now = datetime.now(UTC)
    try:
        service = TrainerService(interval=3600, min_new=1, seeds=1, timesteps=None)
        async with db.begin() as conn:
            # Made long ago, closed after the last run read the log: new to that run.
            await conn.execute(
                sa.text(DECISION), {"outcome": '{"fixed": true}', "closed": now, "made": now - timedelta(hours=2)}
            )
            await conn.execute(
                sa.text(DECISION),
                {"outcome": '{"fixed": false}', "closed": now - timedelta(hours=3), "made": now - timedelta(hours=4)},
            )
            await conn.execute(sa.text(DECISION), {"outcome": None, "closed": None, "made": now})  # still open
        assert await service._new_decisions(db) == 2  # never trained: every closed decision
        service.trained_at = now - timedelta(hours=1)
        assert await service._new_decisions(db) == 1
        # A restarted service counts from the newest registered version.
        async with db.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO policies (version, status, weights, feature_schema_version, reward_version, training, "
                    "evaluation, created_at) VALUES ('v', 'candidate', '', 1, 'v1', '{}', '{}', :at)"
                ),
                {"at": now - timedelta(minutes=30)},
            )
        restarted = TrainerService(interval=3600, min_new=1, seeds=1, timesteps=None)
        assert await restarted._new_decisions(db) == 1
    finally:
        await db.dispose()
        drop_database(name)


def test_a_broken_active_policy_costs_no_trained_one_and_open_tasks_are_not_read() -> None:
    """The controllers decide with the rules when the active version does not load, so the
    trainer compares with the rules and keeps what it trained. A task with a decision still open
    is not read at all: its trajectory is incomplete."""
    import orjson

    from controller.correction import FailureContext
    from trainer.loop import GateConfig, load_records, train_and_gate

    name = f"dagsmith_trainer_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    upgrade(url)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO policies (version, status, weights, feature_schema_version, reward_version, training, "
                    "evaluation) VALUES ('broken', 'active', 'truncated upload', 1, 'v1', '{}', '{}')"
                )
            )
            now = datetime.now(UTC)
            features = orjson.dumps(FailureContext(error_class="transient", task_type="x").to_dict()).decode()
            decision = DECISION.replace("VALUES (NULL, 1,", "VALUES (NULL, :task,").replace("'{}'", ":features")
            for task, outcome in ((1, '{"fixed": false}'), (1, '{"fixed": true}'), (2, '{"fixed": false}'), (2, None)):
                conn.execute(
                    sa.text(decision),
                    {
                        "task": task,
                        "features": features,
                        "outcome": outcome,
                        "closed": now if outcome else None,
                        "made": now,
                    },
                )
            assert [r["task_id"] for r in load_records(conn)] == [1, 1]
        lines: list[str] = []
        trained = train_and_gate(
            url, seeds=1, timesteps=1024, gate_config=GateConfig(test_episodes=200, n_boot=100), log=lines.append
        )
        assert any("the active policy broken does not load" in line for line in lines), lines
        assert not trained.activated  # two decisions are too few for the real-data check
        assert "only 1 tasks" in trained.report.reason
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.text("SELECT version, status FROM policies")).all())
        assert rows == {"broken": "active", trained.version: "candidate"}
    finally:
        engine.dispose()
        drop_database(name)
