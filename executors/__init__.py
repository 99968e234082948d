"""Executor agents: the runtime and the plugin API for task types.

Write a task type::

    from executors import TaskContext, TaskFailed, executor

    @executor("text.reverse", description="Reverse a string")
    async def reverse(params: dict, ctx: TaskContext) -> dict:
        if "text" not in params:
            raise TaskFailed("invalid_input", "params.text is required")
        return {"text": params["text"][::-1]}

and run it with ``dagsmith executor --module mypackage.tasks --types text.reverse``, or publish
it under the ``dagsmith.executors`` entry-point group.
"""

from executors.registry import ExecutorSpec, Registry, TaskContext, TaskFailed, executor, registry

__all__ = ["ExecutorSpec", "Registry", "TaskContext", "TaskFailed", "executor", "registry"]
