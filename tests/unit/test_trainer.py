"""The trainer: simulator determinism, fitting, PPO with masking, baselines and statistics."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from controller.correction.actions import ACTIONS, CorrectiveAction, mask
from controller.correction.features import FailureContext
from controller.correction.learned import ActorCritic, LearnedPolicy
from dagsmith.cli import app
from trainer.baselines import Oracle, always_retry, exponential_backoff, rules, tune_table
from trainer.evaluate import bootstrap_ci, evaluate, normalised, paired_difference_ci
from trainer.fit import simulate_records
from trainer.params import SHIFTED_MIX, Mode, RewardWeights, SimulatorParams
from trainer.ppo import PPOConfig, greedy_results, train
from trainer.simulator import STREAM_TEST, STREAM_TRAIN, Episode, EpisodeState, Simulator, VecEnv, episode_keys

A = CorrectiveAction
TINY = PPOConfig(total_timesteps=2048, num_envs=16, num_steps=16, eval_every=1000)


def random_valid(seed: int = 0):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)

    def choose(ep: Episode, ctx: FailureContext) -> CorrectiveAction:
        options = [a for a, ok in zip(ACTIONS, mask(ctx), strict=True) if ok and a is not A.abort]
        return rng.choice(options) if options else A.abort

    return choose


# --- simulator ---


def test_an_episode_depends_only_on_its_key() -> None:
    a, b = Simulator(), Simulator()
    forward = [a.draw((STREAM_TEST, 0, i)) for i in (3, 2000, 5)]
    backward = [b.draw((STREAM_TEST, 0, i)) for i in (5, 2000, 3)]
    assert forward == backward[::-1]
    assert a.draw((STREAM_TRAIN, 0, 3)) != a.draw((STREAM_TEST, 0, 3))  # streams are independent
    assert a.draw((STREAM_TRAIN, 0, 3)) != a.draw((STREAM_TRAIN, 1, 3))  # so are seeds


def test_policies_face_the_same_failures_and_the_same_luck() -> None:
    sim = Simulator()
    compared = 0
    for ep in sim.episodes(STREAM_TEST, 0, 300):
        first: dict[CorrectiveAction, tuple[FailureContext, str | None]] = {}
        for action in (A.retry_now, A.retry_backoff, A.retry_tuned):
            st = EpisodeState()
            ctx = sim.context(ep, st)
            if mask(ctx)[action.ordinal]:
                sim.step(ep, st, action)
                first[action] = (ctx, st.outcome)
        if len(first) < 2:
            continue
        compared += 1
        contexts = {ctx for ctx, _ in first.values()}
        assert len(contexts) == 1  # every policy sees the same failure
        # ... and the same luck: one pre-drawn number decides the step, whichever action is taken.
        for action, (_, outcome) in first.items():
            assert (outcome == "fixed") == (ep.outcome_draws[0] < sim.params.success[ep.mode][str(action)])
    assert compared > 50
    results = [sim.play(ep, rules) for ep in sim.episodes(STREAM_TEST, 0, 200)]
    again = [Simulator().play(ep, rules) for ep in Simulator().episodes(STREAM_TEST, 0, 200)]
    assert results == again


def test_episodes_end_and_report_their_costs() -> None:
    sim = Simulator()
    for ep in sim.episodes(STREAM_TEST, 1, 300):
        r = sim.play(ep, random_valid())
        assert r.outcome in ("fixed", "skipped", "failed")
        assert len(r.actions) <= ep.max_surgeries - ep.surgeries_before + 1
        assert r.task_seconds >= 0 and r.latency >= r.task_seconds * 0.99 and r.inserted >= 0


def test_invalid_actions_are_refused() -> None:
    sim = Simulator()
    ep = next(e for e in sim.episodes(STREAM_TEST, 0, 100) if not e.optional)
    with pytest.raises(ValueError, match="not valid"):
        sim.step(ep, EpisodeState(), A.skip)


def test_holdout_and_shifted_mix() -> None:
    params = SimulatorParams()
    held = params.holdout("rate_limited")
    assert held.mix["rate_limited"] == 0 and abs(sum(held.mix.values()) - 1) < 1e-9
    assert "rate_limited" in params.observable_error_classes()
    assert "rate_limited" not in held.observable_error_classes()
    assert all(e.mode != "rate_limited" for e in Simulator(held).episodes(STREAM_TEST, 0, 500))
    assert params.shifted().mix == pytest.approx(SHIFTED_MIX)
    with pytest.raises(ValueError, match="unknown mode"):
        params.holdout("gremlins")


def test_params_round_trip_through_json() -> None:
    params = SimulatorParams().shifted()
    assert SimulatorParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


# --- fitting to logged decisions ---


@pytest.fixture(scope="module")
def known_world() -> tuple[SimulatorParams, list[dict[str, object]]]:
    prior = SimulatorParams()
    success = {m: dict(v) for m, v in prior.success.items()}
    success["degraded_executor"]["reroute"] = 0.5
    true = replace(prior.with_mix(SHIFTED_MIX), success=success)
    sim = Simulator(true)
    return true, simulate_records(sim, sim.episodes(STREAM_TRAIN, 0, 2500), random_valid())


def test_fit_recovers_the_mix_and_outcome_rates(known_world: tuple[SimulatorParams, list[dict[str, object]]]) -> None:
    true, records = known_world
    prior = SimulatorParams()
    fitted = prior.fit(records, strength=5.0)  # type: ignore[arg-type]
    for mode, weight in true.mix.items():
        assert fitted.mix[mode] == pytest.approx(weight, abs=0.04), mode
    assert fitted.success["degraded_executor"]["reroute"] == pytest.approx(0.5, abs=0.12)
    assert fitted.success["rate_limited"]["retry_backoff"] == pytest.approx(0.85, abs=0.12)
    # Run times as the controller logs them (a repaired task's re-run alone, not the repair's time)
    for name, profile in true.types.items():
        assert fitted.types[name].seconds == pytest.approx(profile.seconds, rel=0.05), name


def test_fit_with_few_records_stays_near_the_prior(
    known_world: tuple[SimulatorParams, list[dict[str, object]]],
) -> None:
    prior = SimulatorParams()
    fitted = prior.fit(known_world[1][:10])  # type: ignore[arg-type]
    for mode, weight in prior.mix.items():
        assert fitted.mix[mode] == pytest.approx(weight, abs=0.06)


# --- masking and PPO ---


def test_the_network_never_samples_a_masked_action() -> None:
    torch.manual_seed(0)
    net = ActorCritic()
    obs = torch.randn(4096, net.actor[0].in_features)  # type: ignore[union-attr]
    valid = torch.rand(4096, len(ACTIONS)) < 0.4
    valid[:, -1] = True  # abort is always valid
    action, logprob, entropy, _ = net.get_action_and_value(obs, valid)
    assert valid[torch.arange(4096), action].all()
    assert torch.isfinite(logprob).all() and torch.isfinite(entropy).all()


class CheckingSimulator(Simulator):
    """Re-derives the mask from the context on every step, independently of the caller."""

    checked = 0

    def step(self, ep, st, action, valid=None):  # type: ignore[no-untyped-def]
        assert mask(self.context(ep, st))[action.ordinal], f"sampled masked action {action}"
        CheckingSimulator.checked += 1
        return super().step(ep, st, action, valid)


def test_rollouts_only_take_valid_actions_and_runs_are_reproducible() -> None:
    sim = CheckingSimulator()
    first = train(sim, TINY)
    assert CheckingSimulator.checked >= TINY.total_timesteps
    second = train(sim, TINY)
    for key, value in first.net.state_dict().items():
        assert torch.equal(value, second.net.state_dict()[key]), key
    row = first.history[-1]
    for diagnostic in ("approx_kl", "clipfrac", "explained_variance", "entropy", "mean_return", "value_loss"):
        assert diagnostic in row


def test_vec_env_resets_finished_episodes() -> None:
    env = VecEnv(Simulator(), episode_keys(STREAM_TRAIN, 0), 8)
    obs, masks = env.reset()
    finished = 0
    for _ in range(20):
        actions = np.array([int(np.flatnonzero(m)[-1]) for m in masks])  # abort: every episode ends
        obs, masks, _, dones, done = env.step(actions)
        assert dones.all() and len(done) == 8
        finished += len(done)
    assert finished == 160 and obs.shape == (8, obs.shape[1])


def test_a_tiny_ppo_run_beats_random_on_a_trivial_world() -> None:
    # Every failure is a degraded executor and every task has a fallback: reroute is the answer.
    base = SimulatorParams()
    params = base.with_mix({"degraded_executor": 1.0})
    params = replace(params, types={k: replace(v, p_fallback=1.0) for k, v in base.types.items()})
    sim = Simulator(params)
    test = sim.episodes(STREAM_TEST, 0, 300)
    result = train(sim, PPOConfig(total_timesteps=8192, num_envs=32, num_steps=16, eval_every=1000))
    learned = np.mean([r.reward for r in greedy_results(result.net, sim, test)])
    random_policy = np.mean([sim.play(ep, random_valid()).reward for ep in test])
    assert learned > random_policy + 0.15
    assert learned > np.mean([sim.play(ep, Oracle(sim)).reward for ep in test]) - 0.05


# --- baselines ---


def test_the_tuned_table_is_at_least_the_rules_on_its_training_episodes() -> None:
    sim = Simulator()
    train_eps = sim.episodes(STREAM_TRAIN, 0, 400)
    table = tune_table(sim, train_eps, passes=1)
    assert table.table  # it changed something
    tuned = np.mean([sim.play(ep, table).reward for ep in train_eps])
    assert tuned >= np.mean([sim.play(ep, rules).reward for ep in train_eps])


def test_the_oracle_beats_every_heuristic_on_held_out_episodes() -> None:
    sim = Simulator()
    test = sim.episodes(STREAM_TEST, 0, 1000)
    oracle = np.mean([sim.play(ep, Oracle(sim)).reward for ep in test])
    for chooser in (always_retry, exponential_backoff, rules):
        assert oracle > np.mean([sim.play(ep, chooser).reward for ep in test])


@pytest.mark.parametrize("failed_attempt", [0.0, 1.0])
def test_oracle_expected_reward_matches_its_play(failed_attempt: float) -> None:
    sim = Simulator(SimulatorParams(reward=RewardWeights(failed_attempt=failed_attempt)))
    oracle = Oracle(sim)
    episodes = sim.episodes(STREAM_TEST, 2, 1500)
    expected = np.mean([oracle.expected_reward(ep) for ep in episodes])
    played = np.mean([sim.play(ep, oracle).reward for ep in episodes])
    assert played == pytest.approx(expected, abs=0.04)


# --- statistics ---


def test_bootstrap_interval_covers_the_mean_and_shrinks() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 100), rng.normal(1.0, 1.0, 10_000)
    m, lo, hi = bootstrap_ci(small)
    assert lo < m < hi and lo < 1.0 < hi
    _, lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 5


def test_two_way_bootstrap_counts_seed_variance() -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(0, 1, (5, 2000)) + np.array([[-0.5], [0.0], [0.5], [0.2], [-0.2]])
    _, lo, hi = bootstrap_ci(rows)
    _, lo1, hi1 = bootstrap_ci(rows.reshape(-1))
    assert hi - lo > 2 * (hi1 - lo1)  # seed-to-seed differences widen the interval


def test_paired_differences() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1, 3000)
    assert paired_difference_ci(a, a) == (0.0, 0.0, 0.0)
    diff, lo, _ = paired_difference_ci(a + 0.05, a)
    assert lo > 0 and diff == pytest.approx(0.05)
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference_ci(a, a[:10])
    assert normalised(0.5, 0.0, 1.0) == 0.5 and normalised(0.0, 0.0, 1.0) == 0.0


def test_evaluate_counts_learned_fallbacks() -> None:
    sim = Simulator()
    net = ActorCritic()
    policy = LearnedPolicy(net.state_dict(), "untrained", known_error_classes=["timeout"])
    e = evaluate(sim, sim.episodes(STREAM_TEST, 0, 50), "untrained", [policy])
    assert e.decisions > 0 and e.fallback_rate > 0.5  # unknown classes and an untrained, unsure net
    assert set(e.fallbacks) <= {"unknown_error_class", "low_confidence"}
    assert e.only(str(Mode.transient)).results[0] == [r for r in e.results[0] if r.mode == "transient"]


# --- command line ---


def test_train_then_evaluate_from_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "policies"
    trained = runner.invoke(app, ["trainer", "train", "--seeds", "1", "--timesteps", "1024", "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    assert (out / "policy-seed0.pt").exists() and (out / "diagnostics-seed0.jsonl").read_text().strip()
    evaluated = runner.invoke(
        app, ["trainer", "evaluate", "--policy", str(out / "policy-seed0.pt"), "--episodes", "50"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert "policy-seed0.pt" in evaluated.output and "oracle" in evaluated.output


def test_from_db_refuses_the_options_it_would_ignore(tmp_path: Path) -> None:
    records = tmp_path / "records.jsonl"
    records.write_text("")
    done = CliRunner().invoke(app, ["trainer", "train", "--from-db", "--records", str(records)])
    assert done.exit_code == 2 and "--from-db does not take --records" in done.output


def test_the_simulator_counts_a_reroute_or_repair_against_the_retry_limit_as_the_controller_does() -> None:
    """controller.revisions adds a retry for every re-run (reroute and insert_repair too): after
    one with a limit of 1, the policy must see no retry left in training as it will in production."""
    sim = Simulator()
    ep = replace(next(e for e in sim.episodes(STREAM_TEST, 0, 200) if e.max_retries == 1), has_fallback=True)
    for action in (CorrectiveAction.reroute, CorrectiveAction.insert_repair):
        counts = [0] * len(ACTIONS)
        counts[action.ordinal] = 1
        ctx = sim.context(ep, EpisodeState(step=1, counts=counts))
        assert ctx.retries_used == 1, action
        valid = mask(replace(ctx, error_class="transient"))
        assert not valid[CorrectiveAction.retry_now.ordinal] and not valid[CorrectiveAction.retry_tuned.ordinal]


def test_the_simulator_counts_the_time_budget_from_the_workflows_start_as_the_controller_does() -> None:
    """controller.correct measures timeBudget from the workflow's start: a task that fails late in
    its workflow meets its first decision with part of the budget already gone, and training must
    show the policy such first decisions too."""
    sim = Simulator()
    budgeted = [e for e in sim.episodes(STREAM_TEST, 0, 400) if e.time_budget is not None]
    assert budgeted and all(0.0 <= e.time_before < e.time_budget for e in budgeted)  # type: ignore[operator]
    late = next(e for e in budgeted if e.time_before > 0)
    first = sim.context(late, EpisodeState())
    assert first.time_budget_used == pytest.approx(late.time_before / late.time_budget)  # type: ignore[operator]
    # Without a budget nothing is counted.
    unbudgeted = next(e for e in sim.episodes(STREAM_TEST, 0, 400) if e.time_budget is None)
    assert unbudgeted.time_before == 0.0 and sim.context(unbudgeted, EpisodeState()).time_budget_used is None
    # A workflow that spent its whole budget before the failure leaves only the terminal actions.
    spent = replace(late, time_before=late.time_budget)  # type: ignore[arg-type]
    valid = mask(sim.context(spent, EpisodeState()))
    assert not valid[A.retry_now.ordinal] and valid[A.abort.ordinal]


def test_the_lab_names_the_action_by_what_changed_since_the_last_attempt() -> None:
    """A tuned timeout, a reroute or a repair lasts; the plain retry after one is still a plain
    retry (counting it as the earlier action made retry_now look as good as the fix)."""
    import time

    from executors.registry import TaskContext
    from trainer import lab

    params = lab.LabParams(mode="resource", luck="t-1")

    def attempt(n: int, timeout: float, rerouted: bool = False, repaired: bool = False) -> str:
        ctx = TaskContext(1, n, "w", "work", "chaos.lab.ml", timeout)
        p = params.model_copy(update={"repaired": repaired})
        action = lab.action_of(p, ctx, rerouted)
        lab._last_attempt[(p.luck, ctx.name)] = (timeout, rerouted, repaired)
        lab._last_failure[(p.luck, ctx.name)] = time.time()
        return action

    lab._last_attempt[(params.luck, "work")] = (0.5, False, False)
    lab._last_failure[(params.luck, "work")] = time.time()
    assert attempt(2, 1.0) == "retry_tuned"
    assert attempt(3, 1.0) == "retry_now"  # the doubled timeout stays; nothing new was tried
    assert attempt(4, 1.0, repaired=True) == "insert_repair"
    assert attempt(5, 1.0, repaired=True) == "retry_now"
    assert attempt(6, 1.0, rerouted=True, repaired=True) == "reroute"
    assert attempt(7, 1.0, rerouted=True, repaired=True) == "retry_now"
    lab._last_failure[(params.luck, "work")] = time.time() - 2 * lab.BACKOFF_SECONDS
    assert attempt(8, 1.0, rerouted=True, repaired=True) == "retry_backoff"
