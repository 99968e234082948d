"""What a policy would have earned on the real, logged decisions: the gate's off-policy estimate.

The unit is a task's *trajectory*: its decisions in order, from the first failure to the end of
its correction. Each decision's reward is :func:`decision_reward` (1 if it fixed the task, 0.4 if
it skipped it, less a failed attempt's charge if it re-ran the task without fixing it, less what
it cost), so a trajectory's return is the simulator's episode reward. For a policy ``pi`` the
estimate is doubly robust, computed backwards over the trajectory, with the logged propensities
``mu`` (the distribution the controller acted from, exploration included —
``controller.correction.explore``):

    V_t = pi(skip)·0.4 + pi(abort)·0 + [a_t is a recovery action] · pi(a_t)/mu(a_t) · (r_t + V_t+1)

Its model is exact where it can be: giving up (skip, abort) ends the task at once with a known
reward, so those actions need no data; for the recovery actions (retries, reroute, repair) the
model is 0 and the importance weight carries the logged return. The estimate is unbiased as long
as every recovery action the policy may take had a non-zero logged propensity; a trajectory where
it did not is *unsupported*, and with more than ``max_unsupported`` of them the check refuses to
estimate (the controller was not exploring). A decision the controller forced to abort (a budget
ran out, or the surgery proved impossible) is the environment's, not the policy's: it is worth
the abort whatever the policy chose.

Both policies are estimated on the same trajectories; the 95% interval of their difference comes
from a bootstrap over trajectories (decisions of one task are not independent). Where the
candidate would act otherwise than the logging policy, its estimate rests on the few tasks where
exploration happened to try its choice, each with a large weight; with fewer than
``min_observed`` of them the estimate sits near zero for those tasks and its interval is narrow
for the wrong reason, so the answer says ``inconclusive`` (the real data cannot tell either way).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from controller.correction import ACTIONS, FailureContext
from controller.correction.actions import TERMINAL_ACTIONS, CorrectiveAction, mask
from controller.correction.explore import NOT_EXPLORED, explorable
from controller.correction.policy import Policy, one_hot
from trainer.params import RewardWeights

# fallback_reason prefixes of the aborts the controller forces (controller.correct).
FORCED = ("budget:", "impossible:")


def decision_reward(record: dict[str, Any], weights: RewardWeights = RewardWeights()) -> float:
    """A logged decision's reward, on the simulator's scale (success dominates; costs subtract)."""
    outcome = weights.fixed if record["fixed"] else weights.skipped if record.get("skipped") else weights.failed
    rerun_failed = not record["fixed"] and CorrectiveAction(record["action"]) not in TERMINAL_ACTIONS
    return (
        outcome
        - weights.failed_attempt * rerun_failed
        - weights.per_task_second * record["task_seconds"]
        - weights.per_latency_second * record["latency_added"]
        - weights.per_inserted_task * record["inserted"]
    )


def trajectories(records: Iterable[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Records grouped by task, each group in decision order (a record without ``task_id`` is a
    trajectory of its own)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.get("task_id", ("record", i)), []).append(record)
    return [sorted(group, key=lambda r: r.get("id", 0)) for group in groups.values()]


def _logged_distribution(record: dict[str, Any]) -> list[float]:
    behaviour = record.get("behaviour")
    if behaviour:
        return [float(p) for p in behaviour]
    return list(one_hot(CorrectiveAction(record["action"])))  # logged before exploration existed


def _mixed(record: dict[str, Any]) -> bool:
    """Whether the distribution the controller acted from gave a chance to more than one action."""
    return sum(p > 0 for p in record.get("behaviour") or ()) > 1


def _exploring(record: dict[str, Any]) -> bool:
    """Whether the controller explored when it logged this decision: its behaviour distribution
    gives a chance to more than one action wherever it would explore (more than one recovery
    action valid, and not a poison failure). Tasks logged without exploration are left out whole
    (by when they were logged, not by what happened to them, so leaving them out biases nothing)."""
    if not record.get("behaviour"):
        return False
    if _mixed(record):
        return True
    ctx = FailureContext.from_dict(record["features"])
    return ctx.error_class in NOT_EXPLORED or len(explorable(mask(ctx))) <= 1  # nothing it would explore


@dataclass(frozen=True)
class TrajectoryEstimate:
    value: float
    supported: bool  # every recovery action the policy may take had a logged propensity
    agreed: bool  # the policy would have taken every logged action (with certainty)
    # The policy would try a recovery action the logging policy would not have chosen ...
    differed: bool
    # ... and exploration tried it there, so the log holds what came of it.
    observed: bool


def estimate_trajectory(
    decisions: list[dict[str, Any]], policy: Policy, weights: RewardWeights = RewardWeights()
) -> TrajectoryEstimate:
    known = {CorrectiveAction.skip: weights.skipped, CorrectiveAction.abort: weights.failed}
    steps: list[tuple[float, CorrectiveAction, float, dict[str, Any]] | None] = []  # None: a forced abort
    supported, agreed, differed, observed, reach = True, True, False, False, 1.0
    for record in decisions:
        if str(record.get("fallback_reason") or "").startswith(FORCED):
            steps.append(None)
            break  # a forced abort ends the task
        ctx = FailureContext.from_dict(record["features"])
        chosen = policy.decide(ctx)
        pi = [chosen.probability_of(a) for a in ACTIONS]
        mu = _logged_distribution(record)
        action = CorrectiveAction(record["action"])
        if reach > 0 and any(pi[a.ordinal] > 0 and mu[a.ordinal] <= 0 for a in ACTIONS if a not in TERMINAL_ACTIONS):
            supported = False
        agreed = agreed and pi[action.ordinal] == 1.0
        own = max(ACTIONS, key=lambda a: mu[a.ordinal])  # what the logging policy itself chose
        if reach > 0 and any(pi[a.ordinal] > 0 for a in ACTIONS if a not in TERMINAL_ACTIONS and a is not own):
            differed = True
            observed = observed or (action is not own and pi[action.ordinal] > 0)
        ratio = pi[action.ordinal] / mu[action.ordinal] if mu[action.ordinal] > 0 else 0.0
        steps.append((sum(p * known[a] for a, p in zip(ACTIONS, pi, strict=True) if a in known), action, ratio, record))
        reach *= ratio
    value = 0.0
    for step in reversed(steps):
        if step is None:
            value = weights.failed
            continue
        giving_up, action, ratio, record = step
        if action in TERMINAL_ACTIONS:
            value = giving_up
        else:
            value = giving_up + ratio * (decision_reward(record, weights) + value)
    return TrajectoryEstimate(value, supported, agreed, differed, observed)


def off_policy(
    records: list[dict[str, Any]],
    candidate: Policy,
    active: Policy,
    *,
    min_tasks: int = 30,
    max_unsupported: float = 0.05,
    min_observed: int = 10,
    n_boot: int = 2000,
    weights: RewardWeights = RewardWeights(),
) -> dict[str, Any]:
    """Both policies estimated on the same logged trajectories, and the interval of their
    difference. A ``reason`` in the answer says why no estimate could be made."""
    tasks = trajectories(records)
    out: dict[str, Any] = {
        "decisions": len(records),
        "tasks": len(tasks),
        "explored": sum(bool(r.get("explored")) for r in records),
    }
    if len(tasks) < min_tasks:
        out["reason"] = f"only {len(tasks)} tasks with logged decisions and known outcomes (needs {min_tasks})"
        return out
    readable = []
    for task in tasks:
        try:
            [FailureContext.from_dict(r["features"]) for r in task]
        except ValueError:  # another feature schema: not this policy's to judge
            continue
        readable.append(task)
    out["unreadable"] = len(tasks) - len(readable)
    tasks = [t for t in readable if all(_exploring(r) for r in t)]
    out["unexplored"] = len(readable) - len(tasks)
    # Counted only where a decision shows it: a task whose every decision had nothing to explore
    # (or was poison) looks the same whether the controller explored or not.
    exploring = sum(any(_mixed(r) for r in t) for t in tasks)
    if exploring < min_tasks:
        out["reason"] = (
            f"only {exploring} tasks logged while the controller explored (needs {min_tasks}; "
            f"{out['unexplored']} were logged without exploration, DAGSMITH_CORRECTION_EXPLORATION=0 or an "
            "older build, and say nothing of the actions the rules did not take)"
        )
        return out
    values = {}
    for name, policy in (("candidate", candidate), ("active", active)):
        estimates = [estimate_trajectory(t, policy, weights) for t in tasks]
        unsupported = sum(not e.supported for e in estimates) / len(tasks)
        out[f"unsupported_{name}"] = unsupported
        out[f"agreed_{name}"] = sum(e.agreed for e in estimates) / len(tasks)
        if unsupported > max_unsupported:
            out["reason"] = (
                f"in {unsupported:.0%} of the logged tasks the {name} policy would try a recovery action the "
                "controller never tried there (more than "
                f"{max_unsupported:.0%}); the logs say nothing about it. Exploration "
                "(DAGSMITH_CORRECTION_EXPLORATION) gives every recovery action a chance"
            )
            return out
        values[name] = np.array([e.value for e in estimates])
        if name == "candidate":
            differed, observed = sum(e.differed for e in estimates), sum(e.observed for e in estimates)
            out.update(differed_candidate=differed, observed_candidate=observed)
            # The importance weights of a rarely explored action are large and rare: with few
            # tasks where the log saw it, the estimate is near zero for them and its interval is
            # narrow for the wrong reason. Then the real data cannot tell, in either direction.
            if differed > max_unsupported * len(tasks) and observed < min_observed:
                out["inconclusive"] = (
                    f"the candidate would try another recovery action than the controller chose in {differed} "
                    f"of {len(tasks)} tasks, and exploration tried its choice in only {observed} of them "
                    f"(needs {min_observed}): too little to tell on real decisions"
                )
    logged = np.array([sum(decision_reward(r, weights) for r in t) for t in tasks])
    diff = values["candidate"] - values["active"]
    rng = np.random.default_rng(0)
    boot = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)])
    out.update(
        candidate=float(values["candidate"].mean()),
        active=float(values["active"].mean()),
        logged=float(logged.mean()),
        difference_low=float(np.quantile(boot, 0.025)),
        difference_high=float(np.quantile(boot, 0.975)),
    )
    return out
