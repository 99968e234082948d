"""Lab task types: real tasks whose failures follow the simulator's latent modes.

They exist for the closed-loop experiment (``python -m benchmarks.closed_loop``): a batch of
workflows runs on the real stack under one policy, the decisions are logged, a policy is trained
on the simulator fitted to them, and a batch facing the same failures runs under it. Load them
explicitly: ``dagsmith executor --module trainer.lab --types 'chaos.lab.*'``. (They live with the
trainer, not in ``executors/``, because they read the simulator's tables.)

A lab task's params carry its hidden mode (the controller's features never read params). Its
first attempt always fails, as an episode of the simulator starts with a failure; later attempts
succeed with the simulator's ``success[mode][action]``, where the corrective action is recognised
from what changed since the task's previous attempt: a larger timeout (retry_tuned), another
task type (reroute), repaired params (insert_repair), or else the time since the last failure
(retry_backoff vs retry_now). The
error class reported, and how long a failing attempt runs, are drawn from the mode's
distributions. Every draw is a hash of (the task's ``luck``, attempt): two batches built with the
same seed face exactly the same failures, so policies compare pairwise, as in the simulator.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

from pydantic import BaseModel, Field

from dagsmith.errors import ErrorClass
from executors.registry import TaskContext, TaskFailed, executor
from trainer.params import SimulatorParams

LAB_TYPES = {  # lab type -> the simulator's task type it plays
    "chaos.lab.http": "http.fetch",
    "chaos.lab.parse": "json.parse",
    "chaos.lab.ml": "ml.infer",
    "chaos.lab.db": "db.query",
    "chaos.lab.text": "text.render",
    "chaos.lab.report": "report.build",
}
FALLBACK_TYPE = "chaos.lab.alt"
REPAIR_TYPE = "chaos.lab.repair"
# A retry this long after the last failure counts as a backoff (the lab's backoff starts at 1 s;
# a plain retry can wait for an executor slot a few hundred milliseconds under load).
BACKOFF_SECONDS = 0.6
_PARAMS = SimulatorParams()
_last_failure: dict[tuple[str, str], float] = {}
# (timeout, rerouted, repaired) of a task's latest attempt: what the next one is compared with.
_last_attempt: dict[tuple[str, str], tuple[float | None, bool, bool]] = {}


class LabParams(BaseModel):
    mode: str
    luck: str = Field(description="seeds every draw of this task")
    seconds: float = Field(0.05, ge=0, description="run time of a successful attempt")
    base_timeout: float = Field(1.0, gt=0)
    repaired: bool = False


def draw(params: LabParams, ctx: TaskContext, salt: str) -> float:
    digest = hashlib.sha256(f"{params.luck}:{ctx.attempt}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(weights: dict[str, float], u: float) -> str:
    total = sum(weights.values())
    acc = 0.0
    for key, weight in weights.items():
        acc += weight / total
        if u < acc:
            return key
    return next(reversed(weights))


def action_of(params: LabParams, ctx: TaskContext, rerouted: bool) -> str:
    """The corrective action that led to this attempt, from what changed since the last one (a
    tuned timeout, a reroute or a repair lasts: a later plain retry must not pass for it again)."""
    before = _last_attempt.get((params.luck, ctx.name))
    if before is not None:
        timeout, was_rerouted, was_repaired = before
        if rerouted and not was_rerouted:
            return "reroute"
        if params.repaired and not was_repaired:
            return "insert_repair"
        if ctx.timeout is not None and timeout is not None and ctx.timeout > timeout * 1.5:
            return "retry_tuned"
    last = _last_failure.get((params.luck, ctx.name))
    waited = time.time() - last if last is not None else 0.0
    return "retry_backoff" if waited >= BACKOFF_SECONDS else "retry_now"


async def run(params: LabParams, ctx: TaskContext, rerouted: bool = False) -> dict[str, Any]:
    mode = params.mode
    action = action_of(params, ctx, rerouted) if ctx.attempt > 1 else None
    _last_attempt[(params.luck, ctx.name)] = (ctx.timeout or params.base_timeout, rerouted, params.repaired)
    if action is not None and draw(params, ctx, "outcome") < _PARAMS.success[mode][action]:
        await asyncio.sleep(params.seconds)
        return {"mode": mode, "fixed_by": action, "attempt": ctx.attempt}
    low, high = _PARAMS.duration[mode]
    error_class = pick(_PARAMS.error_given_mode[mode], draw(params, ctx, "class"))
    timeout = ctx.timeout or params.base_timeout
    if error_class == "timeout":
        # Runs out its timeout; the executor stops it and reports the timeout. The failure is at
        # the timeout, which is when a later retry's wait starts counting.
        _last_failure[(params.luck, ctx.name)] = time.time() + timeout
        await asyncio.sleep(timeout * 1.2)
    await asyncio.sleep(timeout * (low + (high - low) * draw(params, ctx, "duration")))
    _last_failure[(params.luck, ctx.name)] = time.time()
    raise TaskFailed(ErrorClass(error_class), f"lab: {mode} failure (attempt {ctx.attempt})", {"lab_mode": mode})


def _register(task_type: str) -> None:
    async def handler(params: LabParams, ctx: TaskContext) -> dict[str, Any]:
        return await run(params, ctx)

    # Declared as the simulator's type profile says: what a lab type can be repaired or tuned
    # with decides which actions the controller's mask allows, as it does in the simulator.
    profile = _PARAMS.types[LAB_TYPES[task_type]]
    executor(
        task_type,
        description=f"Lab: plays the simulator's {LAB_TYPES[task_type]}",
        repair=REPAIR_TYPE if profile.has_repair else None,
        tunable={"timeout": "x2"} if profile.has_tunable else None,
    )(handler)


for _type in LAB_TYPES:
    _register(_type)


@executor(FALLBACK_TYPE, description="Lab: the fallback capability every lab task may be rerouted to")
async def alternative(params: LabParams, ctx: TaskContext) -> dict[str, Any]:
    return await run(params, ctx, rerouted=True)


@executor(REPAIR_TYPE, description="Lab: repairs a lab task's input")
async def repair(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"repaired": True}


# --- The lab world as the simulator sees it, and its workflows. ---

LAB_SCALE = 200.0  # the lab runs 200x faster than the simulator's seconds
LAB_TIMEOUT = 0.5
LAB_CORRECTION = {"maxRetries": 2, "maxSurgeries": 3, "maxInsertedTasks": 1}


def lab_params() -> SimulatorParams:
    """The simulator's defaults, restated for the lab: its type names, single-task workflows (no
    upstream, and no progress when the task fails), its budgets, and no executor-failure-rate
    signal: the lab's types share one executor, so the controller's per-type rate cannot single
    out a degraded one, and as every lab task's first attempt fails, the rate the controller
    reports is high for every mode (0.6 to 1.0 over 300 rules-run workflows, mean 0.84 to 0.88).

    What the policy sees must be drawn as the controller reports it: trained on a feature
    distributed otherwise, the network reads the real values wrongly (see
    ``project_logs/experiments/closed_loop.md``)."""
    from dataclasses import replace

    base = SimulatorParams()
    to_lab = {sim: lab for lab, sim in LAB_TYPES.items()}
    return replace(
        base,
        types={to_lab[k]: v for k, v in base.types.items()},
        type_given_mode={m: {to_lab[k]: p for k, p in row.items()} for m, row in base.type_given_mode.items()},
        failure_rate={m: (9.0, 1.5) for m in base.failure_rate},
        p_no_upstream=1.0,
        progress=(0.0, 0.0),
        max_retries_choices=(LAB_CORRECTION["maxRetries"],),
        max_surgeries_choices=(LAB_CORRECTION["maxSurgeries"],),
        surgeries_left_choices=(LAB_CORRECTION["maxSurgeries"],),
        max_inserted_choices=(LAB_CORRECTION["maxInsertedTasks"],),
        inserted_left_choices=(LAB_CORRECTION["maxInsertedTasks"],),
        time_budget_choices=(None,),
    )


def lab_workflows(n: int, seed: int, mode: str = "rules") -> list[dict[str, Any]]:
    """``n`` one-task workflows whose failures follow the lab world; same seed, same failures."""
    import random

    params = lab_params()
    rng = random.Random(seed)
    modes = list(params.mix)
    docs = []
    for i in range(n):
        latent = rng.choices(modes, [params.mix[m] for m in modes])[0]
        row = params.type_given_mode[latent]
        task_type = rng.choices(list(row), list(row.values()))[0]
        profile = params.types[task_type]
        task: dict[str, Any] = {
            "name": "work",
            "type": task_type,
            "timeout": f"{int(LAB_TIMEOUT * 1000)}ms",
            "params": {
                "mode": latent,
                "luck": f"{seed}-{i}",
                "seconds": round(profile.seconds / LAB_SCALE, 3),
                "base_timeout": LAB_TIMEOUT,
                "repaired": False,
            },
            "retry": {"backoff": {"initial": "1s", "factor": 2, "max": "4s"}},
        }
        if rng.random() < profile.p_fallback:
            task["fallback"] = [FALLBACK_TYPE]
        if rng.random() < profile.p_optional:
            task["optional"] = True
            task["default"] = {"skipped": True}
        correction: dict[str, Any] = {"mode": mode, **LAB_CORRECTION}
        docs.append(
            {
                "apiVersion": "dagsmith.io/v1",
                "kind": "Workflow",
                "metadata": {"name": f"lab-{seed}-{i}", "labels": {"lab": str(seed), "mode": mode}},
                "spec": {"tasks": [task], "correction": correction},
            }
        )
    return docs
