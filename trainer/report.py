"""Write a benchmark result as a markdown report and a learning-curve PNG."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

from trainer.benchmark import BACKOFF, ORACLE, PPO, PPO_RAW, RULES, TABLE, BenchmarkResult, Scenario
from trainer.evaluate import bootstrap_ci
from trainer.params import MODES

ROW_ORDER = ("always-retry", BACKOFF, RULES, TABLE, PPO_RAW, PPO, ORACLE)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores (shared)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def scenario_table(scenario: Scenario) -> list[str]:
    lines = [
        "| policy | mean reward [95% CI] | normalised | success | skipped | task-seconds | latency (s) "
        "| inserted tasks | rules fallback |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ROW_ORDER:
        e = scenario.evaluations[name]
        mean, low, high = bootstrap_ci(e.rewards)
        fallback = f"{e.fallback_rate:.1%}" if name == PPO and e.decisions else "—"
        lines.append(
            f"| {name} | {mean:.3f} [{low:.3f}, {high:.3f}] | {_number(scenario.normalised(name))} | "
            f"{e.success_rate:.1%} | {e.mean('skipped'):.1%} | {e.mean('task_seconds'):.1f} | "
            f"{e.mean('latency'):.1f} | {e.mean('inserted'):.3f} | {fallback} |"
        )
    ppo = scenario.evaluations[PPO]
    if ppo.fallbacks:
        reasons = ", ".join(f"{kind}: {n}" for kind, n in ppo.fallbacks.most_common())
        lines += ["", f"Fallback decisions by reason ({ppo.decisions} decisions over all seeds): {reasons}."]
    return lines


def _number(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def per_mode_table(scenario: Scenario) -> list[str]:
    names = (BACKOFF, RULES, TABLE, PPO, ORACLE)
    lines = ["| latent mode | episodes | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for mode in map(str, MODES):
        parts = [scenario.evaluations[n].only(mode) for n in names]
        count = len(parts[0].results[0]) if parts[0].results else 0
        if count == 0:
            continue
        cells = " | ".join(f"{p.rewards.mean():.3f}" for p in parts)
        lines.append(f"| {mode} | {count} | {cells} |")
    return lines


def markdown(result: BenchmarkResult, command: str, png_name: str) -> str:
    cfg = result.config
    import torch

    lines = [
        "# Correction policy benchmark: PPO against heuristics and an oracle",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {machine()}",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}, commit {git_commit()}",
        f"- Seeds: {cfg.seeds} training seeds; {cfg.test_episodes} held-out test episodes per scenario "
        f"(stream TEST, never trained on); the table is tuned on {cfg.table_episodes} training episodes per seed",
        f"- Machine load: 1-minute load average {os.getloadavg()[0]:.1f} when the report was written "
        "(the machine is shared with other test runs; wall times include that contention)",
        f"- Wall time: training {result.train_wall_seconds:.0f} s for {cfg.seeds} seeds "
        f"({result.train_wall_seconds / max(cfg.seeds, 1):.0f} s each); held-out-mode training "
        f"{result.holdout_train_wall_seconds:.0f} s; whole benchmark {result.total_seconds:.0f} s",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {t.name} | {t.goal} | {t.value} | {'yes' if t.met else 'NO'} |" for t in result.targets]
    lines += [
        "",
        "Rewards are per failed task (episode), see the reward formula below; intervals are 95% two-way bootstrap "
        "intervals over training seeds and episodes. Normalised: 0 = exponential backoff, 1 = oracle. "
        f"`{PPO}` is the policy as the controller runs it (`LearnedPolicy`, confidence threshold "
        f"{cfg.confidence_threshold}, rules for unknown error classes); `{PPO_RAW}` is the masked argmax of the "
        "same networks with no fallback. Differences are paired (same episodes, same training seed).",
        "",
    ]
    lines += [*reading(result), ""]
    for scenario in result.scenarios:
        lines += [f"## {scenario.title}", "", *scenario_table(scenario), ""]
        if scenario is result.scenarios[0]:
            lines += ["Mean reward by latent mode (the controller never sees the mode):", ""]
            lines += [*per_mode_table(scenario), ""]
    lines += [
        "## Learning curves",
        "",
        f"![learning curves]({png_name})",
        "",
        f"Greedy (masked argmax) reward on {cfg.valid_episodes} validation episodes (stream VALID) during training, "
        "per seed, from the untrained network (0 decisions) on; horizontal lines are the baselines on the same "
        "episodes.",
        "",
        "## Training diagnostics (last update of each seed)",
        "",
        "| run | seed | wall (s) | final valid reward | approx KL | clip fraction | explained variance | entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in (("main", result.runs), (f"without {cfg.holdout_mode}", result.holdout_runs)):
        for run in runs:
            h = run.history[-1]
            score = run.curve[-1][1] if run.curve else float("nan")
            lines.append(
                f"| {label} | {run.config.seed} | {run.wall_seconds:.1f} | {score:.3f} | {h['approx_kl']:.4f} | "
                f"{h['clipfrac']:.3f} | {h['explained_variance']:.2f} | {h['entropy']:.3f} |"
            )
    ppo = asdict(cfg.ppo)
    ppo.pop("seed")
    lines += [
        "",
        "## Setup",
        "",
        "PPO hyperparameters (`trainer/ppo.py`, `PPOConfig`): " + ", ".join(f"{k}={v}" for k, v in ppo.items()) + ".",
        "",
        "Simulator (`trainer/params.py`, `trainer/simulator.py`): one episode is one failed task, corrected until "
        f"it is fixed, skipped or given up. Mode mix: {_mix(result.params.mix)}. Held-out mode: "
        f"`{cfg.holdout_mode}`. Shifted mix: {_mix(result.params.shifted().mix)}.",
        "",
        f"Reward of an episode: `{result.params.reward.formula()}` (a given-up task earns "
        f"{result.params.reward.failed:g} plus its costs).",
        "",
        *why_table_loses(result),
        "",
    ]
    return "\n".join(lines)


def reading(result: BenchmarkResult) -> list[str]:
    """What the numbers do and do not show, worded from the numbers themselves."""
    main, shifted, holdout, only = result.scenarios
    mode = result.config.holdout_mode
    close = [
        m
        for m in map(str, MODES)
        if main.evaluations[PPO].only(m).results[0]
        and main.evaluations[ORACLE].only(m).rewards.mean() - main.evaluations[PPO].only(m).rewards.mean() < 0.03
    ]
    gains = {
        m: main.evaluations[PPO].only(m).rewards.mean() - main.evaluations[TABLE].only(m).rewards.mean()
        for m in map(str, MODES)
        if main.evaluations[PPO].only(m).results[0]
    }
    biggest = sorted(gains, key=gains.__getitem__, reverse=True)[:3]

    def versus(s: Scenario, what: str) -> str:
        a, b = s.reward(PPO), s.reward(TABLE)
        return f"{'above' if a > b else 'not above'} the tuned table {what} ({a:.3f} vs {b:.3f})"

    unknown = holdout.evaluations[PPO].fallbacks.get("unknown_error_class", 0)
    backoff_note = (
        f"; it stays below plain exponential backoff there ({only.reward(BACKOFF):.3f}): a mode never seen in "
        "training is handled like the nearest known one, not well"
        if only.reward(PPO) < only.reward(BACKOFF)
        else ""
    )
    return [
        "## Reading the results",
        "",
        f"- The learned policy gets {main.normalised(PPO):.2f} of the way from exponential backoff to the oracle; "
        f"the tuned table, the best a policy keyed on error class and attempt found, gets "
        f"{main.normalised(TABLE):.2f}. By latent mode (table below), its largest gains over the table are on "
        f"{', '.join(biggest)}; it is within 0.03 of the oracle on {', '.join(close) or 'no mode'}.",
        f"- The rules are a weak baseline in this simulator ({main.normalised(RULES):.2f} normalised): they treat "
        "`unknown` as a blip, and here `unknown` is the most common class of every mode, so `not below rules` is a "
        f"low bar. The learned policy is {versus(shifted, 'on the shifted mix')} and "
        f"{versus(holdout, f'with `{mode}` held out')}.",
        f"- On the held-out mode's own episodes: {only.reward(PPO_RAW):.3f} without the fallback, "
        f"{only.reward(PPO):.3f} with it; {unknown} decisions in the held-out scenario went to the rules because "
        f"their error class never occurred in training (only a mode with error classes of its own triggers that)"
        f"{backoff_note}.",
        "- These are simulator results. They show that the trainer finds and uses signal in the failure context "
        "when it is there; how much of it is there in production is a question for the fitted simulator "
        "(`--records`) and the closed-loop experiment on the real stack.",
    ]


def _mix(mix: dict[str, float]) -> str:
    return ", ".join(f"{m} {w:.2f}" for m, w in mix.items())


def why_table_loses(result: BenchmarkResult) -> list[str]:
    p = result.params
    unknown = min(p.error_given_mode[m].get("unknown", 0.0) for m in p.mix)
    left = p.surgeries_left_choices
    return [
        "Why a table keyed on error class and attempt cannot match a context-aware policy: every latent mode "
        f"reports `unknown` at least {unknown:.0%} of the time and the other classes are shared between modes (a "
        "`timeout` comes from a transient blip, a degraded executor or an oversized task), while the fix differs by "
        "mode (retry, reroute, tuned retry). The context tells the modes apart — executor failure rate, upstream "
        "reward, how long the attempt ran, the task type, which actions were already tried — and the surgery budget "
        f"left for the failing task is small ({min(left)} to {max(left)}), so trying actions one by one, which is all "
        "a table can do, runs out of budget and costs task-seconds. The oracle knows the mode and plays the optimal "
        "policy for it (an exact dynamic programme); it is an upper bound in expectation because, given the mode, "
        "nothing else a policy observes predicts the outcomes.",
    ]


def plot_curves(result: BenchmarkResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    holdout_title = f"Trained and validated without `{result.config.holdout_mode}`"
    panels = (
        (axes[0], result.runs, "Default mix", result.valid_baselines["main"]),
        (axes[1], result.holdout_runs, holdout_title, result.valid_baselines["holdout"]),
    )
    styles = {ORACLE: ("black", "--"), TABLE: ("tab:red", ":"), RULES: ("tab:green", "-."), BACKOFF: ("gray", "--")}
    for ax, runs, title, baselines in panels:
        for run in runs:
            steps, scores = zip(*run.curve, strict=True) if run.curve else ((), ())
            ax.plot(steps, scores, lw=1.2, alpha=0.8, marker=".", label=f"PPO seed {run.config.seed}")
        right = max((run.curve[-1][0] for run in runs if run.curve), default=1)
        for name, value in baselines.items():
            color, linestyle = styles[name]
            ax.axhline(value, color=color, linestyle=linestyle, lw=1)
            ax.text(right, value, f"{name} {value:.3f}", va="bottom", ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("decisions sampled")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean validation reward (greedy)")
    axes[0].legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: BenchmarkResult, out_dir: Path, command: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "ppo_benchmark.md", out_dir / "ppo_learning_curves.png"
    plot_curves(result, png)
    md.write_text(markdown(result, command, png.name))
    return md, png
