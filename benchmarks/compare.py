"""Compare two builds on one scenario, with their runs interleaved.

    python -m benchmarks.compare BEFORE AFTER                       # throughput, 3 pairs
    python -m benchmarks.compare 320003e HEAD --scenario hop --pairs 4

This machine's speed drifts by tens of percent over minutes, so a figure from one build measured
now and one from another measured later says little. Here each build is checked out (a detached
git worktree) and the two are run alternately, several times, on a fresh installation each run,
with the Python of this environment; the medians and ranges are printed side by side. The order
alternates too (before then after, then after then before, ...), so neither build always runs
second, into whatever the first left behind; each pair says which ran first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.scenarios import pct

ROOT = Path(__file__).resolve().parents[1]

# Run in each build's own tree: only its benchmarks package is used (both builds must have it).
SCENARIOS = {
    "throughput": (
        "scenarios.throughput_one(bench, 500)",
        "scenarios.throughput_one(bench, 5000)",
        [
            "tasks_per_s",
            "cpu_ms_per_task_all",
            "cpu_ms_per_task_controller",
            "cpu_ms_per_task_executors",
            "cpu_ms_per_task_rabbitmq",  # the whole broker (server-wide)
            "cpu_ms_per_task_postgres_backends",  # the run's own database (older builds: all of Postgres)
            "cpu_ms_per_task_postgres",
            "cores_busy",
        ],
    ),
    "hop": ("scenarios.hop_latency(bench, 20)", "scenarios.hop_latency(bench, 200)", ["hop_p50_ms", "hop_p95_ms"]),
}

CHILD = """
import json
from benchmarks import scenarios
from benchmarks.harness import installation
with installation() as bench:
    {warm}
    for _ in range({runs}):
        print("FIGURES " + json.dumps({measure}), flush=True)
"""


def run_build(tree: Path, scenario: str, runs: int) -> list[dict[str, Any]]:
    warm, measure, _ = SCENARIOS[scenario]
    code = CHILD.format(warm=warm, measure=measure, runs=runs)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    figures = [json.loads(line[8:]) for line in out.stdout.splitlines() if line.startswith("FIGURES ")]
    if out.returncode != 0 or not figures:
        raise SystemExit(f"the run in {tree} failed:\n{out.stderr[-3000:]}")
    return figures


def per_run(figures: dict[str, Any]) -> dict[str, Any]:
    """One run's figures, with a chain's hop percentiles computed from its raw hops where the
    build records those (older builds report the percentiles themselves)."""
    hops = figures.get("samples", {}).get("hop_ms")
    if hops:
        figures = {**figures, "hop_p50_ms": pct(hops, 50), "hop_p95_ms": pct(hops, 95)}
    return figures


def order(pair: int) -> list[str]:
    """Before first in odd pairs, after first in even ones."""
    return ["before", "after"] if pair % 2 else ["after", "before"]


def cell(runs: list[dict[str, Any]], key: str) -> str:
    values = [f[key] for f in runs if key in f]
    if not values:
        return "n/a (not measured by this build)"
    return f"{_fmt(statistics.median(values))} ({_fmt(min(values))}-{_fmt(max(values))})"


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n")[0])
    parser.add_argument("before", help="a git revision")
    parser.add_argument("after", help="a git revision")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="throughput")
    parser.add_argument("--pairs", type=int, default=3, help="alternations of the two builds")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per build per pair")
    args = parser.parse_args(argv)
    keys = SCENARIOS[args.scenario][2]
    with tempfile.TemporaryDirectory(prefix="dagsmith-compare-") as tmp:
        trees: dict[str, Path] = {}
        try:
            for label, rev in (("before", args.before), ("after", args.after)):
                trees[label] = Path(tmp) / label
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(trees[label]), rev],
                    check=True,
                    capture_output=True,
                )
            results: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
            for pair in range(1, args.pairs + 1):
                for label in order(pair):
                    figures = [per_run(f) for f in run_build(trees[label], args.scenario, args.runs)]
                    results[label] += figures
                    shown = ", ".join(f"{f[keys[0]]:,.1f}" for f in figures)
                    print(
                        f"pair {pair} ({order(pair)[0]} first) {label:6} {keys[0]}: {shown}",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    first = ", ".join(f"{pair}: {order(pair)[0]}" for pair in range(1, args.pairs + 1))
    print(f"\n{args.scenario}: {args.pairs} pairs x {args.runs} runs; median of the runs' figures (min-max)")
    print(f"Which build ran first in each pair: {first}.\n")
    print(f"| figure | before ({args.before}) | after ({args.after}) |\n|---|---|---|")
    for key in keys:
        print(f"| {key} | {cell(results['before'], key)} | {cell(results['after'], key)} |")


if __name__ == "__main__":
    main()
