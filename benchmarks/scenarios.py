"""The benchmark scenarios. Each returns a flat dict of figures for one run; raw samples that
should be pooled across runs (latencies) go under ``samples``."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from benchmarks.harness import GATE_TYPE, Bench, cpu_used, wait_until

Task = dict[str, Any]

NAMES = ["throughput", "hop", "wide", "big", "scale", "idle"]  # the suite's scenarios, in report order

# Below this many values a "p95" is only the largest: the report calls it that instead.
MIN_FOR_P95 = 20
# Figures that carry over from run to run in the same processes and database (memory a process
# keeps, free space reused): the first run's value is reported beside the median.
FIRST_RUN_MATTERS = ("_rss_", "bytes_per_task")


def doc(name: str, tasks: list[Task]) -> dict[str, Any]:
    return {"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "metadata": {"name": name}, "spec": {"tasks": tasks}}


def independent(n: int) -> list[Task]:
    return [{"name": f"t{i}", "type": "noop"} for i in range(n)]


def chain(n: int) -> list[Task]:
    return [{"name": "t0", "type": "noop"}] + [
        {"name": f"t{i}", "type": "noop", "dependsOn": [f"t{i - 1}"]} for i in range(1, n)
    ]


def layered(layers: int, width: int) -> list[Task]:
    tasks: list[Task] = [{"name": f"l0_{j}", "type": "noop"} for j in range(width)]
    for i in range(1, layers):
        deps = [f"l{i - 1}_{j}" for j in range(width)]
        tasks += [{"name": f"l{i}_{j}", "type": "noop", "dependsOn": deps} for j in range(width)]
    return tasks


def gated(tasks: list[Task]) -> list[Task]:
    """The tasks behind one gate task: every root of theirs depends on it (see harness.GATE_TYPE)."""
    return [{"name": "gate", "type": GATE_TYPE}] + [
        t if t.get("dependsOn") else {**t, "dependsOn": ["gate"]} for t in tasks
    ]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def peak_in_flight(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (one ending as another starts: not both counted)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = open_now = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


def _finished_at(bench: Bench, ids: list[str]) -> float:
    with bench.pg() as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM max(finished_at)) FROM workflows WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchone()
    return float(row[0])  # type: ignore[index]


def _submit_many(bench: Bench, docs: list[dict[str, Any]], threads: int = 8) -> list[str]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(bench.submit, docs))


@dataclass
class Burst:
    """Gated workflows run together: times from the database, in epoch seconds."""

    submit_s: float  # submitting every workflow through the API, before the gate opened
    release: float  # the first gate task started: the burst's start
    released: float  # the last gate task finished: every workflow free to run
    finished: list[float]  # each workflow's end
    peak_in_flight: int  # most workflows between their gate's start and their end at one moment

    @property
    def wall_s(self) -> float:
        return max(self.finished) - self.release

    def figures(self) -> dict[str, Any]:
        return {
            "workflows": len(self.finished),
            "peak_in_flight": self.peak_in_flight,
            "submit_s": self.submit_s,
            "release_s": self.released - self.release,
            "wall_s": self.wall_s,
        }


def burst(bench: Bench, docs: list[dict[str, Any]], timeout: float = 900) -> Burst:
    """Submit gated workflows, wait until every one is accepted and its gate queued, then open
    the gate: the workflows start together, however long submitting them took."""
    t0 = time.time()
    ids = _submit_many(bench, docs, threads=16)
    submitted = time.time() - t0
    bench.wait_gated(ids)
    with bench.gate_open():
        bench.wait_all(ids, timeout=timeout)
    with bench.pg() as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM g.started_at), extract(epoch FROM g.finished_at), "
            "extract(epoch FROM w.finished_at) FROM workflows w JOIN tasks g ON g.workflow_id = w.id "
            "AND g.name = 'gate' WHERE w.id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    starts, gates_done, ends = ([float(v) for v in column] for column in zip(*rows, strict=True))
    return Burst(
        submit_s=submitted,
        release=min(starts),
        released=max(gates_done),
        finished=ends,
        peak_in_flight=peak_in_flight(list(zip(starts, ends, strict=True))),
    )


def throughput_one(bench: Bench, n: int = 5000) -> dict[str, Any]:
    """n independent no-op tasks in one workflow: submit to last result applied, and the CPU each
    part of the system spent per task (where the time goes)."""
    cpu0 = bench.cpu_snapshot()
    t0 = time.time()
    wid = bench.submit(doc("throughput", independent(n)))
    bench.wait_all([wid], timeout=600)
    wall = _finished_at(bench, [wid]) - t0
    elapsed = time.time() - t0
    cpu = cpu_used(cpu0, bench.cpu_snapshot())
    figures: dict[str, Any] = {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall}
    figures.update({f"cpu_ms_per_task_{k}": 1000 * v / n for k, v in sorted(cpu.items())})
    # Postgres's background processes serve every database on the server: not counted as ours.
    ours = sum(v for k, v in cpu.items() if k != "postgres_background")
    figures["cpu_ms_per_task_all"] = 1000 * ours / n
    figures["cores_busy"] = ours / elapsed
    return figures


def throughput_spread(bench: Bench, workflows: int = 100, per: int = 50) -> dict[str, Any]:
    """The same number of tasks spread over workflows that start together: each is a gate task
    and ``per - 1`` no-ops behind it. Timed from the first gate task's start."""
    run = burst(bench, [doc(f"spread-{i}", gated(independent(per - 1))) for i in range(workflows)])
    return {"tasks": workflows * per, **run.figures(), "tasks_per_s": workflows * per / run.wall_s}


def hop_latency(bench: Bench, n: int = 200) -> dict[str, Any]:
    """A chain: from one task's result to its successor starting, and the whole chain's wall time."""
    t0 = time.time()
    wid = bench.submit(doc("chain", chain(n)))
    bench.wait_all([wid], timeout=600)
    with bench.pg() as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM started_at), extract(epoch FROM finished_at) FROM tasks "
            "WHERE workflow_id = %s ORDER BY id",
            (wid,),
        ).fetchall()
    hops = [(float(rows[i + 1][0]) - float(rows[i][1])) * 1000 for i in range(len(rows) - 1)]
    return {"tasks": n, "chain_wall_s": _finished_at(bench, [wid]) - t0, "samples": {"hop_ms": hops}}


def wide(bench: Bench, layers: int = 10, width: int = 500) -> dict[str, Any]:
    """Layers with full fan-in between them (width² edges per layer boundary)."""
    body = orjson.dumps(doc("wide", layered(layers, width)))
    t0 = time.time()
    wid = bench.client().submit(body, content_type="application/json")["id"]
    accepted = time.time() - t0
    bench.wait_all([wid], timeout=900)
    wall = _finished_at(bench, [wid]) - t0
    return {
        "tasks": layers * width,
        "edges": (layers - 1) * width * width,
        "body_mib": len(body) / 2**20,
        "accept_s": accepted,
        "wall_s": wall,
        "tasks_per_s": layers * width / wall,
    }


def _db_sizes(bench: Bench) -> tuple[int, int, int]:
    """Bytes of the tasks table (with its indexes and TOAST), of the whole database, and how many
    times autovacuum has processed the tasks table."""
    with bench.pg() as conn:
        row = conn.execute(
            "SELECT pg_total_relation_size('tasks'), pg_database_size(current_database()), "
            "(SELECT autovacuum_count FROM pg_stat_user_tables WHERE relname = 'tasks')"
        ).fetchone()
    return int(row[0]), int(row[1]), int(row[2] or 0)  # type: ignore[index]


def big_submission(bench: Bench, n: int = 10_000) -> dict[str, Any]:
    """Validate and persist n tasks; time to first dispatch; peak memory of the API and the
    controller over the whole run; database bytes per task once the run has finished."""
    body = orjson.dumps(doc("big", independent(n)))
    tasks0, db0, vacuums0 = _db_sizes(bench)
    services = ("api", "controller")
    for name in services:
        bench.reset_peak_rss(name)
    rss0 = {name: bench.rss_mib(name) for name in services}
    t0 = time.time()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {bench.stack.token}"}
    response = httpx.post(f"{bench.stack.url}/v1/workflows", content=body, headers=headers, timeout=600)
    accepted = time.time() - t0
    response.raise_for_status()
    wid = response.json()["id"]
    with bench.pg() as conn:
        first = wait_until(
            lambda: conn.execute(
                "SELECT extract(epoch FROM min(queued_at)) FROM tasks WHERE workflow_id = %s", (wid,)
            ).fetchone()[0],  # type: ignore[index]
            timeout=120,
            what="the first dispatch",
            interval=0.01,
        )
    bench.wait_all([wid], timeout=900)
    wall = _finished_at(bench, [wid]) - t0
    tasks1, db1, vacuums1 = _db_sizes(bench)
    figures: dict[str, Any] = {
        "tasks": n,
        "body_mib": len(body) / 2**20,
        "accept_s": accepted,
        "first_dispatch_s": float(first) - t0,
        "wall_s": wall,
        "tasks_per_s": n / wall,
    }
    for name in services:
        peak = bench.peak_rss_mib(name)
        figures[f"{name}_peak_rss_mib"] = peak
        figures[f"{name}_peak_rss_growth_mib"] = peak - rss0[name]
    # After the run, so each task's row versions from queued, running and succeeded are in it.
    figures["tasks_table_bytes_per_task"] = (tasks1 - tasks0) / n
    figures["database_bytes_per_task"] = (db1 - db0) / n
    figures["tasks_autovacuums"] = vacuums1 - vacuums0
    return figures


def scale_point(bench: Bench, workflows: int, length: int = 5) -> dict[str, Any]:
    """``workflows`` chains of ``length`` tasks (a gate task, then no-ops) started together:
    throughput, and each workflow's latency from the burst's start."""
    run = burst(bench, [doc(f"scale-{i}", gated(chain(length - 1))) for i in range(workflows)])
    return {
        **run.figures(),
        "tasks": workflows * length,
        "tasks_per_s": workflows * length / run.wall_s,
        "samples": {"workflow_ms": [(end - run.release) * 1000 for end in run.finished]},
    }


def sleepers(bench: Bench, workflows: int, seconds: float) -> list[str]:
    return _submit_many(
        bench,
        [
            doc(f"sleep-{i}", [{"name": "wait", "type": "sleep", "params": {"seconds": seconds}}])
            for i in range(workflows)
        ],
    )


def warm_sleep(bench: Bench, workflows: int = 10) -> None:
    """A few short sleep tasks run to the end: the sleep queue declared, connections open, and
    the running reports' path taken once (the tasks outlast start_report_after)."""
    bench.wait_all(sleepers(bench, workflows, 0.2), timeout=120)


def idle_cost(bench: Bench, workflows: int = 1000, window: float = 30.0) -> dict[str, Any]:
    """Controller CPU while ``workflows`` each wait on a slow running task."""
    ids = sleepers(bench, workflows, 600)
    with bench.pg() as conn:
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM tasks WHERE workflow_id = ANY(%s::uuid[]) AND status = 'running'", (ids,)
                ).fetchone()[0]  # type: ignore[index]
                >= workflows
            ),
            timeout=300,
            what=f"{workflows} tasks running",
            interval=0.5,
        )
    # Let start-up work (dispatch, started reports) drain before measuring.
    time.sleep(3.0)
    cpu0, t0 = bench.cpu_seconds("controller"), time.monotonic()
    time.sleep(window)
    cpu = bench.cpu_seconds("controller") - cpu0
    elapsed = time.monotonic() - t0
    client = bench.client()
    for wid in ids:
        client.cancel(wid)
    return {"workflows": workflows, "window_s": elapsed, "controller_cpu_pct": 100 * cpu / elapsed}


def spread(values: list[float]) -> dict[str, float]:
    """Median and largest of some run-level figures, and their p95 when there are enough runs for
    it to mean more than the largest."""
    out = {"median": statistics.median(values)}
    if len(values) >= MIN_FOR_P95:
        out["p95"] = pct(values, 95)
    return {**out, "max": max(values)}


def pooled(samples: list[float]) -> dict[str, float]:
    """Percentiles of every sample of every run together (a p95 of per-run p95s means little)."""
    out = {"pooled": len(samples), "p50": pct(samples, 50)}
    if len(samples) >= MIN_FOR_P95:
        out["p95"] = pct(samples, 95)
    return {**out, "max": max(samples)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median and max over repeated runs (with the first run's where it carries over
    between runs); samples pooled over all runs."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            out[key] = spread(values)
            if any(part in key for part in FIRST_RUN_MATTERS):
                out[key]["first"] = values[0]
    for name in runs[0].get("samples", {}):
        out[name] = pooled([v for r in runs for v in r["samples"][name]])
    return out
