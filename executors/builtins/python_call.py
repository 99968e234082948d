"""python.call: call a function from a module the executor was started with."""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from pydantic import BaseModel, Field

from executors.registry import TaskContext, TaskFailed, executor
from executors.threads import THREADS


class CallParams(BaseModel):  # type: ignore[no-redef]  # pydantic-mypy: the alias "kwargs" clashes
    function: str = Field(description="'package.module:function'")
    args: list[Any] = Field(default_factory=list)
    keyword_args: dict[str, Any] = Field(default_factory=dict, validation_alias="kwargs")


@executor("python.call", description="Calls module:function (allowed modules only); returns {result}.")
async def call(params: CallParams, ctx: TaskContext) -> dict[str, Any]:
    module_name, _, attr = params.function.partition(":")
    if not attr:
        raise TaskFailed("invalid_input", "function must look like 'package.module:function'")
    allowed = ctx.options.python_modules
    if module_name not in allowed:
        raise TaskFailed(
            "invalid_input",
            f"module {module_name!r} is not allowed on this executor (start it with --python-module {module_name})",
            {"allowed": list(allowed)},
        )
    if attr.startswith("_"):
        raise TaskFailed("invalid_input", "private functions cannot be called")
    module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TaskFailed("invalid_input", f"{params.function} is not a function")
    # What the module itself offers: a function it defines, or one it lists in __all__. Not what
    # it imports (`from subprocess import run` would otherwise make subprocess callable too).
    exported = getattr(module, "__all__", None)
    if getattr(fn, "__module__", None) != module_name and not (isinstance(exported, list | tuple) and attr in exported):
        raise TaskFailed(
            "invalid_input",
            f"{params.function} is not defined by {module_name!r} (it comes from {getattr(fn, '__module__', '?')!r}); "
            f"only functions a module defines or lists in __all__ can be called",
        )
    if inspect.iscoroutinefunction(fn):
        result = await fn(*params.args, **params.keyword_args)
    else:
        # A daemon thread of its own, as every sync handler gets (executors/threads.py).
        result = await THREADS.run(functools.partial(fn, *params.args, **params.keyword_args))
    return {"result": result}
