"""Task types as plugins: a decorator registers a function, or a class, under a type name.

Plugins are found three ways: the built-ins, modules named on the command line, and installed
packages that declare an entry point in the ``dagsmith.executors`` group (the entry point names a
module; importing it registers its task types).
"""

from __future__ import annotations

import builtins
import fnmatch
import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, get_type_hints

from pydantic import BaseModel

from dagsmith.errors import DagsmithError, ErrorClass
from dagsmith.messages import Capability

ENTRY_POINT_GROUP = "dagsmith.executors"


class TaskFailed(DagsmithError):
    """Raise from a task to report a structured error; the error class decides what happens next."""

    def __init__(self, error_class: ErrorClass | str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error_class = ErrorClass(error_class)
        self.message = message
        self.details = details or {}


@dataclass(frozen=True)
class ExecutorOptions:
    """What an executor process allows its tasks to do (from settings and command-line flags)."""

    allow_shell: bool = False
    python_modules: tuple[str, ...] = ()
    http_allow_hosts: tuple[str, ...] = ()
    allow_crash: bool = False

    def needs(self, task_type: str) -> str | None:
        """The flag a built-in type needs and this executor was not given, or None. An executor
        does not declare a type it would refuse: in a fleet where only some executors enable
        ``shell.run``, its tasks must reach those, not fail for good on the others."""
        if task_type == "shell.run" and not self.allow_shell:
            return "--allow-shell"
        if task_type == "python.call" and not self.python_modules:
            return "--python-module MODULE"
        if task_type == "chaos.crash" and not self.allow_crash:
            return "--allow-crash"
        return None


@dataclass(frozen=True)
class TaskContext:
    task_id: int
    attempt: int
    workflow_id: str
    name: str
    type: str
    timeout: float | None
    options: ExecutorOptions = field(default_factory=ExecutorOptions)

    @property
    def idempotency_key(self) -> str:
        """Stable across redeliveries of one attempt: pass it to APIs that deduplicate side effects."""
        return f"{self.task_id}:{self.attempt}"


Handler = Callable[..., Any]


class Executor:
    """A task type as a class, for handlers that keep something between tasks: a client with its
    connection pool, a model loaded once.

    ``run(params, ctx)`` is the handler, exactly as a decorated function would be (sync or async;
    its first parameter's annotation may name a pydantic model of the params). ``start()`` runs
    once in each executor process that serves the type, before it takes a task (an exception
    there stops the process from starting, with the error); ``stop()`` runs once on the way out,
    after the running tasks finished. Both may be sync or async. The class is instantiated, with
    no arguments, when it is registered: keep ``__init__`` cheap and do the work in ``start``.
    """

    def start(self) -> Any:
        """Open what the tasks share (clients, models)."""

    def stop(self) -> Any:
        """Release what ``start`` opened."""

    def run(self, params: Any, ctx: TaskContext) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define run(params, ctx)")


@dataclass(frozen=True)
class ExecutorSpec:
    type: str
    handler: Handler
    description: str = ""
    params_model: builtins.type[BaseModel] | None = None
    repair: str | None = None  # the task type that repairs this type's bad input
    tunable: dict[str, str] = field(default_factory=dict)  # param -> "x2" | "/2" | ...
    fallback: tuple[str, ...] = ()  # task types that can stand in for this one (Correction Mode's reroute)
    instance: Executor | None = None  # for a class-based type: the object whose run() is the handler

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)

    def capability(self) -> Capability:
        return Capability(
            type=self.type,
            description=self.description,
            repair=self.repair,
            tunable=self.tunable,
            fallback=list(self.fallback),
        )


class Registry:
    def __init__(self) -> None:
        self._specs: dict[str, ExecutorSpec] = {}

    def register(self, spec: ExecutorSpec) -> None:
        existing = self._specs.get(spec.type)
        if existing is not None and _origin(existing) is not _origin(spec):
            raise DagsmithError(
                f"task type {spec.type!r} is registered twice ({_origin(existing)} and {_origin(spec)})"
            )
        self._specs[spec.type] = spec

    def get(self, task_type: str) -> ExecutorSpec | None:
        return self._specs.get(task_type)

    def types(self) -> list[str]:
        return sorted(self._specs)

    def select(self, patterns: Iterable[str]) -> list[ExecutorSpec]:
        """The registered types matching the glob patterns (``text.*``, ``noop``); ``!x`` excludes.
        Exclusions alone (``!chaos.*``) mean every type but those, as after ``*``."""
        patterns = list(patterns)
        exclude = [p[1:] for p in patterns if p.startswith("!")]
        include = [p for p in patterns if not p.startswith("!")] or (["*"] if exclude else [])
        return [
            self._specs[name]
            for name in self.types()
            if any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
        ]


registry = Registry()


def executor(
    task_type: str,
    *,
    description: str = "",
    repair: str | None = None,
    tunable: dict[str, str] | None = None,
    fallback: Iterable[str] = (),
    into: Registry | None = None,
) -> Callable[[Handler], Handler]:
    """Register the decorated function (or :class:`Executor` subclass) as the handler of ``task_type``.

    The handler receives the task's params and a :class:`TaskContext`, and returns the output
    (anything JSON-serialisable). If its first parameter is annotated with a pydantic model, the
    params are validated into that model first (bad params fail with ``invalid_input``). It may be
    sync (run in a thread) or async. ``repair``, ``tunable`` and ``fallback`` tell Correction Mode
    what it may do when such a task fails: insert a repair task of that type, retry with tuned
    params, or reroute to one of the fallback types (after those the workflow's spec names).
    """

    def register(fn: Handler) -> Handler:
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        instance = None
        handler = fn
        if inspect.isclass(fn):
            if not issubclass(fn, Executor):
                raise TypeError(f"@executor({task_type!r}) on class {fn.__name__}: subclass executors.Executor")
            instance = fn()
            handler = instance.run
        spec = ExecutorSpec(
            task_type, handler, doc, _params_model(handler), repair, dict(tunable or {}), tuple(fallback), instance
        )
        (into or registry).register(spec)
        return fn

    return register


def _origin(spec: ExecutorSpec) -> object:
    """What was decorated: the same function or class registered again is not a conflict."""
    return type(spec.instance) if spec.instance is not None else spec.handler


def _params_model(fn: Handler) -> type[BaseModel] | None:
    try:
        hints = get_type_hints(fn)
    except (NameError, TypeError):
        return None
    first = next(iter(inspect.signature(fn).parameters), None)
    annotation = hints.get(first) if first else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def load_plugins(modules: Iterable[str] = (), *, use_entry_points: bool = True) -> Registry:
    """Import entry-point plugins and the named modules; their decorators fill the registry."""
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            loaded = ep.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded(registry)
    for module in modules:
        importlib.import_module(module)
    return registry
