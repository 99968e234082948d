from __future__ import annotations

from typing import Any

import pytest

from controller.correction import ACTIONS, FailureContext, RulesPolicy
from controller.correction.policy import Decision
from trainer.loop import GateConfig, decision_reward, off_policy


def record(action: str, fixed: bool, **kw: Any) -> dict[str, Any]:
    ctx = FailureContext(error_class="transient", task_type="x", max_retries=2, max_surgeries=3)
    return {
        "features": ctx.to_dict(),
        "action": action,
        "probability": 1.0,
        "fixed": fixed,
        "skipped": False,
        "task_seconds": kw.get("seconds", 1.0),
        "latency_added": 0.0,
        "inserted": 0,
    }


class Always:
    """A policy that always picks one action (with certainty)."""

    version = "always"

    def __init__(self, action: str) -> None:
        self.action = action

    def decide(self, ctx: FailureContext) -> Decision:
        probs = tuple(1.0 if str(a) == self.action else 0.0 for a in ACTIONS)
        return Decision(ACTIONS[[str(a) for a in ACTIONS].index(self.action)], probs, 1.0, (True,) * 7, self.version)


def test_decision_reward_uses_the_simulator_scale() -> None:
    assert decision_reward(record("retry_now", True, seconds=10)) == pytest.approx(1.0 - 0.02)
    assert decision_reward(record("abort", False)) == pytest.approx(-0.002)


def test_off_policy_prefers_the_policy_that_picks_what_worked() -> None:
    records = [record("retry_now", True) for _ in range(40)] + [record("retry_backoff", False) for _ in range(40)]
    config = GateConfig(min_decisions=30, min_ess=10)
    good = off_policy(records, Always("retry_now"), Always("retry_backoff"), config)
    assert good["candidate"] > good["active"]
    assert good["difference_low"] > 0.5
    # The gate refuses a candidate whose interval lies wholly below -tolerance: this one's does.
    bad = off_policy(records, Always("retry_backoff"), Always("retry_now"), config)
    assert bad["difference_high"] < -config.tolerance


def test_off_policy_refuses_without_enough_data_or_overlap() -> None:
    few = off_policy([record("retry_now", True)] * 5, Always("retry_now"), RulesPolicy(), GateConfig())
    assert "only 5 logged decisions" in few["reason"]
    records = [record("retry_now", True) for _ in range(50)]
    none = off_policy(records, Always("abort"), RulesPolicy(), GateConfig())
    assert "effective sample size" in none["reason"]
