"""noop, sleep, echo."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, Field

from executors.registry import TaskContext, executor


@executor("noop", description="Does nothing and returns an empty object.")
async def noop(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    return {}


class SleepParams(BaseModel):
    seconds: float = Field(ge=0, le=86400)


@executor("sleep", description="Sleeps for params.seconds.", tunable={"seconds": "/2"})
async def sleep(params: SleepParams, ctx: TaskContext) -> dict[str, Any]:
    await asyncio.sleep(params.seconds)
    return {"slept": params.seconds}


@executor("echo", description="Returns its params as its output.")
async def echo(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
    return dict(params)
