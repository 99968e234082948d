"""The trainer service (``dagsmith trainer serve``): retrains the correction policy on a schedule.

Every ``interval`` seconds it counts decisions whose outcome became known since the last
training; with at least ``min_new`` of them it trains from the decision log, runs the gate and
activates a version that passes (controllers pick it up live). Training runs in a thread so the
metrics endpoint (port 9104) stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

import sqlalchemy as sa
import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.db import create_engine
from dagsmith.metrics_http import serve_metrics
from dagsmith.settings import get_settings
from trainer.loop import LEARNABLE

log = structlog.get_logger(__name__)
DEFAULT_METRICS_PORT = 9104
GATE = Counter("dagsmith_policy_gate_total", "Trained policy versions by gate result.", ["result"])
RUNS = Counter("dagsmith_trainer_runs_total", "Training runs.", ["outcome"])
LAST_RUN = Gauge("dagsmith_trainer_last_run_timestamp_seconds", "When the last training run finished.")
PENDING = Gauge("dagsmith_trainer_new_decisions", "Decisions with outcomes not yet trained on.")
# A quiet installation trains rarely (it waits for new decisions), so the last run's time says
# nothing about whether the trainer still works: the last check does (DagsmithTrainerStalled).
LAST_CHECK = Gauge("dagsmith_trainer_last_check_timestamp_seconds", "When the trainer last read the decision log.")
INTERVAL = Gauge("dagsmith_trainer_interval_seconds", "Seconds between checks (DAGSMITH_TRAINER_INTERVAL).")
# Every label series exists from the start, at 0: one first made by its first inc() starts at 1,
# which increase() (the DagsmithPolicyGateFailed and DagsmithTrainerFailing alerts) never sees.
for _result in ("passed", "failed"):
    GATE.labels(_result)
for _outcome in ("activated", "registered", "error"):
    RUNS.labels(_outcome)


class TrainerService:
    def __init__(self, interval: float, min_new: int, seeds: int, timesteps: int | None) -> None:
        self.interval = interval
        self.min_new = min_new
        self.seeds = seeds
        self.timesteps = timesteps
        self.settings = get_settings()
        # When the last training run read the log. None: when the newest registered version was
        # made (so a restarted service does not count old outcomes again), or ever.
        self.trained_at: datetime | None = None

    async def _new_decisions(self, db: AsyncEngine) -> int:
        """Decisions whose outcome became known since the last training: by when they closed,
        not by id, since a decision made before a run may close after it."""
        async with db.connect() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        f"SELECT count(*) FROM correction_decisions WHERE {LEARNABLE} AND outcome_at > "
                        "COALESCE(CAST(:since AS timestamptz), (SELECT max(created_at) FROM policies), '-infinity')"
                    ),
                    {"since": self.trained_at},
                )
            ).one()
        return int(row[0])

    async def run(self, stop: asyncio.Event) -> None:
        from trainer.loop import train_and_gate

        serve_metrics(self.settings.metrics_port, DEFAULT_METRICS_PORT, "trainer", self.settings.metrics_host)
        db = create_engine(self.settings.database_url.get_secret_value(), pool_size=1, name="dagsmith-trainer")
        log.info("trainer started", interval=self.interval, min_new=self.min_new)
        INTERVAL.set(self.interval)
        try:
            while not stop.is_set():
                try:
                    new = await self._new_decisions(db)
                    PENDING.set(new)
                    LAST_CHECK.set(time.time())
                    if new >= self.min_new:
                        log.info("training on new decisions", new=new)
                        reading_from = datetime.now(UTC)
                        trained = await asyncio.to_thread(
                            train_and_gate,
                            self.settings.database_url.get_secret_value(),
                            seeds=self.seeds,
                            timesteps=self.timesteps,
                            log=lambda line: log.info(line),
                        )
                        self.trained_at = reading_from
                        GATE.labels("passed" if trained.report.passed else "failed").inc()
                        RUNS.labels("activated" if trained.activated else "registered").inc()
                        LAST_RUN.set(time.time())
                        log.info(
                            "training finished",
                            version=trained.version,
                            activated=trained.activated,
                            gate=trained.report.reason,
                        )
                except Exception:
                    RUNS.labels("error").inc()
                    log.exception("training run failed; trying again at the next interval")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.interval)
        finally:
            await db.dispose()
            log.info("trainer stopped")
