"""A reproducible batch of workflows of mixed DAG shapes, and what each one is expected to end as.

About 50 workflows and 2,000 tasks: chains, fan-out/fan-in, stacked diamonds, layered DAGs and
independent tasks. Tasks are short ``sleep`` tasks of varied durations (some shorter than the
executor's start-report threshold, so both the fast path and the lease path are exercised) and
some ``chaos.flaky`` tasks that fail their first attempts and succeed on a retry. A few workflows
carry a planned permanent failure, so the checker also sees failed tasks and cancelled
descendants.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

SLEEPS = (0.0, 0.01, 0.02, 0.04, 0.08, 0.12, 0.2, 0.3)
# Every task has a retry policy, as a user's would: an attempt lost to a fault (its executor
# died or hung and its lease expired) is retried. Flaky tasks get room for their planned failures.
RETRY = {"limit": 2, "backoff": {"initial": "100ms", "factor": 2, "max": "1s"}}
FLAKY_RETRY = {"limit": 4, "backoff": {"initial": "100ms", "factor": 2, "max": "1s"}}
# The faults test the engine's own guarantees (leases, redelivery, exactly-once application), with
# the spec's retry policy: Correction Mode, which would answer these failures with surgeries, has
# its own crash test (tests/e2e/test_correction.py).
CORRECTION = {"mode": "off"}


@dataclass
class Planned:
    """One workflow of the batch and its expected outcome."""

    name: str
    shape: str
    tasks: list[dict[str, Any]]
    expect_status: str = "succeeded"
    fails: dict[str, str] = field(default_factory=dict)  # task name -> expected error class
    flaky: dict[str, int] = field(default_factory=dict)  # task name -> attempts that fail first

    def document(self) -> dict[str, Any]:
        return {
            "apiVersion": "dagsmith.io/v1",
            "kind": "Workflow",
            "metadata": {"name": self.name, "labels": {"suite": "faults", "shape": self.shape}},
            "spec": {"tasks": self.tasks, "correction": CORRECTION},
        }


class _Builder:
    def __init__(self, rng: random.Random, flaky_rate: float) -> None:
        self.rng = rng
        self.flaky_rate = flaky_rate
        self.flaky: dict[str, int] = {}

    def task(self, name: str, deps: list[str] | None = None) -> dict[str, Any]:
        task: dict[str, Any]
        if self.rng.random() < self.flaky_rate:
            fail_times = self.rng.choice((1, 1, 2))
            self.flaky[name] = fail_times
            task = {"name": name, "type": "chaos.flaky", "params": {"failTimes": fail_times}, "retry": FLAKY_RETRY}
        else:
            task = {"name": name, "type": "sleep", "params": {"seconds": self.rng.choice(SLEEPS)}, "retry": RETRY}
        if deps:
            task["dependsOn"] = deps
        return task


def _chain(b: _Builder, n: int) -> list[dict[str, Any]]:
    return [b.task(f"c{i}", [f"c{i - 1}"] if i else None) for i in range(n)]


def _fan(b: _Builder, n: int) -> list[dict[str, Any]]:
    workers = [b.task(f"w{i}", ["root"]) for i in range(n)]
    return [b.task("root"), *workers, b.task("sink", [f"w{i}" for i in range(n)])]


def _diamonds(b: _Builder, n: int) -> list[dict[str, Any]]:
    tasks = [b.task("d0")]
    for i in range(n):
        top = f"d{i}"
        tasks += [b.task(f"l{i}", [top]), b.task(f"r{i}", [top]), b.task(f"d{i + 1}", [f"l{i}", f"r{i}"])]
    return tasks


def _layered(b: _Builder, layers: int, width: int) -> list[dict[str, Any]]:
    tasks = [b.task(f"n0_{j}") for j in range(width)]
    for i in range(1, layers):
        for j in range(width):
            deps = sorted({f"n{i - 1}_{j}", f"n{i - 1}_{b.rng.randrange(width)}"})
            tasks.append(b.task(f"n{i}_{j}", deps))
    return tasks


def _independent(b: _Builder, n: int) -> list[dict[str, Any]]:
    return [b.task(f"i{i}") for i in range(n)]


def batch(seed: int, workflows: int = 50, target_tasks: int = 2000, planned_failures: int = 2) -> list[Planned]:
    """``workflows`` workflows of about ``target_tasks`` tasks in all; the same seed gives the same batch."""
    rng = random.Random(seed)
    per = target_tasks / workflows
    shapes = ["chain", "fan", "diamonds", "layered", "independent"]
    out: list[Planned] = []
    for k in range(workflows):
        shape = shapes[k % len(shapes)]
        b = _Builder(rng, flaky_rate=0.06)
        size = max(4, round(per * rng.uniform(0.6, 1.4)))
        if shape == "chain":
            tasks = _chain(b, min(size, 30))  # long chains dominate the wall time: keep them short
        elif shape == "fan":
            tasks = _fan(b, size - 2)
        elif shape == "diamonds":
            tasks = _diamonds(b, max(1, (size - 1) // 3))
        elif shape == "layered":
            tasks = _layered(b, 4, max(1, size // 4))
        else:
            tasks = _independent(b, size)
        out.append(Planned(f"{shape}-{k}", shape, tasks, flaky=b.flaky))
    # Top up with independent tasks so the batch has the advertised size.
    missing = target_tasks - sum(len(p.tasks) for p in out)
    if missing > 0:
        extra = next(p for p in out if p.shape == "independent")
        b = _Builder(rng, flaky_rate=0.0)
        extra.tasks += [b.task(f"x{i}") for i in range(missing)]
    # Planned failures: one task of a non-trivial DAG fails for good (permanent: never retried); its
    # descendants are cancelled and the workflow fails; the other branches still run.
    for p in [p for p in out if p.shape in ("diamonds", "layered")][:planned_failures]:
        index = len(p.tasks) // 3
        old = p.tasks[index]
        victim: dict[str, Any] = {
            "name": old["name"],
            "type": "chaos.fail",
            "params": {"class": "permanent", "message": "planned failure"},
            "retry": RETRY,  # permanent errors are not retried, whatever the policy
        }
        if "dependsOn" in old:
            victim["dependsOn"] = old["dependsOn"]
        p.tasks[index] = victim
        p.flaky.pop(victim["name"], None)
        p.fails[victim["name"]] = "permanent"
        p.expect_status = "failed"
    return out


def size(planned: list[Planned]) -> int:
    return sum(len(p.tasks) for p in planned)
