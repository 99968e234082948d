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


def test_feature_drift_flags_what_the_simulator_never_draws() -> None:
    """The lab's executors report a failure rate near 0.9 for every task; the default simulator
    draws such rates only for a degraded executor, so the policy would read every lab failure as one."""
    from dataclasses import replace

    import numpy as np

    from trainer.fit import feature_drift
    from trainer.params import SimulatorParams

    rates = np.random.default_rng(0).beta(9.0, 1.5, 200)
    logged = [
        {"features": FailureContext(error_class="unknown", task_type="x", executor_failure_rate=rate).to_dict()}
        for rate in rates.tolist()
    ]
    default = SimulatorParams()
    drift = feature_drift(logged, default, episodes=500)
    assert drift["executor_failure_rate"]["ks"] > 0.7
    assert drift["executor_failure_rate"]["real_mean"] == pytest.approx(float(rates.mean()))
    matched = replace(default, failure_rate={m: (9.0, 1.5) for m in default.failure_rate})
    assert feature_drift(logged, matched, episodes=500)["executor_failure_rate"]["ks"] < 0.3


def test_ks_distance() -> None:
    from trainer.fit import ks_distance

    assert ks_distance([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 0.0
    assert ks_distance([0.0, 0.1], [0.8, 0.9]) == 1.0
    assert ks_distance([0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]) == pytest.approx(0.25)


def test_the_gate_refuses_a_candidate_worse_than_the_rules_on_held_out_episodes() -> None:
    from trainer.loop import gate
    from trainer.params import SimulatorParams

    records = [record("retry_now", True) for _ in range(40)]
    config = GateConfig(test_episodes=300, min_decisions=30, min_ess=10, n_boot=500)
    report = gate(Always("abort"), None, SimulatorParams(), records, config)
    assert not report.passed
    assert "does not beat rules" in report.reason
    assert report.simulator["vs_rules"]["high"] < 0  # aborting at once is clearly worse


def test_off_policy_scores_an_argmax_policy_as_it_acts_not_by_its_distribution() -> None:
    """Deployed deterministically, a policy whose network gives retry_now 0.6 and reroute 0.4
    always retries: on logs where retrying never fixed anything, its value is 0 — not the 0.4
    its distribution's share of the reroutes would credit it with."""
    import math

    import torch

    from controller.correction.actions import N_ACTIONS, CorrectiveAction
    from controller.correction.learned import ActorCritic, LearnedPolicy, checkpoint_bytes

    net = ActorCritic()
    logits = [-30.0] * N_ACTIONS
    logits[CorrectiveAction.retry_now.ordinal] = math.log(0.6)
    logits[CorrectiveAction.reroute.ordinal] = math.log(0.4)
    with torch.no_grad():
        net.actor[-1].weight.zero_()
        net.actor[-1].bias.copy_(torch.tensor(logits))
    candidate = LearnedPolicy(checkpoint_bytes(net, ["transient"]), "argmax")
    ctx = FailureContext(error_class="transient", task_type="x", max_retries=2, max_surgeries=3, has_fallback=True)
    decision = candidate.decide(ctx)
    assert decision.action is CorrectiveAction.retry_now and decision.fallback_reason is None
    assert decision.probabilities[CorrectiveAction.reroute.ordinal] == pytest.approx(0.4, abs=0.01)
    records = [{**record("retry_now", False, seconds=0.0), "features": ctx.to_dict()} for _ in range(50)] + [
        {**record("reroute", True, seconds=0.0), "features": ctx.to_dict()} for _ in range(50)
    ]
    ope = off_policy(records, candidate, Always("reroute"), GateConfig(n_boot=200))
    assert ope["candidate"] == pytest.approx(0.0, abs=1e-6)
    assert ope["active"] == pytest.approx(1.0, abs=1e-6)


def test_off_policy_refuses_when_the_active_policy_has_no_support() -> None:
    """An active policy that agrees with 2 of 200 logged decisions has no estimate to compare
    with (in many resamples none at all): that is a refusal, not a pass."""
    records = [record("retry_now", False) for _ in range(198)] + [record("retry_backoff", True) for _ in range(2)]
    ope = off_policy(records, Always("retry_now"), Always("retry_backoff"), GateConfig(n_boot=200))
    assert "the active policy rarely chooses what was logged" in ope["reason"]


def test_a_decision_taken_by_argmax_was_certain_and_a_sampled_one_was_not() -> None:
    probs = (0.7, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0)
    argmax = Decision(ACTIONS[0], probs, 0.7, (True,) * 7, "v")
    assert argmax.probability_of(ACTIONS[0]) == 1.0 and argmax.probability_of(str(ACTIONS[1])) == 0.0
    sampled = Decision(ACTIONS[0], probs, 0.7, (True,) * 7, "v", sampled=True)
    assert sampled.probability_of(ACTIONS[0]) == 0.7 and sampled.probability_of(ACTIONS[1]) == 0.3
