"""The benchmark suite keeps running: a quick pass of two scenarios, checked for sane figures.

Speed itself is not asserted here (that is what the suite and its report are for); this only
proves the suite still starts an installation, drives it and writes its results.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_run_writes_its_figures(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "throughput", "hop", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (raw,) = (tmp_path / "benchmarks").glob("results-*-quick.json")
    data = orjson.loads(raw.read_bytes())
    meta, results = data["meta"], data["results"]
    one = results["throughput"]["one_workflow"]
    assert one["tasks"]["median"] == 1000
    assert one["tasks_per_s"]["median"] > 0
    assert one["cpu_ms_per_task_all"]["median"] > 0
    spread = results["throughput"]["100_workflows"]
    assert 1 <= spread["peak_in_flight"]["median"] <= 100  # the gate released them: measured, not assumed
    hops = results["hop"]["chain"]["hop_ms"]
    assert hops["pooled"] == 199
    assert 0 < hops["p50"] <= hops["p95"] <= hops["max"]
    assert len(meta["build"]["commit"]) == 40
    assert set(meta["postgres_durability"]) == {"fsync", "synchronous_commit", "full_page_writes"}
    assert meta["settings"]["hop"]["defaults_of_changed"]["executor_concurrency"] == 16
    assert not (tmp_path / "benchmarks.md").exists()  # a quick run never rewrites the report
