"""Fit the simulator to logged correction decisions (``correction_decisions`` rows).

A record is one decision and its outcome::

    {"features": FailureContext.to_dict(), "action": "reroute", "fixed": False,
     "task_seconds": 26.0, "latency_added": 31.0, "inserted": 0}

The latent mode is never logged, so the fit is expectation-maximisation over a mixture. The unit
is a task (its decisions, grouped by ``task_id``), whose mode is the same for all of them: its
responsibility for each mode is the prior (``mix``) times the likelihood of what it showed (task
type, executor failure rate and upstream reward once; error class and duration ratio per
failure) under the mode's fixed emission model, times the likelihood of every re-run's outcome
under the current outcome rates. The M-step re-estimates

- ``mix`` from the tasks seen from their first failure (nothing tried yet): tasks met later are
  over-represented by hard modes, which would bias the mix;
- ``success[mode][action]`` from every re-running decision, responsibility-weighted;
- each task type's run time from ``task_seconds`` (divided by the action's cost factor);

and every estimate is shrunk toward the prior params with ``strength`` pseudo-records, so a few
records move the params a little and thousands move them to what the data says. The emission
model (which classes and contexts each mode produces) is structure, not fitted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from controller.correction.actions import CorrectiveAction
from controller.correction.features import FailureContext
from trainer.off_policy import trajectories
from trainer.params import MODES, RERUN_ACTIONS, SimulatorParams
from trainer.simulator import STREAM_VALID, Chooser, Episode, EpisodeState, Simulator

A = CorrectiveAction
_FLOOR = 1e-3  # likelihood floor: real logs may contain what the emission model never produces
_BROAD = 0.05  # weight of a flat component in the continuous densities, for the same reason


def _beta_logpdf(x: float, a: float, b: float) -> float:
    x = min(max(x, 1e-4), 1 - 1e-4)
    log_density = (
        (a - 1) * math.log(x) + (b - 1) * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    )
    return math.log((1 - _BROAD) * math.exp(log_density) + _BROAD)


def _normal_logpdf(x: float, mean: float, sd: float) -> float:
    density = math.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    return math.log((1 - _BROAD) * density + _BROAD / 2)  # flat over the reward range [-1, 1]


def _uniform_logpdf(x: float, lo: float, hi: float) -> float:
    inside = 1.0 / (hi - lo) if lo <= x <= hi and hi > lo else 0.0
    return math.log((1 - _BROAD) * inside + _BROAD / 2)  # flat over ratios [0, 2]


def task_loglik(params: SimulatorParams, ctx: FailureContext, mode: str) -> float:
    """log P(what a task shows once | mode): its type, executor failure rate and upstream reward,
    drawn once per failure episode."""
    p = params
    # A task type the params do not know says nothing about the mode (same factor for every mode).
    ll = math.log(max(p.type_given_mode[mode].get(ctx.task_type, 0.0), _FLOOR)) if ctx.task_type in p.types else 0.0
    ll += _beta_logpdf(ctx.executor_failure_rate, *p.failure_rate[mode])
    if ctx.upstream_reward is not None:
        ll += _normal_logpdf(ctx.upstream_reward, *p.upstream[mode])
    return ll


def step_loglik(params: SimulatorParams, ctx: FailureContext, mode: str) -> float:
    """log P(what each failure shows | mode): its error class and duration ratio, drawn per attempt."""
    p = params
    ll = math.log(max(p.error_given_mode[mode].get(ctx.error_class, 0.0), _FLOOR))
    if ctx.duration_ratio is not None and ctx.error_class != "timeout":
        ll += _uniform_logpdf(ctx.duration_ratio, *p.duration[mode])
    return ll


def emission_loglik(params: SimulatorParams, ctx: FailureContext, mode: str) -> float:
    """log P(observed context | mode) under the params' emission model, for one decision alone."""
    return task_loglik(params, ctx, mode) + step_loglik(params, ctx, mode)


def fit(
    records: Sequence[dict[str, Any]], prior: SimulatorParams, strength: float = 30.0, iterations: int = 30
) -> SimulatorParams:
    """EM over tasks: one task's decisions share its latent mode, so the responsibility is the
    task's, from everything it showed and every outcome of its re-runs (a decision scored alone
    forgets that the attempts before it on the same task already failed)."""
    modes = [str(m) for m in MODES]
    tasks = []
    for group in trajectories(records):
        steps = []
        for record in group:
            ctx = FailureContext.from_dict(record["features"])
            steps.append((ctx, A(record["action"]), bool(record.get("fixed", False))))
        first = steps[0][0]
        shown = [task_loglik(prior, first, m) + sum(step_loglik(prior, c, m) for c, _, _ in steps) for m in modes]
        # The mix is learnt from tasks seen from their first failure: later ones over-represent hard modes.
        tasks.append((steps, shown, not any(first.tried)))
    mix = dict(prior.mix)
    success = {m: dict(prior.success[m]) for m in modes}
    for _ in range(iterations):
        mix_sum = dict.fromkeys(modes, 0.0)
        n_first = 0
        hits = {m: dict.fromkeys(map(str, RERUN_ACTIONS), 0.0) for m in modes}
        tries = {m: dict.fromkeys(map(str, RERUN_ACTIONS), 0.0) for m in modes}
        for steps, shown, from_first in tasks:
            logs = []
            for m, e in zip(modes, shown, strict=True):
                lp = math.log(max(mix[m], 1e-12)) + e
                for _, action, fixed in steps:
                    if action in RERUN_ACTIONS:
                        q = min(max(success[m][str(action)], 0.01), 0.99)
                        lp += math.log(q if fixed else 1 - q)
                logs.append(lp)
            top = max(logs)
            weights = [math.exp(v - top) for v in logs]
            total = sum(weights)
            resp = [w / total for w in weights]
            if from_first:
                n_first += 1
                for m, r in zip(modes, resp, strict=True):
                    mix_sum[m] += r
            for _, action, fixed in steps:
                if action in RERUN_ACTIONS:
                    for m, r in zip(modes, resp, strict=True):
                        tries[m][str(action)] += r
                        hits[m][str(action)] += r * fixed
        mix = {m: (mix_sum[m] + strength * prior.mix[m]) / (n_first + strength) for m in modes}
        success = {
            m: {
                a: (hits[m][a] + strength * prior.success[m][a]) / (tries[m][a] + strength)
                for a in map(str, RERUN_ACTIONS)
            }
            for m in modes
        }
    return replace(prior, mix=mix, success=success, types=_fit_durations(records, prior, strength / 6))


def _fit_durations(records: Sequence[dict[str, Any]], prior: SimulatorParams, strength: float) -> dict[str, Any]:
    c = prior.costs
    # The controller logs the fixing attempt's own run time: after a repair that is the task's
    # plain run (the repair task's time is not in it), so it counts as it is.
    factor = {
        A.retry_now: 1.0,
        A.retry_backoff: 1.0,
        A.retry_tuned: c.tuned_factor,
        A.reroute: c.reroute_factor,
        A.insert_repair: 1.0,
    }
    sums: dict[str, list[float]] = {}
    for record in records:
        task_type, action = record["features"]["task_type"], A(record["action"])
        seconds = float(record.get("task_seconds", 0.0))
        # A type's run time is learnt from the attempts that fixed it: a failed attempt's time says
        # how long it took to fail (often at once), which is a cost in the reward, not a run time.
        if task_type not in prior.types or seconds <= 0 or not record.get("fixed"):
            continue
        if action in factor:
            sums.setdefault(task_type, []).append(seconds / factor[action])
    types = dict(prior.types)
    for name, values in sums.items():
        base = prior.types[name].seconds
        types[name] = replace(prior.types[name], seconds=(sum(values) + strength * base) / (len(values) + strength))
    return types


def simulate_records(sim: Simulator, episodes: Sequence[Episode], choose: Chooser) -> list[dict[str, Any]]:
    """Decision records, as the controller logs them, from playing ``episodes`` with ``choose``."""
    records: list[dict[str, Any]] = []
    for task_id, ep in enumerate(episodes):
        st = EpisodeState()
        while not st.done:
            ctx = sim.context(ep, st)
            action = choose(ep, ctx)
            before = (st.task_seconds, st.latency, st.inserted)
            sim.step(ep, st, action)
            seconds = st.task_seconds - before[0]
            if action is A.insert_repair and st.outcome == "fixed":
                seconds = sim.params.types[ep.task_type].seconds  # the controller logs the re-run alone
            records.append(
                {
                    "id": len(records),
                    "task_id": task_id,
                    "features": ctx.to_dict(),
                    "action": str(action),
                    "fixed": st.outcome == "fixed",
                    "task_seconds": seconds,
                    "latency_added": st.latency - before[1],
                    "inserted": st.inserted - before[2],
                }
            )
    return records


# Context fields compared by :func:`feature_drift`: the numbers the policy reads, as the controller
# reports them (budgets and counts are compared too, through what they are in the first decision).
DRIFT_FIELDS: tuple[str, ...] = (
    "executor_failure_rate",
    "duration_ratio",
    "reward",
    "upstream_reward",
    "progress",
    "has_fallback",
    "has_repair",
    "has_tunable",
    "optional",
    "max_retries",
    "max_surgeries",
    "max_inserted",
)


def feature_drift(
    records: Sequence[dict[str, Any]], params: SimulatorParams, episodes: int = 2000
) -> dict[str, dict[str, Any]]:
    """Where the first decisions of real failures look unlike the simulator's.

    Per field of :data:`DRIFT_FIELDS`: how many logged first decisions (nothing tried yet) have a
    value (``logged``), mean and range there and in ``episodes`` simulated ones, and ``ks``: the
    two-sample Kolmogorov-Smirnov distance between them (0: the same distribution, 1: disjoint;
    for a 0/1 field, the difference of the shares). The policy learnt what a feature's values
    mean from the simulator: where the real ones are distributed otherwise, it reads them as the
    simulator's (a failure rate that is high for every task reads as a degraded executor
    everywhere) or extrapolates. A large ``ks`` means the simulator's params — their emission
    model, which ``fit`` does not re-estimate — need changing.
    """
    real = [ctx for ctx in (FailureContext.from_dict(r["features"]) for r in records) if not any(ctx.tried)]
    sim = Simulator(params)
    simulated = [sim.context(ep, EpisodeState()) for ep in sim.episodes(STREAM_VALID, 0, episodes)]
    out: dict[str, dict[str, Any]] = {}
    for name in DRIFT_FIELDS:
        rv = [float(v) for v in (getattr(c, name) for c in real) if v is not None]
        sv = [float(v) for v in (getattr(c, name) for c in simulated) if v is not None]
        if not rv or not sv:
            continue
        out[name] = {
            "logged": len(rv),
            "real_mean": sum(rv) / len(rv),
            "real_range": (min(rv), max(rv)),
            "simulated_mean": sum(sv) / len(sv),
            "simulated_range": (min(sv), max(sv)),
            "ks": ks_distance(rv, sv),
        }
    return out


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest gap between the two samples' empirical distribution functions."""
    xa, xb = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    points = np.concatenate([xa, xb])
    fa = np.searchsorted(xa, points, side="right") / len(xa)
    fb = np.searchsorted(xb, points, side="right") / len(xb)
    return float(np.max(np.abs(fa - fb)))
