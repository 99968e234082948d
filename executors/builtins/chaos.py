"""chaos.*: tasks that fail on purpose, for tests and for training the correction policy."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

from pydantic import BaseModel, Field

from dagsmith.errors import ErrorClass
from executors.registry import TaskContext, TaskFailed, executor


def draw(ctx: TaskContext, salt: str = "") -> float:
    """A uniform number in [0, 1) fixed by (task, attempt): the same attempt always draws the same."""
    digest = hashlib.sha256(f"{ctx.workflow_id}:{ctx.name}:{ctx.attempt}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FailParams(BaseModel):
    error_class: ErrorClass = Field(ErrorClass.transient, alias="class")
    probability: float = Field(1.0, ge=0, le=1)
    message: str = "chaos: injected failure"
    output: Any = None


@executor("chaos.fail", description="Fails with params.class with params.probability; else returns params.output.")
async def fail(params: FailParams, ctx: TaskContext) -> Any:
    if draw(ctx) < params.probability:
        raise TaskFailed(params.error_class, params.message, {"probability": params.probability})
    return params.output if params.output is not None else {"ok": True}


class FlakyParams(BaseModel):
    fail_times: int = Field(1, ge=0, alias="failTimes")
    error_class: ErrorClass = Field(ErrorClass.transient, alias="class")
    output: Any = None


@executor(
    "chaos.outage",
    description="Always fails as unavailable, like a service that is down; its executors name echo as "
    "the type that can stand in for it (Correction Mode reroutes to it).",
    fallback=["echo"],
)
async def outage(params: dict[str, Any], ctx: TaskContext) -> None:
    raise TaskFailed(ErrorClass.unavailable, "chaos: the service is down")


@executor("chaos.flaky", description="Fails the first params.failTimes attempts, then succeeds.")
async def flaky(params: FlakyParams, ctx: TaskContext) -> Any:
    if ctx.attempt <= params.fail_times:
        raise TaskFailed(params.error_class, f"chaos: attempt {ctx.attempt} fails on purpose")
    return params.output if params.output is not None else {"attempt": ctx.attempt}


class HangParams(BaseModel):
    seconds: float = Field(3600, ge=0)


@executor(
    "chaos.hang",
    description="Sleeps params.seconds (past its timeout, to test timeouts).",
    tunable={"timeout": "x2"},  # the task's timeout: a longer one lets it finish
)
async def hang(params: HangParams, ctx: TaskContext) -> dict[str, Any]:
    await asyncio.sleep(params.seconds)
    return {"slept": params.seconds}


class CrashParams(BaseModel):
    spare: bool = False  # return at once instead (to mix harmless tasks of this type with a poison one)


@executor("chaos.crash", description="Kills the executor process (poison-message tests). Needs --allow-crash.")
async def crash(params: CrashParams, ctx: TaskContext) -> dict[str, Any]:
    if params.spare:
        return {"spared": True}
    if not ctx.options.allow_crash:
        raise TaskFailed("permanent", "chaos.crash is disabled on this executor (start it with --allow-crash)")
    os._exit(70)
