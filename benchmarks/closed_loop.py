"""The closed loop on the real stack: rules → logged decisions → trained policy → better recovery.

    python -m benchmarks.closed_loop [--workflows 120] [--seeds 3] [--timesteps 60000]

1. A batch of lab workflows (``trainer.lab``: real tasks whose failures follow the simulator's
   latent modes) runs under the ``rules`` policy; every decision and outcome is logged.
2. ``trainer.loop.train_and_gate`` fits the simulator to those logs, trains PPO, runs the gate
   (held-out simulator episodes + an off-policy estimate on the logged decisions) and activates
   the version if it passes. The controller picks it up live.
3. The same batch — the same tasks with the same luck — runs again under ``learned``.

The report (``project_logs/experiments/closed_loop.md``) compares the two batches pairwise:
mean workflow reward (the evaluator's rewards, summed per workflow), success rate, attempts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.harness import Bench, installation, machine

ROOT = Path(__file__).resolve().parents[1]
NOTES = "## Reading the results"


def run_batch(bench: Bench, docs: list[dict[str, Any]], timeout: float = 600) -> list[dict[str, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(bench.submit, docs))
    bench.wait_all(ids, timeout=timeout, require_success=False)
    with bench.pg() as conn:
        rows = conn.execute(
            """
            SELECT w.id, w.name, w.status, w.total_reward, w.surgeries,
                   (SELECT sum(attempt) FROM tasks t WHERE t.workflow_id = w.id) AS attempts
            FROM workflows w WHERE w.id = ANY(%s::uuid[])
            """,
            (ids,),
        ).fetchall()
        actions = conn.execute(
            "SELECT action, count(*) FROM correction_decisions WHERE workflow_id = ANY(%s::uuid[]) GROUP BY 1",
            (ids,),
        ).fetchall()
    by_name = {r[1]: r for r in rows}
    out = []
    for doc in docs:
        r = by_name[doc["metadata"]["name"]]
        out.append(
            {
                "name": r[1],
                "status": r[2],
                "reward": float(r[3]),
                "surgeries": r[4],
                "attempts": int(r[5] or 0),
                "mode": doc["spec"]["tasks"][0]["params"]["mode"],
            }
        )
    return [*out, {"actions": dict(actions)}]


def summary(batch: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for r in batch if "reward" in r]
    return {
        "workflows": len(rows),
        "mean_reward": statistics.fmean(r["reward"] for r in rows),
        "success_rate": sum(r["status"] == "succeeded" for r in rows) / len(rows),
        "mean_attempts": statistics.fmean(r["attempts"] for r in rows),
        "mean_surgeries": statistics.fmean(r["surgeries"] for r in rows),
        "actions": batch[-1]["actions"],
    }


def paired_ci(a: list[float], b: list[float], n_boot: int = 5000) -> tuple[float, float, float]:
    d = np.array(b) - np.array(a)
    rng = np.random.default_rng(0)
    means = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(n_boot)]
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


FRESH_SEED_OFFSET = 1000  # the fresh batches' workflows: seed + this


def differences(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """Paired (per workflow) differences b − a in reward and success, with 95% intervals."""
    return {
        "reward_difference": paired_ci([r["reward"] for r in a], [r["reward"] for r in b]),
        "success_difference": paired_ci(
            [float(r["status"] == "succeeded") for r in a], [float(r["status"] == "succeeded") for r in b]
        ),
    }


def experiment(workflows: int, seed: int, seeds: int, timesteps: int | None, log: Any = print) -> dict[str, Any]:
    from trainer.lab import lab_params, lab_workflows
    from trainer.loop import train_and_gate

    with installation(executors=1, concurrency=64) as bench:
        bench.stack.start_executor("lab", "chaos.lab.*", "--module", "trainer.lab")
        bench.stack.wait_executors(2)
        started = time.time()
        log(f"batch A: {workflows} lab workflows under the rules")
        before = run_batch(bench, lab_workflows(workflows, seed, "rules"))
        log(f"  {summary(before)}")
        log("training from the logged decisions")
        trained = train_and_gate(
            bench.settings.database_url.get_secret_value(),
            seeds=seeds,
            timesteps=timesteps,
            prior=lab_params(),
            log=lambda line: log(f"  {line}"),
        )
        result: dict[str, Any] = {
            "version": trained.version,
            "gate": {
                "passed": trained.report.passed,
                "reason": trained.report.reason,
                "simulator": trained.report.simulator,
                "off_policy": trained.report.off_policy,
            },
            "activated": trained.activated,
            "exploration": bench.settings.correction_exploration,
            "records": trained.records,
            "training_seconds": trained.wall_seconds,
            "drift": trained.drift,
            "rules": summary(before),
        }
        if not trained.activated:
            log("the gate refused the policy: no learned batch")
            return result
        log(f"batch B: the same {workflows} workflows under the learned policy {trained.version}")
        after = run_batch(bench, lab_workflows(workflows, seed, "learned"))
        rows_a = [r for r in before if "reward" in r]
        rows_b = [r for r in after if "reward" in r]
        result["learned"] = summary(after)
        result.update(differences(rows_a, rows_b))
        # Batch B replays the failures the policy was trained from. Fresh workflows, which neither
        # policy has seen, run under both (paired again): the out-of-sample comparison.
        fresh = seed + FRESH_SEED_OFFSET
        log(f"batches C and D: {workflows} fresh workflows (seed {fresh}) under the rules, then the learned policy")
        fresh_rules = run_batch(bench, lab_workflows(workflows, fresh, "rules"))
        fresh_learned = run_batch(bench, lab_workflows(workflows, fresh, "learned"))
        result["fresh"] = {
            "seed": fresh,
            "rules": summary(fresh_rules),
            "learned": summary(fresh_learned),
            **differences([r for r in fresh_rules if "reward" in r], [r for r in fresh_learned if "reward" in r]),
        }
        by_mode: dict[str, Any] = {}
        for mode in sorted({r["mode"] for r in rows_a}):
            a = [r for r in rows_a if r["mode"] == mode]
            b = [r for r in rows_b if r["mode"] == mode]
            by_mode[mode] = {
                "n": len(a),
                "rules_reward": statistics.fmean(r["reward"] for r in a),
                "learned_reward": statistics.fmean(r["reward"] for r in b),
                "rules_success": sum(r["status"] == "succeeded" for r in a) / len(a),
                "learned_success": sum(r["status"] == "succeeded" for r in b) / len(b),
            }
        result["by_mode"] = by_mode
        result["wall_seconds"] = time.time() - started
        return result


BATCH_HEADER = (
    "| batch | workflows | mean workflow reward | success rate | attempts / workflow | surgeries / workflow |",
    "|---|---|---|---|---|---|",
)


def write_report(result: dict[str, Any], command: str) -> Path:
    m = machine()
    out = ROOT / "project_logs" / "experiments"
    out.mkdir(parents=True, exist_ok=True)
    (out / "closed_loop.json").write_bytes(
        orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    lines = [
        "# Closed loop on the real stack",
        "",
        f"Measured {m['date']} with `{command}` on {m['cpu']} ({m['cores']} cores), Postgres {m['postgres']}, "
        f"RabbitMQ {m['rabbitmq']}. Raw figures: `closed_loop.json`.",
        "",
        "Lab workflows (one task each, failures following the simulator's latent modes; see `trainer/lab.py`) ran",
        "on the real API, controller, evaluator and executors. Batch A ran under the `rules` policy; the trainer",
        "fitted the simulator to batch A's logged decisions, trained PPO, ran the gate and activated the version;",
        "batch B — the same tasks with the same luck — ran under `learned`. Then fresh workflows, which",
        "neither policy had seen (batches C and D, another seed), ran under each. Differences are paired per",
        "workflow (95% bootstrap intervals).",
        "",
        f"Policy `{result['version']}`: gate {'passed' if result['gate']['passed'] else 'FAILED'} — "
        f"{result['gate']['reason']}; trained on {result['records']} logged decisions in "
        f"{result['training_seconds']:.0f} s.",
        "",
        f"The controller explored with `DAGSMITH_CORRECTION_EXPLORATION={result.get('exploration')}`: "
        f"{result['gate']['off_policy'].get('explored', 0)} of the {result['gate']['off_policy'].get('decisions', 0)} "
        "decisions the gate's off-policy check read were exploration's draws, uniform over the valid recovery "
        "actions (the policy's own choice among them; in both batches alike).",
        "",
    ]
    if result.get("drift"):
        lines += [
            "What the policy saw in batch A's first decisions against what it trained on (the fitted",
            "simulator), per feature (`trainer.fit.feature_drift`):",
            "",
            "| feature | logged mean | logged range | simulated mean | simulated range | KS distance |",
            "|---|---|---|---|---|---|",
        ]
        for name, d in result["drift"].items():
            (rl, rh), (sl, sh) = d["real_range"], d["simulated_range"]
            lines.append(
                f"| {name} | {d['real_mean']:.2f} | {rl:.2f}–{rh:.2f} | {d['simulated_mean']:.2f} | "
                f"{sl:.2f}–{sh:.2f} | {d['ks']:.2f} |"
            )
        lines.append("")
    if "learned" in result:
        a, b = result["rules"], result["learned"]
        rd, sd = result["reward_difference"], result["success_difference"]
        lines += [
            *BATCH_HEADER,
            f"| A: rules | {a['workflows']} | {a['mean_reward']:.3f} | {a['success_rate']:.1%} | "
            f"{a['mean_attempts']:.2f} | {a['mean_surgeries']:.2f} |",
            f"| B: learned | {b['workflows']} | {b['mean_reward']:.3f} | {b['success_rate']:.1%} | "
            f"{b['mean_attempts']:.2f} | {b['mean_surgeries']:.2f} |",
            "",
            f"Reward difference (B − A): {rd[0]:+.3f} [{rd[1]:+.3f}, {rd[2]:+.3f}]; "
            f"success difference: {sd[0]:+.1%} [{sd[1]:+.1%}, {sd[2]:+.1%}].",
            "",
        ]
        if "fresh" in result:
            f = result["fresh"]
            c, d = f["rules"], f["learned"]
            frd, fsd = f["reward_difference"], f["success_difference"]
            lines += [
                f"Fresh workflows (seed {f['seed']}):",
                "",
                *BATCH_HEADER,
                f"| C: rules | {c['workflows']} | {c['mean_reward']:.3f} | {c['success_rate']:.1%} | "
                f"{c['mean_attempts']:.2f} | {c['mean_surgeries']:.2f} |",
                f"| D: learned | {d['workflows']} | {d['mean_reward']:.3f} | {d['success_rate']:.1%} | "
                f"{d['mean_attempts']:.2f} | {d['mean_surgeries']:.2f} |",
                "",
                f"Reward difference (D − C): {frd[0]:+.3f} [{frd[1]:+.3f}, {frd[2]:+.3f}]; "
                f"success difference: {fsd[0]:+.1%} [{fsd[1]:+.1%}, {fsd[2]:+.1%}].",
                "",
            ]
        lines += [
            "Batches A and B by latent mode:",
            "",
            "| latent mode | n | rules reward | learned reward | rules success | learned success |",
            "|---|---|---|---|---|---|",
        ]
        for mode, v in result["by_mode"].items():
            lines.append(
                f"| {mode} | {v['n']} | {v['rules_reward']:.2f} | {v['learned_reward']:.2f} | "
                f"{v['rules_success']:.0%} | {v['learned_success']:.0%} |"
            )
        lines += [
            "",
            f"Actions under the rules: {a['actions']}",
            "",
            f"Actions under the learned policy: {b['actions']}",
        ]
    path = out / "closed_loop.md"
    # The reading of the results is written by hand below the figures: keep it across runs.
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES) :] if NOTES in old else ""
    path.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.closed_loop", description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=int, default=120)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--seeds", type=int, default=3, help="PPO training seeds")
    parser.add_argument("--timesteps", type=int, default=None, help="decisions per training seed")
    args = parser.parse_args(argv)
    result = experiment(args.workflows, args.seed, args.seeds, args.timesteps, log=lambda s: print(s, file=sys.stderr))
    command = "python -m benchmarks.closed_loop " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"report: {write_report(result, command.strip())}", file=sys.stderr)


if __name__ == "__main__":
    main()
