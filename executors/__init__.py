"""Executor agents: the runtime and the plugin API for task types.

Write a task type::

    from executors import TaskContext, TaskFailed, executor

    @executor("text.reverse", description="Reverse a string")
    async def reverse(params: dict, ctx: TaskContext) -> dict:
        if "text" not in params:
            raise TaskFailed("invalid_input", "params.text is required")
        return {"text": params["text"][::-1]}

and run it with ``dagsmith executor --module mypackage.tasks --types text.reverse``, or publish
it under the ``dagsmith.executors`` entry-point group. A type that keeps something between tasks
(a client, a loaded model) is a class: subclass :class:`Executor`, define ``run(params, ctx)``
and, if needed, ``start()``/``stop()``, and decorate the class the same way.
"""

from executors.registry import Executor, ExecutorSpec, Registry, TaskContext, TaskFailed, executor, registry

__all__ = ["Executor", "ExecutorSpec", "Registry", "TaskContext", "TaskFailed", "executor", "registry"]
