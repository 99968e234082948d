"""shell.run: run a command. Refused unless the executor was started with --allow-shell."""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

from pydantic import BaseModel, Field

from executors.registry import TaskContext, TaskFailed, executor


class ShellParams(BaseModel):
    command: str | list[str]
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    max_output_bytes: int = Field(100_000, gt=0)


@executor("shell.run", description="Runs a command (no shell); returns {exit_code, stdout, stderr}.")
async def run(params: ShellParams, ctx: TaskContext) -> dict[str, Any]:
    if not ctx.options.allow_shell:
        raise TaskFailed("permanent", "shell.run is disabled on this executor (start it with --allow-shell)")
    argv = shlex.split(params.command) if isinstance(params.command, str) else params.command
    if not argv:
        raise TaskFailed("invalid_input", "command is empty")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=params.cwd,
            env=params.env or None,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise TaskFailed("invalid_input", f"cannot run {argv[0]!r}: {exc}") from exc
    try:
        stdout, stderr = await proc.communicate()
    except asyncio.CancelledError:
        proc.kill()
        raise
    limit = params.max_output_bytes
    result = {
        "exit_code": proc.returncode,
        "stdout": stdout[:limit].decode(errors="replace"),
        "stderr": stderr[:limit].decode(errors="replace"),
    }
    if proc.returncode != 0:
        raise TaskFailed("permanent", f"command exited with {proc.returncode}", result)
    return result
