"""The benchmark scenarios. Each returns a flat dict of figures for one run."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson

from benchmarks.harness import Bench, wait_until


def doc(name: str, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "dagsmith.io/v1", "kind": "Workflow", "metadata": {"name": name}, "spec": {"tasks": tasks}}


def independent(n: int) -> list[dict[str, Any]]:
    return [{"name": f"t{i}", "type": "noop"} for i in range(n)]


def chain(n: int) -> list[dict[str, Any]]:
    return [{"name": "t0", "type": "noop"}] + [
        {"name": f"t{i}", "type": "noop", "dependsOn": [f"t{i - 1}"]} for i in range(1, n)
    ]


def layered(layers: int, width: int) -> list[dict[str, Any]]:
    tasks = [{"name": f"l0_{j}", "type": "noop"} for j in range(width)]
    for i in range(1, layers):
        deps = [f"l{i - 1}_{j}" for j in range(width)]
        tasks += [{"name": f"l{i}_{j}", "type": "noop", "dependsOn": deps} for j in range(width)]
    return tasks


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _finished_at(bench: Bench, ids: list[str]) -> float:
    with bench.pg() as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM max(finished_at)) FROM workflows WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchone()
    return float(row[0])  # type: ignore[index]


def _submit_many(bench: Bench, docs: list[dict[str, Any]], threads: int = 8) -> list[str]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(bench.submit, docs))


def throughput_one(bench: Bench, n: int = 5000) -> dict[str, Any]:
    """n independent no-op tasks in one workflow: submit to last result applied, and the CPU each
    part of the system spent per task (where the time goes)."""
    cpu0 = bench.cpu_by_component()
    t0 = time.time()
    wid = bench.submit(doc("throughput", independent(n)))
    bench.wait_all([wid], timeout=600)
    wall = _finished_at(bench, [wid]) - t0
    elapsed = time.time() - t0
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in bench.cpu_by_component().items()}
    figures: dict[str, Any] = {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall}
    figures.update({f"cpu_ms_per_task_{k}": 1000 * v / n for k, v in sorted(cpu.items())})
    figures["cpu_ms_per_task_all"] = 1000 * sum(cpu.values()) / n
    figures["cores_busy"] = sum(cpu.values()) / elapsed
    return figures


def throughput_spread(bench: Bench, workflows: int = 100, per: int = 50) -> dict[str, Any]:
    """The same number of tasks spread over concurrent workflows."""
    t0 = time.time()
    ids = _submit_many(bench, [doc(f"spread-{i}", independent(per)) for i in range(workflows)])
    bench.wait_all(ids, timeout=600)
    wall = _finished_at(bench, ids) - t0
    return {"tasks": workflows * per, "workflows": workflows, "wall_s": wall, "tasks_per_s": workflows * per / wall}


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
    return {
        "tasks": n,
        "hop_p50_ms": pct(hops, 50),
        "hop_p95_ms": pct(hops, 95),
        "hop_max_ms": max(hops),
        "chain_wall_s": _finished_at(bench, [wid]) - t0,
    }


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


def big_submission(bench: Bench, n: int = 10_000) -> dict[str, Any]:
    """Validate and persist n tasks; time to first dispatch; memory; bytes per task."""
    body = orjson.dumps(doc("big", independent(n)))
    with bench.pg() as conn:
        before = conn.execute("SELECT pg_total_relation_size('tasks')").fetchone()[0]  # type: ignore[index]
    api_rss0 = bench.rss_mib("api")
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
        after = conn.execute("SELECT pg_total_relation_size('tasks')").fetchone()[0]  # type: ignore[index]
    figures = {
        "tasks": n,
        "body_mib": len(body) / 2**20,
        "accept_s": accepted,
        "first_dispatch_s": float(first) - t0,
        "api_rss_mib": bench.rss_mib("api"),
        "api_rss_growth_mib": bench.rss_mib("api") - api_rss0,
        "controller_rss_mib": bench.rss_mib("controller"),
        "db_bytes_per_task": (after - before) / n,
    }
    bench.wait_all([wid], timeout=900)
    figures["wall_s"] = _finished_at(bench, [wid]) - t0
    figures["tasks_per_s"] = n / figures["wall_s"]
    return figures


def scale_point(bench: Bench, workflows: int, length: int = 5) -> dict[str, Any]:
    """``workflows`` concurrent chains of ``length`` tasks: throughput and per-workflow latency."""
    t0 = time.time()
    ids = _submit_many(bench, [doc(f"scale-{i}", chain(length)) for i in range(workflows)], threads=16)
    submitted = time.time() - t0
    bench.wait_all(ids, timeout=900)
    with bench.pg() as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM finished_at - created_at) FROM workflows WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchall()
    latencies = [float(r[0]) * 1000 for r in rows]
    wall = _finished_at(bench, ids) - t0
    return {
        "workflows": workflows,
        "tasks": workflows * length,
        "submit_s": submitted,
        "wall_s": wall,
        "tasks_per_s": workflows * length / wall,
        "workflow_p50_ms": pct(latencies, 50),
        "workflow_p95_ms": pct(latencies, 95),
    }


def idle_cost(bench: Bench, workflows: int = 1000, window: float = 30.0) -> dict[str, Any]:
    """Controller CPU while ``workflows`` each wait on a slow running task."""
    ids = _submit_many(
        bench,
        [doc(f"idle-{i}", [{"name": "wait", "type": "sleep", "params": {"seconds": 600}}]) for i in range(workflows)],
    )
    with bench.pg() as conn:
        wait_until(
            lambda: (
                conn.execute("SELECT count(*) FROM tasks WHERE status = 'running'").fetchone()[0]  # type: ignore[index]
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


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and p95 of every numeric figure over repeated runs."""
    out: dict[str, Any] = {"runs": len(runs)}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if values:
            out[key] = {"median": statistics.median(values), "p95": pct(values, 95)}
    return out
