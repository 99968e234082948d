"""Raw results → project_logs/benchmarks.md (the measured section) and the scale-curve plot.

The section is rebuilt from the full runs' raw files in ``benchmarks/``: each scenario from the
newest run that measured it. So a run of some scenarios replaces those and keeps the others, and
every scenario says which run, build and settings its figures come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.scenarios import NAMES

START, END = "<!-- measured:start -->", "<!-- measured:end -->"
PER_RUN = ("database_url", "amqp_prefix", "admin_token")  # differ from the defaults in every run

NOTES = """\
How to read the figures:

- **Statistics.** A figure measured once per run shows the median over the runs and the largest
  ("max of N"); a p95 appears only from 20 runs on, as below that it would be the largest again.
  Latencies (`hop_ms`, `workflow_ms`) pool every sample of every run, then take p50, p95 (from 20
  samples on) and max over all of them.
- **Workflows at once.** The 100-workflow throughput and the scale points submit every workflow
  first, each beginning with a gate task of a type no benchmark executor takes; once all are
  accepted and their gates queued, an executor for the gate type starts (a third executor process,
  running only the gate tasks) and releases them together.
  `wall_s`, `tasks_per_s` and `workflow_ms` are timed from the first gate task's start (database
  timestamps), the gate tasks included; `release_s` is how long releasing all of them took, and
  `peak_in_flight` the most workflows between their gate's start and their end at one moment — the
  concurrency actually reached. `submit_s` (the API accepting them, before the release) is apart.
- **CPU per task.** `postgres_backends` is the Postgres backends connected to the run's own
  database (from `pg_stat_activity`; a backend that disconnected during the run is missed).
  `postgres_background` — checkpointer, WAL writer, background writer, autovacuum — is server-wide,
  serving every database on it, so it is listed apart and left out of `all` and `cores_busy`.
  `rabbitmq` is the whole broker, server-wide too: it is this run's cost only on an otherwise idle
  broker, which a shared one is not.
- **Memory.** `*_peak_rss_mib` is the process's peak resident memory (VmHWM), reset before each run
  and read after the run has finished; the growth is that peak less the resident memory before the
  run. Runs share the processes, so a later run reuses memory an earlier one left: the first run's
  value is shown as well as the median.
- **Database bytes per task.** Growth from before submission to after the run has finished:
  `tasks_table_bytes_per_task` of `pg_total_relation_size('tasks')` (table, indexes and TOAST),
  `database_bytes_per_task` of the whole database (task events and workflows too). Both include the
  dead row versions each task's status updates leave, unless autovacuum reclaimed them meanwhile
  (`tasks_autovacuums` counts its passes over the tasks table during the run).
- **Settings.** The harness runs executors with `executor_concurrency` 64 where the default is 16,
  so that two executor processes running no-op tasks are not what limits a benchmark of the
  scheduler; an installation with the default may well be slower (not measured here). Logging is at
  WARNING (default INFO), which leaves out the log line per task a default installation writes.
  Each scenario lists what it ran with that differs from the defaults.
"""


@dataclass
class Source:
    """One scenario's figures and the run they come from."""

    file: str
    meta: dict[str, Any]
    variants: dict[str, Any]


def newest_by_scenario(raw_dir: Path) -> dict[str, Source]:
    runs = []
    for path in raw_dir.glob("results-*.json"):
        if path.name.endswith("-quick.json"):
            continue  # smoke runs: small sizes, one repeat
        data = orjson.loads(path.read_bytes())
        when = data["meta"].get("started_utc") or data["meta"]["machine"]["date"]
        runs.append((when, path.name, data))
    newest: dict[str, Source] = {}
    for _, name, data in sorted(runs):
        for scenario, variants in data["results"].items():
            newest[scenario] = Source(name, data["meta"], variants)
    order = {name: i for i, name in enumerate(NAMES)}
    return dict(sorted(newest.items(), key=lambda item: order.get(item[0], len(order))))


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)


def _fmt(value: Any, runs: int) -> str:
    if not isinstance(value, dict):
        return _num(value)
    if "pooled" in value:
        n = value["pooled"]
        if n == 1:
            return f"{_num(value['p50'])} (1 sample)"
        return f"p50 {_num(value['p50'])}, {_tail(value, n)} ({n} samples, every run's pooled)"
    if runs == 1:
        return _num(value["median"])
    if "max" not in value:  # written before max was kept: its "p95" of under 11 runs is their largest
        label = f"max of {runs}:" if runs < 11 else "p95"
        return f"{_num(value['median'])} ({label} {_num(value['p95'])})"
    if value["median"] == value["max"] and "first" not in value:
        return _num(value["median"])  # the same in every run (a size), or as good as
    first = f"; first run {_num(value['first'])}" if "first" in value else ""
    return f"{_num(value['median'])} ({_tail(value, runs)}{first})"


def _tail(value: dict[str, Any], n: int) -> str:
    if "p95" in value:
        return f"p95 {_num(value['p95'])}, max {_num(value['max'])}"
    return f"max of {n}: {_num(value['max'])}"


def tables(variants: dict[str, Any]) -> list[str]:
    out = []
    for variant, figures in variants.items():
        runs = figures.get("runs", 1)
        counted = "1 run" if runs == 1 else f"{runs} runs; each figure's median over them"
        out.append(f"**{variant.replace('_', ' ')}** ({counted})\n")
        out.append("| figure | value |\n|---|---|")
        out.extend(f"| {k} | {_fmt(v, runs)} |" for k, v in figures.items() if k != "runs")
        out.append("")
    return out


def _build(meta: dict[str, Any]) -> str:
    build = meta.get("build")
    if not build:
        return "build not recorded"
    dirty = f" with uncommitted changes to {len(build['changed'])} files" if build["dirty"] else ""
    return f"build `{build['commit'][:12]}`{dirty}"


def run_line(file: str, meta: dict[str, Any], scenarios: list[str]) -> list[str]:
    m = meta["machine"]
    when = meta.get("started_utc", m["date"])
    durability = meta.get("postgres_durability")
    pg = ", ".join(f"{k} {v}" for k, v in durability.items()) if durability else "durability not recorded"
    repeats = f"{meta['repeat']} repeat{'s' if meta['repeat'] != 1 else ''}"
    lines = [
        f"- `{file}` ({', '.join(scenarios)}): {when}, {_build(meta)}; `{meta['command']}`, "
        f"{repeats}, {meta['duration_s']} s. {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; "
        f"Python {m['python']}; Postgres {m['postgres']} ({pg}); RabbitMQ {m['rabbitmq']}; Linux {m['kernel']}."
    ]
    lines += [f"  **WARNING: {w}.**" for w in meta.get("warnings", [])]
    return lines


def settings_line(meta: dict[str, Any], scenario: str) -> str:
    record = meta.get("settings", {}).get(scenario)
    if not isinstance(record, dict) or "values" not in record:
        return "Settings: not recorded per scenario in this run."
    changed = [
        f"`{name}` {record['values'][name]} (default {default})"
        for name, default in record["defaults_of_changed"].items()
        if name not in PER_RUN
    ]
    shown = ", ".join(changed) or "none"
    return f"Settings that differ from the defaults: {shown}; and the run's own database, queue prefix and admin token."


def scenario_section(scenario: str, source: Source) -> list[str]:
    warmup = source.meta.get("warmups", {}).get(scenario, "not recorded")
    when = source.meta.get("started_utc", source.meta["machine"]["date"])
    return [
        f"### {scenario}\n",
        f"From `{source.file}` ({when}, {_build(source.meta)}). Warm-up before the measured runs: {warmup}.\n",
        settings_line(source.meta, scenario) + "\n",
        *(f"**WARNING: {w}.**\n" for w in source.meta.get("warnings", [])),
        *tables(source.variants),
    ]


def plot_scale(scale: dict[str, Any] | None, path: Path) -> bool:
    """Throughput and workflow latency against workflows released together, each point labelled
    with the peak in flight it reached."""
    if not scale or not all("peak_in_flight" in v for v in scale.values()):
        return False  # none, or measured before the release was gated
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
    for workflows, v in points:
        left.annotate(
            f"peak {v['peak_in_flight']['median']:.0f}",
            (workflows, v["tasks_per_s"]["median"]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    left.set_xscale("log")
    left.set_xlabel("workflows released together (5-task chains; labels: peak in flight)")
    left.set_ylabel("throughput (tasks/s)", color="tab:blue")
    right = left.twinx()
    for q, style, color in (("p50", "s--", "tab:red"), ("p95", "^--", "tab:orange")):
        right.plot(x, [p[1]["workflow_ms"].get(q, float("nan")) for p in points], style, color=color, label=q)
    right.set_yscale("log")
    right.set_ylabel("workflow latency from release (ms)", color="tab:red")
    right.legend(loc="upper left")
    fig.suptitle("Dagsmith scale curve")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(newest: dict[str, Source], plotted: bool) -> str:
    by_file: dict[str, list[str]] = {}
    for scenario, source in newest.items():
        by_file.setdefault(source.file, []).append(scenario)
    metas = {source.file: source.meta for source in newest.values()}
    body = [
        "Generated by `python -m benchmarks` from the raw results in `benchmarks/`: each scenario from the "
        "newest full run that measured it. Runs shown:",
        "",
    ]
    for file, scenarios in sorted(by_file.items()):
        body += run_line(file, metas[file], scenarios)
    body += [
        "",
        "Everything — Postgres, RabbitMQ, API, controller, evaluator, the executor processes and the load "
        "generator — shares the machine's cores, and Postgres and RabbitMQ may serve other work at the same time.",
        "",
        NOTES,
    ]
    for scenario, source in newest.items():
        body += scenario_section(scenario, source)
    if plotted:
        body.append("![scale curve](benchmarks-scale.png)\n")
    return "\n".join(body)


def write(out: Path) -> Path:
    """Rebuild the measured section of ``out/benchmarks.md`` (and the plot) from the raw files."""
    newest = newest_by_scenario(out / "benchmarks")
    scale = newest.get("scale")
    plotted = plot_scale(scale.variants if scale else None, out / "benchmarks-scale.png")
    text = render(newest, plotted)
    report = out / "benchmarks.md"
    old = report.read_text() if report.exists() else ""
    if START in old:
        report.write_text(old[: old.index(START) + len(START)] + "\n" + text + "\n" + old[old.index(END) :])
    else:
        report.write_text(f"# Benchmarks\n\n{START}\n{text}\n{END}\n")
    return report
