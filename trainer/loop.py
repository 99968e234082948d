"""The learning loop against the real system: decision records from Postgres, the gate, the
registry. ``train_and_gate`` is what ``dagsmith trainer train --from-db`` and the trainer service run.

The gate a candidate must pass before it may become active:

1. **Simulator**: on held-out simulator episodes (the TEST stream, never trained or tuned on) the
   candidate — with its fallback to the rules in place — beats the rules, and beats the active
   policy if there is one: the paired 95% bootstrap interval of the reward difference is above 0.
2. **Off-policy, on real decisions**: on the tasks of the most recent logged decisions with known
   outcomes, a doubly robust estimate over each task's trajectory (``trainer.off_policy``; exact
   for giving up, importance-weighted with the logged propensities for the recovery actions) of
   the candidate's reward is no worse than the active policy's (or the rules'): the candidate is
   refused when the 95% bootstrap interval of the difference (candidate - active, resampled by
   task) lies wholly below ``-tolerance``. This is weaker than a non-inferiority test (which
   would require the interval's *lower* bound above ``-tolerance``, and so refuse nearly every
   policy until thousands of decisions exist): with little data, or little exploration where the
   candidate differs, the interval is wide and the simulator gate decides. The estimate is
   unbiased only where the controller explored (``DAGSMITH_CORRECTION_EXPLORATION``): tasks
   logged without exploration are left out whole, and with fewer than ``min_tasks`` tasks left,
   or when more than ``max_unsupported`` of them would see the candidate (or the active policy)
   try a recovery action that was never tried there, the check is impossible and the gate fails,
   saying so — an untested policy is never activated silently. When the candidate differs from
   the logging policy in more than ``max_unsupported`` of the tasks but exploration tried its
   choice in fewer than ``min_observed`` of them, the
   estimate rests on almost nothing there (it is near zero, with an interval narrow for the wrong
   reason): the check is *inconclusive*, the simulator's verdict stands, and the report says so.
   The simulator is fitted to the same decisions the check reads (its few dozen parameters, not
   the policy, see them).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from controller.correction import FEATURE_SCHEMA_VERSION, RulesPolicy
from controller.correction.policy import Policy
from trainer.evaluate import evaluate, paired_difference_ci
from trainer.fit import feature_drift
from trainer.off_policy import off_policy
from trainer.params import SimulatorParams
from trainer.simulator import STREAM_TEST, STREAM_VALID, Simulator


@dataclass(frozen=True)
class GateConfig:
    test_episodes: int = 2000
    recent_decisions: int = 1000  # the OPE uses at most this many of the latest decisions
    min_tasks: int = 30  # ... of at least this many tasks
    max_unsupported: float = 0.05  # share of tasks where a policy may do what was never tried there
    min_observed: int = 10  # tasks where exploration tried the candidate's other choice, to judge it
    tolerance: float = 0.02  # reward units: refused if the OPE shows it worse by more than this
    n_boot: int = 2000


# Warn when a logged feature's distribution is this far (Kolmogorov-Smirnov distance) from the
# simulator's, given at least DRIFT_MIN_RECORDS first decisions (fewer say little).
DRIFT_WARN = 0.3
DRIFT_MIN_RECORDS = 30


@dataclass
class GateReport:
    passed: bool
    reason: str
    simulator: dict[str, Any] = field(default_factory=dict)
    off_policy: dict[str, Any] = field(default_factory=dict)


# Decisions the learner reads: closed, and not censored (their outcome could no longer be known).
LEARNABLE = "outcome IS NOT NULL AND NOT coalesce((outcome->>'censored')::boolean, false)"


def load_records(conn: sa.Connection, limit: int = 20_000) -> list[dict[str, Any]]:
    """Decisions with known outcomes, newest first, as the records ``SimulatorParams.fit`` and the
    off-policy estimate read. A task with a decision still open or censored is left out whole:
    its trajectory is incomplete."""
    rows = conn.execute(
        sa.text(
            f"""
            SELECT d.id, d.created_at, d.task_id, d.features, d.action, d.probability, d.behaviour, d.explored,
                   d.fallback_reason, d.policy_version, d.outcome
            FROM correction_decisions d
            WHERE {LEARNABLE} AND feature_schema_version = :schema
              AND NOT EXISTS (SELECT 1 FROM correction_decisions o
                              WHERE o.task_id = d.task_id AND NOT ({LEARNABLE}))
            ORDER BY id DESC LIMIT :limit
            """
        ),
        {"schema": FEATURE_SCHEMA_VERSION, "limit": limit},
    )
    records = []
    for r in rows:
        outcome = r.outcome or {}
        records.append(
            {
                "id": r.id,
                "at": r.created_at.isoformat(),
                "task_id": r.task_id,
                "features": r.features,
                "action": r.action,
                "probability": r.probability,
                "behaviour": list(r.behaviour) if r.behaviour is not None else None,
                "explored": r.explored,
                "fallback_reason": r.fallback_reason,
                "policy_version": r.policy_version,
                "fixed": bool(outcome.get("fixed")),
                "skipped": outcome.get("ended") == "skip",
                "task_seconds": float(outcome.get("task_seconds") or 0.0),
                "latency_added": float(outcome.get("latency_added") or 0.0),
                "inserted": int(outcome.get("inserted") or 0),
            }
        )
    return records


# Warn when more than this share of the logged decisions are on task types the simulator lacks.
UNMODELLED_WARN = 0.2


def unmodelled_types(records: list[dict[str, Any]], params: SimulatorParams) -> dict[str, Any]:
    """How many logged decisions are on task types the simulator has no profile for (the policy
    sees them only as a hashed type bucket), and the commonest of those types."""
    counts = Counter(r["features"]["task_type"] for r in records if r["features"]["task_type"] not in params.types)
    return {
        "share": sum(counts.values()) / len(records) if records else 0.0,
        "types": [name for name, _ in counts.most_common(5)],
    }


def data_window(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Which logged decisions a policy was trained on (ids and times, first and last), kept in the
    registry so a version can be traced back to its data."""
    dated = [r for r in records if "id" in r]
    if not dated:
        return None
    first = min(dated, key=lambda r: r["id"])
    last = max(dated, key=lambda r: r["id"])
    return {"first_id": first["id"], "last_id": last["id"], "from": first["at"], "to": last["at"]}


def recent_tasks(records: list[dict[str, Any]], decisions: int) -> list[dict[str, Any]]:
    """The newest ``decisions`` records (``records`` come newest first), less the task whose
    trajectory the cut would split (its first decisions fell outside)."""
    recent, older = records[:decisions], records[decisions:]
    split = {r.get("task_id") for r in older} if older else set()
    return [r for r in recent if r.get("task_id") is None or r.get("task_id") not in split]


def gate(
    candidate: Policy,
    active: Policy | None,
    params: SimulatorParams,
    records: list[dict[str, Any]],
    config: GateConfig = GateConfig(),
) -> GateReport:
    rules = RulesPolicy()
    sim = Simulator(params)
    test = sim.episodes(STREAM_TEST, 0, config.test_episodes)
    cand_rewards = evaluate(sim, test, "candidate", [candidate]).rewards
    report = GateReport(False, "")
    failures = []
    for name, other in (("rules", rules), ("active", active)):
        if other is None:
            continue
        mean, low, high = paired_difference_ci(cand_rewards, evaluate(sim, test, name, [other]).rewards)
        report.simulator[f"vs_{name}"] = {"difference": mean, "low": low, "high": high}
        if low <= 0:
            failures.append(f"on held-out simulator episodes it does not beat {name} (95% CI [{low:.3f}, {high:.3f}])")
    ope = off_policy(
        recent_tasks(records, config.recent_decisions),
        candidate,
        active or rules,
        min_tasks=config.min_tasks,
        max_unsupported=config.max_unsupported,
        min_observed=config.min_observed,
        n_boot=config.n_boot,
        weights=params.reward,
    )
    report.off_policy = ope
    if "reason" in ope:
        failures.append(f"off-policy check impossible: {ope['reason']}")
    elif "inconclusive" in ope:
        pass  # the simulator's verdict stands; the report says the real data could not tell
    elif ope["difference_high"] < -config.tolerance:
        failures.append(
            f"off-policy estimate on {ope['tasks']} logged tasks shows it worse than the active policy "
            f"({ope['candidate']:.3f} vs {ope['active']:.3f}; difference 95% CI "
            f"[{ope['difference_low']:.3f}, {ope['difference_high']:.3f}], wholly below -{config.tolerance})"
        )
    report.passed = not failures
    compared = "the rules and the active policy" if active is not None else "the rules"
    if failures:
        report.reason = "; ".join(failures)
    elif "inconclusive" in ope:
        report.reason = (
            f"beats {compared} on held-out simulator episodes; the off-policy check on {ope['tasks']} logged "
            f"tasks was inconclusive: {ope['inconclusive']}"
        )
    else:
        report.reason = (
            f"beats {compared} on held-out simulator episodes; on {ope['tasks']} logged tasks the off-policy "
            f"estimate does not show it worse (difference 95% CI [{ope['difference_low']:.3f}, "
            f"{ope['difference_high']:.3f}])"
        )
    return report


@dataclass
class Trained:
    version: str
    report: GateReport
    activated: bool
    wall_seconds: float
    records: int
    drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # trainer.fit.feature_drift


def train_and_gate(
    database_url: str,
    *,
    seeds: int = 3,
    timesteps: int | None = None,
    activate: bool = True,
    gate_config: GateConfig = GateConfig(),
    prior: SimulatorParams | None = None,
    log: Any = print,
) -> Trained:
    """Fit the simulator to the logged decisions, train one policy per seed, keep the best on the
    validation stream, register it with its gate report, and activate it if the gate passed."""
    import asyncio

    from sqlalchemy import create_engine

    from controller.correction.learned import LearnedPolicy
    from controller.db import create_engine as create_async
    from controller.policies import activate as activate_version
    from controller.policies import register
    from dagsmith.errors import Conflict
    from evaluator.reward import REWARD_VERSION
    from trainer.ppo import PPOConfig, train

    started = time.perf_counter()
    engine = create_engine(database_url)
    with engine.connect() as conn:
        records = load_records(conn)
        active_row = conn.execute(sa.text("SELECT version, weights FROM policies WHERE status = 'active'")).first()
    engine.dispose()
    base = prior or SimulatorParams()
    params = base.fit(records) if records else base
    log(f"fitted the simulator to {len(records)} logged decisions")
    drift = feature_drift(records, params) if records else {}
    for name, d in drift.items():
        if d["ks"] > DRIFT_WARN and d["logged"] >= DRIFT_MIN_RECORDS:
            log(
                f"warning: logged {name} is distributed unlike the simulator's (KS distance {d['ks']:.2f}; "
                f"logged mean {d['real_mean']:.2f}, simulated {d['simulated_mean']:.2f}): the policy "
                "learns from values the controller does not report"
            )
    unknown = unmodelled_types(records, params)
    if unknown["share"] > UNMODELLED_WARN:
        log(
            f"warning: {unknown['share']:.0%} of the logged decisions are on task types the simulator does not "
            f"model ({', '.join(unknown['types'])}): the policy reads them through the type buckets it learnt "
            "from other types (`dagsmith trainer train --from-db --params FILE` with profiles of these "
            "types gives it theirs)"
        )
    sim = Simulator(params)
    valid = sim.episodes(STREAM_VALID, 0, 500)
    best = None
    for seed in range(seeds):
        config = PPOConfig(seed=seed) if timesteps is None else PPOConfig(seed=seed, total_timesteps=timesteps)
        result = train(sim, config, valid)
        score = result.curve[-1][1] if result.curve else float("-inf")
        log(f"seed {seed}: validation reward {score:.3f} ({result.wall_seconds:.1f}s)")
        if best is None or score > best[0]:
            best = (score, seed, result)
    assert best is not None
    _, seed, result = best
    version = time.strftime("ppo-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    weights = result.checkpoint({"seed": seed, "records": len(records)})
    candidate = LearnedPolicy(weights, version)
    active = None
    if active_row is not None:
        try:
            active = LearnedPolicy(bytes(active_row.weights), active_row.version)
        except Exception as exc:
            # Controllers decide with the rules when the active version does not load, so the
            # rules are what the candidate must beat.
            log(f"warning: the active policy {active_row.version} does not load ({exc!r}); comparing with the rules")
    try:
        report = gate(candidate, active, params, records, gate_config)
    except Exception as exc:
        # The trained weights are kept (as a candidate) whatever went wrong in judging them.
        log(f"the gate could not judge {version}: {exc!r}")
        report = GateReport(False, f"the gate could not judge it: {exc!r}")
    log(f"gate {'passed' if report.passed else 'failed'}: {report.reason}")
    evaluation = {"gate": asdict(report), "validation_reward": best[0], "seed": seed}
    training = {
        "records": len(records),
        "window": data_window(records),
        "seeds": seeds,
        "timesteps": timesteps,
        "params": params.to_dict(),
        "drift": drift,
        "unmodelled_types": unknown,
    }

    async def persist() -> bool:
        db = create_async(database_url, pool_size=1, name="dagsmith-trainer")
        try:
            async with db.begin() as conn:
                await register(
                    conn,
                    version=version,
                    weights=weights,
                    feature_schema_version=FEATURE_SCHEMA_VERSION,
                    reward_version=REWARD_VERSION,
                    training=training,
                    evaluation=evaluation,
                )
            if activate and report.passed:
                try:
                    async with db.begin() as conn:
                        await activate_version(conn, version, replacing=active_row.version if active_row else None)
                except Conflict as exc:
                    log(f"not activated: {exc}")
                    return False
                return True
            return False
        finally:
            await db.dispose()

    activated = asyncio.run(persist())
    return Trained(version, report, activated, time.perf_counter() - started, len(records), drift)
