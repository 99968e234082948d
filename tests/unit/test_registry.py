"""Task types registered as functions and as classes."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from pydantic import BaseModel

from dagsmith.errors import DagsmithError
from dagsmith.messages import TaskMessage
from executors.registry import Executor, ExecutorOptions, Registry, TaskContext, executor
from executors.runtime import PluginStartError, execute, start_plugins, stop_plugins


class Params(BaseModel):
    n: int


def make_registry() -> tuple[Registry, list[str]]:
    """A registry with one class-based type that counts its calls, and a log of start/stop."""
    local = Registry()
    journal: list[str] = []

    @executor("t.counter", into=local, tunable={"n": "x2"})
    class Counter(Executor):
        """Adds params.n to a total kept between tasks."""

        def __init__(self) -> None:
            self.total = 0

        async def start(self) -> None:
            journal.append("start")
            self.total = 100

        def stop(self) -> None:  # sync is fine too
            journal.append("stop")

        async def run(self, params: Params, ctx: TaskContext) -> dict[str, int]:
            self.total += params.n
            return {"total": self.total}

    return local, journal


def message(**params: Any) -> TaskMessage:
    return TaskMessage(task_id=1, attempt=1, workflow_id="w", name="t", type="t.counter", params=params)


def test_a_class_registers_like_a_function() -> None:
    local, _ = make_registry()
    spec = local.get("t.counter")
    assert spec is not None and spec.instance is not None
    assert spec.params_model is Params and spec.is_async
    assert spec.description == "Adds params.n to a total kept between tasks."
    assert spec.capability().tunable == {"n": "x2"}


def test_a_class_keeps_state_between_tasks_from_start_to_stop() -> None:
    local, journal = make_registry()
    spec = local.get("t.counter")
    assert spec is not None

    async def scenario() -> list[Any]:
        started = await start_plugins([spec])
        outcomes = [await execute(spec, message(n=n), ExecutorOptions(), 1000) for n in (1, 2)]
        bad = await execute(spec, message(n="x"), ExecutorOptions(), 1000)
        await stop_plugins(started)
        return [*outcomes, bad]

    first, second, bad = asyncio.run(scenario())
    assert first == (True, {"total": 101}, None) and second == (True, {"total": 103}, None)
    assert not bad[0] and bad[2].error_class == "invalid_input"
    assert journal == ["start", "stop"]


def test_a_failing_start_names_the_type_and_stops_those_already_started() -> None:
    local, journal = make_registry()

    @executor("t.broken", into=local)
    class Broken(Executor):
        def start(self) -> None:
            raise ConnectionError("model server unreachable")

        def run(self, params: Any, ctx: TaskContext) -> None:
            raise AssertionError("never runs")

    specs = [local.get("t.counter"), local.get("t.broken")]
    with pytest.raises(PluginStartError, match=re.escape("'t.broken' failed to start: ConnectionError: model server")):
        asyncio.run(start_plugins(specs))  # type: ignore[arg-type]
    assert journal == ["start", "stop"]


def test_a_class_that_is_not_an_executor_is_refused() -> None:
    with pytest.raises(TypeError, match=re.escape("subclass executors.Executor")):

        @executor("t.plain", into=Registry())
        class Plain:
            def run(self, params: Any, ctx: TaskContext) -> None:
                pass


def test_two_plugins_for_one_type_conflict() -> None:
    local, _ = make_registry()
    with pytest.raises(DagsmithError, match="registered twice"):

        @executor("t.counter", into=local)
        def other(params: Any, ctx: TaskContext) -> None:
            pass


def test_types_that_need_a_flag_are_neither_declared_nor_accepted_by_name_without_it() -> None:
    from typer.testing import CliRunner

    from dagsmith.cli import app
    from executors.registry import registry as builtins
    from executors.runtime import ExecutorRuntime
    from tests.conftest import make_settings

    assert ExecutorOptions().needs("shell.run") == "--allow-shell"
    assert ExecutorOptions(allow_shell=True).needs("shell.run") is None
    assert (
        ExecutorOptions().needs("python.call")
        and ExecutorOptions(python_modules=("json",)).needs("python.call") is None
    )
    assert ExecutorOptions().needs("echo") is None
    import executors.builtins  # noqa: F401

    runtime = ExecutorRuntime(make_settings("postgresql://unused/x", "unused"), builtins.select(["*"]))
    assert {"shell.run", "python.call", "chaos.crash"}.isdisjoint(runtime.specs) and "echo" in runtime.specs
    named = CliRunner().invoke(app, ["executor", "--types", "echo,shell.run"])
    assert named.exit_code == 2 and "shell.run runs only on an executor started with --allow-shell" in named.output


def test_exclusions_alone_select_every_other_type() -> None:
    """``--types '!chaos.*'`` means every type but chaos.*, not nothing."""
    local = Registry()
    for name in ("chaos.fail", "chaos.crash", "echo", "text.upper"):
        executor(name, into=local)(lambda params, ctx: None)
    assert [s.type for s in local.select(["!chaos.*"])] == ["echo", "text.upper"]
    assert [s.type for s in local.select(["!chaos.*", "!echo"])] == ["text.upper"]
    assert [s.type for s in local.select(["text.*", "!chaos.*"])] == ["text.upper"]  # includes still limit
    assert local.select([]) == []  # no pattern at all selects nothing (the CLI says so)
