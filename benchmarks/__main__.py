"""Run the benchmark suite and write its report.

    python -m benchmarks                     # every scenario, 3 repeats, report to project_logs/
    python -m benchmarks throughput hop      # some scenarios (merged into the report's others)
    python -m benchmarks --quick             # smaller sizes, 1 repeat (a smoke run; no report)

Each scenario runs on a fresh installation (its own database, queue prefix and processes):
API, controller, evaluator and 2 executor processes, on this machine's Postgres and RabbitMQ.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from benchmarks import report, scenarios
from benchmarks.harness import (
    Bench,
    build,
    durability_warnings,
    installation,
    machine,
    postgres_durability,
    settings_record,
)

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = scenarios.NAMES

# What runs before each scenario's measured runs, on the same installation (the report lists it):
# the first use of a queue, connection or code path costs more than the rest, and is not the system's
# steady state.
WARMUPS = {
    "throughput": "one workflow of 200 no-op tasks",
    "hop": "one 20-task chain",
    "wide": "one 2-layer × 20-task DAG with full fan-in",
    "big": "one 200-task workflow through the same path (peak memory is reset before each measured run)",
    "scale": "5 gated 5-task chains (the gate executor started and stopped once)",
    "idle": "10 workflows of one 0.2 s sleep task each, run to the end",
}


def idle_workflows(quick: bool) -> int:
    return 100 if quick else 1000


def measure(name: str, bench: Bench, repeat: int, quick: bool) -> dict[str, Any]:
    """Warm the installation up, then the scenario's measured runs, summarised."""
    results: dict[str, Any] = {}
    if name == "throughput":
        n = 1000 if quick else 5000
        scenarios.throughput_one(bench, 200)
        results["one_workflow"] = scenarios.summarize([scenarios.throughput_one(bench, n) for _ in range(repeat)])
        results["100_workflows"] = scenarios.summarize(
            [scenarios.throughput_spread(bench, 100, n // 100) for _ in range(repeat)]
        )
    elif name == "hop":
        scenarios.hop_latency(bench, 20)
        results["chain"] = scenarios.summarize([scenarios.hop_latency(bench, 200) for _ in range(repeat)])
    elif name == "wide":
        layers, width = (5, 100) if quick else (10, 500)
        scenarios.wide(bench, 2, 20)
        results["layers"] = scenarios.summarize([scenarios.wide(bench, layers, width) for _ in range(repeat)])
    elif name == "big":
        scenarios.big_submission(bench, 200)
        for n in [2_000] if quick else [10_000, 50_000]:
            results[f"{n}_tasks"] = scenarios.summarize([scenarios.big_submission(bench, n) for _ in range(repeat)])
    elif name == "scale":
        scenarios.scale_point(bench, 5)
        for w in [1, 10, 100] if quick else [1, 10, 100, 1000]:
            results[f"{w}_workflows"] = scenarios.summarize([scenarios.scale_point(bench, w) for _ in range(repeat)])
    elif name == "idle":
        scenarios.warm_sleep(bench)
        results["waiting"] = scenarios.summarize(
            [scenarios.idle_cost(bench, idle_workflows(quick), 10 if quick else 30) for _ in range(repeat)]
        )
    return results


def run(name: str, repeat: int, quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """One scenario on its own installation: its figures, and the settings it ran with."""
    print(f"== {name}", file=sys.stderr, flush=True)
    # Idle's executors must hold every waiting task at once.
    concurrency = idle_workflows(quick) if name == "idle" else 64
    with installation(executors=2, concurrency=concurrency) as bench:
        results = measure(name, bench, repeat, quick)
        settings = settings_record(bench.stack.settings)
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode(), file=sys.stderr, flush=True)
    return results, settings


def warn(lines: list[str]) -> None:
    for line in lines:
        print(f"!!! WARNING: {line} !!!", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", default=SCENARIOS, help=f"any of {', '.join(SCENARIOS)}")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per figure (median and max reported; latencies pooled)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "project_logs", help="where the report goes")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    repeat = 1 if args.quick else args.repeat
    started = time.time()
    durability = postgres_durability()
    warnings = durability_warnings(durability)
    warn(warnings)
    outcomes = {name: run(name, repeat, args.quick) for name in args.scenarios}
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "machine": machine(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "build": build(),
        "postgres_durability": durability,
        "warnings": warnings,
        "command": command.strip(),
        "repeat": repeat,
        "quick": args.quick,
        "duration_s": round(time.time() - started, 1),
        # What each scenario's services actually ran with, and the defaults of what differs.
        "settings": {name: settings for name, (_, settings) in outcomes.items()},
        "warmups": {name: WARMUPS[name] for name in args.scenarios},
    }
    results = {name: figures for name, (figures, _) in outcomes.items()}
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(started))
    raw = args.out / "benchmarks" / f"results-{stamp}{'-quick' if args.quick else ''}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_bytes(orjson.dumps({"meta": meta, "results": results}, option=orjson.OPT_INDENT_2))
    print(f"raw results: {raw}", file=sys.stderr)
    if not args.quick:
        print(f"report: {report.write(args.out)}", file=sys.stderr)
    warn(warnings)  # again, where the end of the output is read


if __name__ == "__main__":
    main()
