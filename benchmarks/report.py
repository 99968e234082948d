"""Figures → project_logs/benchmarks.md (the measured section) and the scale-curve plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return f"{_fmt(value['median'])} (p95 {_fmt(value['p95'])})"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def tables(results: dict[str, Any]) -> str:
    out = []
    for scenario, variants in results.items():
        out.append(f"### {scenario}\n")
        for variant, figures in variants.items():
            out.append(f"**{variant.replace('_', ' ')}** ({figures.get('runs', 1)} runs; median, p95 in brackets)\n")
            out.append("| figure | value |\n|---|---|")
            out.extend(f"| {k} | {_fmt(v)} |" for k, v in figures.items() if k != "runs")
            out.append("")
    return "\n".join(out)


def plot_scale(results: dict[str, Any], path: Path) -> bool:
    scale = results.get("scale")
    if not scale:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = sorted((v["workflows"]["median"], v) for v in scale.values())
    x = [p[0] for p in points]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(x, [p[1]["tasks_per_s"]["median"] for p in points], "o-", color="tab:blue", label="tasks/s")
    left.set_xscale("log")
    left.set_xlabel("concurrent workflows (5-task chains)")
    left.set_ylabel("throughput (tasks/s)", color="tab:blue")
    right = left.twinx()
    right.plot(x, [p[1]["workflow_p50_ms"]["median"] for p in points], "s--", color="tab:red", label="p50")
    right.plot(x, [p[1]["workflow_p95_ms"]["median"] for p in points], "^--", color="tab:orange", label="p95")
    right.set_yscale("log")
    right.set_ylabel("workflow latency (ms)", color="tab:red")
    right.legend(loc="upper left")
    fig.suptitle("Dagsmith scale curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out: Path, meta: dict[str, Any], results: dict[str, Any]) -> None:
    m = meta["machine"]
    body = [
        f"Measured {m['date']} with `{meta['command']}` ({meta['repeat']} repeats, {meta['duration_s']} s in all).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; Python {m['python']}; "
        f"Postgres {m['postgres']}; RabbitMQ {m['rabbitmq']}; Linux {m['kernel']}. Everything — Postgres, "
        "RabbitMQ, API, controller, evaluator, 2 executor processes and the load generator — shares these cores.",
        "",
        tables(results),
    ]
    if plot_scale(results, out / "benchmarks-scale.png"):
        body.append("![scale curve](benchmarks-scale.png)\n")
    text = "\n".join(body)
    report = out / "benchmarks.md"
    if report.exists() and START in report.read_text():
        old = report.read_text()
        report.write_text(old[: old.index(START) + len(START)] + "\n" + text + "\n" + old[old.index(END) :])
    else:
        report.write_text(f"# Benchmarks\n\n{START}\n{text}\n{END}\n")
