"""Run the benchmark suite and write its report.

    python -m benchmarks                     # every scenario, 3 repeats, report to project_logs/
    python -m benchmarks throughput hop      # some scenarios
    python -m benchmarks --quick             # smaller sizes, 1 repeat (a smoke run)

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
from benchmarks.harness import bench_settings, installation, machine

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = ["throughput", "hop", "wide", "big", "scale", "idle"]


def run(name: str, repeat: int, quick: bool) -> dict[str, Any]:
    print(f"== {name}", file=sys.stderr, flush=True)
    results: dict[str, Any] = {}
    if name == "throughput":
        n = 1000 if quick else 5000
        with installation() as bench:
            scenarios.throughput_one(bench, 200)  # warm-up: queues declared, connections open
            results["one_workflow"] = scenarios.summarize([scenarios.throughput_one(bench, n) for _ in range(repeat)])
            results["100_workflows"] = scenarios.summarize(
                [scenarios.throughput_spread(bench, 100, n // 100) for _ in range(repeat)]
            )
    elif name == "hop":
        with installation() as bench:
            scenarios.hop_latency(bench, 20)
            results["chain"] = scenarios.summarize([scenarios.hop_latency(bench, 200) for _ in range(repeat)])
    elif name == "wide":
        layers, width = (5, 100) if quick else (10, 500)
        with installation() as bench:
            results["layers"] = scenarios.summarize([scenarios.wide(bench, layers, width) for _ in range(repeat)])
    elif name == "big":
        sizes = [2_000] if quick else [10_000, 50_000]
        with installation() as bench:
            for n in sizes:
                results[f"{n}_tasks"] = scenarios.summarize([scenarios.big_submission(bench, n) for _ in range(repeat)])
    elif name == "scale":
        points = [1, 10, 100] if quick else [1, 10, 100, 1000]
        with installation() as bench:
            scenarios.scale_point(bench, 5)
            for w in points:
                results[f"{w}_workflows"] = scenarios.summarize(
                    [scenarios.scale_point(bench, w) for _ in range(repeat)]
                )
    elif name == "idle":
        workflows = 100 if quick else 1000
        with installation(executors=2, concurrency=workflows) as bench:
            results["waiting"] = scenarios.summarize(
                [scenarios.idle_cost(bench, workflows, 10 if quick else 30) for _ in range(repeat)]
            )
    else:
        raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode(), file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", default=SCENARIOS, help=f"any of {', '.join(SCENARIOS)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median and p95 reported)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--out", type=Path, default=ROOT / "project_logs", help="where the report goes")
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat
    started = time.time()
    results = {name: run(name, repeat, args.quick) for name in args.scenarios}
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "machine": machine(),
        "command": command.strip(),
        "repeat": repeat,
        "quick": args.quick,
        "duration_s": round(time.time() - started, 1),
        # What the services ran with (defaults, and what the harness sets: benchmarks/harness.py).
        "settings": bench_settings(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "benchmarks" / f"results-{meta['machine']['date']}{'-quick' if args.quick else ''}.json"
    raw.parent.mkdir(exist_ok=True)
    raw.write_bytes(orjson.dumps({"meta": meta, "results": results}, option=orjson.OPT_INDENT_2))
    print(f"raw results: {raw}", file=sys.stderr)
    if not args.quick:
        report.write(args.out, meta, results)


if __name__ == "__main__":
    main()
