from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from controller.correction import ACTIONS, CorrectiveAction, FailureContext, RulesPolicy
from controller.correction.explore import behaviour, explore
from controller.correction.policy import Decision
from trainer.loop import GateConfig
from trainer.off_policy import decision_reward, estimate_trajectory, off_policy
from trainer.params import RewardWeights

CTX = FailureContext(error_class="transient", task_type="x", max_retries=2, max_surgeries=3, has_tunable=True)


def record(action: str, fixed: bool, **kw: Any) -> dict[str, Any]:
    """A logged decision; without ``behaviour`` it was taken with certainty (no exploration)."""
    return {
        "features": kw.get("ctx", CTX).to_dict(),
        "action": action,
        "probability": 1.0,
        "fixed": fixed,
        "skipped": False,
        "task_seconds": kw.get("seconds", 1.0),
        "latency_added": 0.0,
        "inserted": 0,
        **{k: v for k, v in kw.items() if k in ("task_id", "id", "behaviour", "explored", "fallback_reason")},
    }


class Always:
    """A policy that always picks one action (with certainty)."""

    version = "always"

    def __init__(self, action: str) -> None:
        self.action = action

    def decide(self, ctx: FailureContext) -> Decision:
        probs = tuple(1.0 if str(a) == self.action else 0.0 for a in ACTIONS)
        return Decision(ACTIONS[[str(a) for a in ACTIONS].index(self.action)], probs, 1.0, (True,) * 7, self.version)


# A small world: each recovery action fixes the task with its own chance; the controller decides at
# most twice per task (then the task fails), each attempt costing one task-second.
FIXES = {"retry_now": 0.4, "retry_backoff": 0.3, "retry_tuned": 0.8}


def context(tried: tuple[int, ...]) -> FailureContext:
    return replace(CTX, tried=tried)


def log_tasks(n: int, epsilon: float, seed: int = 0) -> list[dict[str, Any]]:
    """Tasks corrected by the rules with exploration, logged as the controller logs them."""
    rng = random.Random(seed)
    rules, records = RulesPolicy(), []
    for task in range(n):
        tried = (0,) * len(ACTIONS)
        for step in range(2):
            decision = rules.decide(context(tried))
            mixed = behaviour(decision, epsilon)
            explored = explore(decision, epsilon, rng)
            taken = (explored or decision).action
            fixed = str(taken) in FIXES and rng.random() < FIXES[str(taken)]
            records.append(
                record(
                    str(taken),
                    fixed,
                    ctx=context(tried),
                    task_id=task,
                    id=2 * task + step,
                    behaviour=list(mixed),
                    explored=explored is not None,
                )
            )
            if fixed or taken == CorrectiveAction.abort:
                break
            tried = tuple(t + (a == taken) for t, a in zip(tried, ACTIONS, strict=True))
    return records


def value_of(policy: Any, tried: tuple[int, ...] = (0,) * len(ACTIONS), step: int = 0) -> float:
    """What a deterministic policy earns in that world (exactly)."""
    action = policy.decide(context(tried)).action
    if step == 2 or str(action) not in FIXES:
        return 0.0  # out of attempts, or aborted
    p, cost = FIXES[str(action)], 0.002
    after = tuple(t + (a == action) for t, a in zip(tried, ACTIONS, strict=True))
    return p * (1 - cost) + (1 - p) * (-cost - RewardWeights().failed_attempt + value_of(policy, after, step + 1))


class RetryOnceThenAbort:
    version = "retry-once"

    def decide(self, ctx: FailureContext) -> Decision:
        first = ctx.tried[CorrectiveAction.retry_now.ordinal] == 0
        return Always("retry_now" if first else "abort").decide(ctx)


def test_decision_reward_uses_the_simulator_scale() -> None:
    w = RewardWeights()
    assert decision_reward(record("retry_now", True, seconds=10)) == pytest.approx(1.0 - 0.02)
    assert decision_reward(record("retry_now", False, seconds=10)) == pytest.approx(-0.02 - w.failed_attempt)
    assert decision_reward(record("abort", False)) == pytest.approx(-0.002)
    # A failed re-run is charged as the evaluator charges it; giving up is not a failed attempt.
    charged = RewardWeights(failed_attempt=1.0)
    assert decision_reward(record("retry_now", False, seconds=10), charged) == pytest.approx(-1.02)
    assert decision_reward(record("abort", False), charged) == pytest.approx(-0.002)


def test_exploration_tries_only_valid_recovery_actions_and_logs_its_propensities() -> None:
    decision = RulesPolicy().decide(CTX)
    mixed = behaviour(decision, 0.3)
    assert sum(mixed) == pytest.approx(1.0)
    assert mixed[CorrectiveAction.abort.ordinal] == 0.0 and mixed[CorrectiveAction.skip.ordinal] == 0.0
    assert mixed[CorrectiveAction.reroute.ordinal] == 0.0  # masked: no fallback
    assert mixed[decision.action.ordinal] == pytest.approx(0.7 + 0.1)
    rng = random.Random(1)
    taken = [explore(decision, 0.3, rng) for _ in range(3000)]
    tried = [t.action for t in taken if t is not None]
    assert len(tried) / 3000 == pytest.approx(0.3, abs=0.03)
    assert set(tried) == {CorrectiveAction.retry_now, CorrectiveAction.retry_backoff, CorrectiveAction.retry_tuned}
    assert all(explore(decision, 0.0, rng) is None for _ in range(100))


@pytest.mark.parametrize("policy", [Always("retry_tuned"), Always("retry_backoff"), Always("abort")])
def test_the_estimate_finds_what_a_policy_the_logs_rarely_followed_is_worth(policy: Any) -> None:
    """The rules acted; exploration tried the other recovery actions now and then. The estimate
    of a policy that does something else converges on its true value, unlike a mean over the
    decisions that happened to agree with it."""
    records = log_tasks(4000, epsilon=0.3)
    ope = off_policy(records, policy, RulesPolicy(), n_boot=200)
    assert ope["active"] == pytest.approx(value_of(RulesPolicy()), abs=0.03)
    # seeded, so not a matter of luck here; over seeds the estimate is centred on the true value
    assert ope["difference_low"] < value_of(policy) - value_of(RulesPolicy()) < ope["difference_high"]
    assert ope["candidate"] == pytest.approx(value_of(policy), abs=0.1)


def test_a_worse_policy_is_shown_worse_however_well_it_agrees_on_what_it_keeps() -> None:
    """Giving up after one failed retry is worse than what the rules do; agreeing with the logged
    first retries, which often worked, must not make it look better (the bias of scoring only
    the decisions a policy agrees with, with a propensity of 1 for every logged one)."""
    records = log_tasks(3000, epsilon=0.1)
    ope = off_policy(records, RetryOnceThenAbort(), RulesPolicy(), n_boot=300)
    assert value_of(RetryOnceThenAbort()) < value_of(RulesPolicy())
    assert ope["difference_high"] < 0
    assert ope["candidate"] == pytest.approx(value_of(RetryOnceThenAbort()), abs=0.03)


def test_tasks_logged_without_exploration_are_left_out() -> None:
    """They say nothing of the actions the rules did not take (an installation with exploration
    off, or decisions from before it existed); left out whole, by when they were logged."""
    unexplored = log_tasks(200, epsilon=0.0)
    ope = off_policy(unexplored, Always("retry_tuned"), RulesPolicy(), n_boot=100)
    assert "only 0 tasks logged while the controller explored" in ope["reason"]
    assert "DAGSMITH_CORRECTION_EXPLORATION" in ope["reason"]
    explored = log_tasks(2000, epsilon=0.3, seed=5)
    for r in explored:
        r["task_id"] += 10_000
    mixed = off_policy(unexplored + explored, Always("retry_tuned"), RulesPolicy(), n_boot=200)
    assert mixed["unexplored"] == 200 and mixed["tasks"] == 2200
    truth = value_of(Always("retry_tuned")) - value_of(RulesPolicy())
    assert mixed["difference_low"] < truth < mixed["difference_high"]


def test_a_forced_abort_is_worth_the_abort_whatever_the_policy_chose() -> None:
    forced = [
        record("retry_now", False, task_id=1, id=1),
        record("abort", False, task_id=1, id=2, fallback_reason="budget: maxSurgeries 3 reached"),
    ]
    failed_retry = -0.002 - RewardWeights().failed_attempt
    assert estimate_trajectory(forced, RulesPolicy()).value == pytest.approx(failed_retry)


def test_off_policy_refuses_without_enough_tasks() -> None:
    few = off_policy([record("retry_now", True, task_id=i) for i in range(5)], Always("retry_now"), RulesPolicy())
    assert "only 5 tasks" in few["reason"]


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

    records = log_tasks(100, epsilon=0.2)
    config = GateConfig(test_episodes=300, n_boot=500)
    report = gate(Always("abort"), None, SimulatorParams(), records, config)
    assert not report.passed
    assert "does not beat rules" in report.reason
    assert report.simulator["vs_rules"]["high"] < 0  # aborting at once is clearly worse


def test_off_policy_scores_an_argmax_policy_as_it_acts_not_by_its_distribution() -> None:
    """Deployed deterministically, a policy whose network gives retry_now 0.6 and reroute 0.4
    always retries: on logs where retrying never fixed anything, its value is a failed re-run's
    charge — not the 0.4 its distribution's share of the reroutes would credit it with."""
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
    half = [0.5 if a in (CorrectiveAction.retry_now, CorrectiveAction.reroute) else 0.0 for a in ACTIONS]
    records = [record("retry_now", False, seconds=0.0, ctx=ctx, task_id=i, behaviour=half) for i in range(50)] + [
        record("reroute", True, seconds=0.0, ctx=ctx, task_id=50 + i, behaviour=half) for i in range(50)
    ]
    ope = off_policy(records, candidate, Always("reroute"), n_boot=200)
    assert ope["candidate"] == pytest.approx(-RewardWeights().failed_attempt, abs=1e-6)
    assert ope["active"] == pytest.approx(1.0, abs=1e-6)


def test_the_gate_keeps_its_verdict_on_the_tasks_it_read_whole() -> None:
    """Records come newest first; the task the cut splits is left out, not read from its middle."""
    from trainer.loop import recent_tasks

    records = [record("retry_now", False, task_id=t, id=10 - i) for i, t in enumerate([3, 3, 2, 2, 1, 1])]
    assert [r["task_id"] for r in recent_tasks(records, 3)] == [3, 3]
    assert len(recent_tasks(records, 6)) == 6


def test_a_decision_taken_by_argmax_was_certain_and_a_sampled_one_was_not() -> None:
    probs = (0.7, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0)
    argmax = Decision(ACTIONS[0], probs, 0.7, (True,) * 7, "v")
    assert argmax.probability_of(ACTIONS[0]) == 1.0 and argmax.probability_of(str(ACTIONS[1])) == 0.0
    sampled = Decision(ACTIONS[0], probs, 0.7, (True,) * 7, "v", sampled=True)
    assert sampled.probability_of(ACTIONS[0]) == 0.7 and sampled.probability_of(ACTIONS[1]) == 0.3


def test_decisions_on_types_the_simulator_lacks_are_counted() -> None:
    from trainer.loop import unmodelled_types
    from trainer.params import SimulatorParams

    known = record("retry_now", True, ctx=replace(CTX, task_type="http.fetch"))
    unknown = [record("retry_now", True, ctx=replace(CTX, task_type=t)) for t in ("shell.run", "shell.run", "noop")]
    summary = unmodelled_types([known, *unknown], SimulatorParams())
    assert summary == {"share": 0.75, "types": ["shell.run", "noop"]}
    assert unmodelled_types([], SimulatorParams())["share"] == 0.0


def test_a_policy_whose_choices_were_hardly_ever_tried_is_inconclusive_not_worse() -> None:
    """With exploration this rare, the log tried the candidate's own choice on a handful of the
    tasks where it differs: its estimate sits near zero there and the interval is narrow for the
    wrong reason, so the check says it cannot tell (and does not refuse it as worse)."""
    records = log_tasks(300, epsilon=0.02)
    ope = off_policy(records, Always("retry_tuned"), RulesPolicy(), n_boot=200)
    assert ope["differed_candidate"] > 250 and ope["observed_candidate"] < 10
    assert "exploration tried its choice in only" in ope["inconclusive"]
    plenty = off_policy(log_tasks(2000, epsilon=0.3), Always("retry_tuned"), RulesPolicy(), n_boot=200)
    assert "inconclusive" not in plenty and plenty["observed_candidate"] >= 10


def test_poison_tasks_stay_in_the_check_but_do_not_show_exploration() -> None:
    """The controller never explores on a poison failure, so its certain choice there is all the
    log could hold: such tasks stay in the check instead of being left out as unexplored. They
    look the same with exploration off, so they do not count towards the tasks the check needs."""
    poison = replace(CTX, error_class="poison", has_fallback=True)  # a tuned re-run or a reroute is valid
    one_hot_abort = [1.0 if a is CorrectiveAction.abort else 0.0 for a in ACTIONS]
    poisoned = [record("abort", False, ctx=poison, task_id=-1 - i, behaviour=one_hot_abort) for i in range(40)]
    alone = off_policy(poisoned, RulesPolicy(), RulesPolicy(), n_boot=50)
    assert "only 0 tasks logged while the controller explored" in alone["reason"]
    ope = off_policy(log_tasks(60, epsilon=0.3) + poisoned, RulesPolicy(), RulesPolicy(), n_boot=50)
    assert "reason" not in ope and ope["unexplored"] == 0 and ope["tasks"] == 100


def test_the_check_scores_with_the_weights_it_is_given() -> None:
    """The gate passes the simulator's reward weights, so both halves judge on one reward."""
    records = log_tasks(200, epsilon=0.3)
    free = off_policy(records, RulesPolicy(), RulesPolicy(), n_boot=50, weights=RewardWeights(failed_attempt=0.0))
    charged = off_policy(records, RulesPolicy(), RulesPolicy(), n_boot=50, weights=RewardWeights(failed_attempt=1.0))
    assert charged["active"] < free["active"] - 0.1
