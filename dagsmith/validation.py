"""Whole-document validation: shape (pydantic), then the graph (duplicates, cycles, references).

Every problem of a stage is collected with its path, so a user fixes them together. The graph is
only checked once the shape is right (a graph cannot be read from a malformed document), and
references are only checked for ancestry once there is no cycle: a document with a shape error
and a cycle reports the shape error first, then the cycle.
"""

from __future__ import annotations

import difflib
import gc
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, get_args

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from dagsmith import expect
from dagsmith.errors import SpecError, TemplateError
from dagsmith.spec import (
    MAX_DEFAULT_OUTPUT_SINKS,
    PATTERN_MEANINGS,
    SUBMISSION,
    CorrectionMode,
    TaskSpec,
    WorkflowDocument,
)
from dagsmith.templating import CONTEXT_FIELDS, CONTEXT_NAMES, References, iter_templates, references

Problem = dict[str, Any]


@dataclass(frozen=True)
class Limits:
    """Size limits for one workflow. Defaults match :class:`dagsmith.settings.Settings`."""

    max_tasks: int = 50_000
    max_params_bytes: int = 65_536
    max_dependencies: int = 10_000
    max_depth: int = 64  # nesting of objects and lists anywhere in the document
    max_nodes: int = 5_000_000  # values in the whole document (a 50,000-task spec has ~1M)


@dataclass(frozen=True)
class ValidatedWorkflow:
    document: WorkflowDocument
    order: list[str]  # topological order, roots first
    refs: dict[str, frozenset[str]]  # task name -> task names its params refer to
    children: dict[str, list[str]]
    warnings: list[Problem] = field(default_factory=list)

    @property
    def tasks(self) -> list[TaskSpec]:
        return list(self.document.spec.tasks)


def load_document(body: bytes | str, content_type: str = "") -> Any:
    """Parse JSON or YAML text into plain data. Raises SpecError for unparseable text."""
    try:
        return _load(body, content_type)
    except RecursionError:
        raise SpecError([_problem("", "the document is nested too deeply to parse", "limit")]) from None


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML says keys are unique;
    PyYAML keeps the last silently, kubectl refuses the document)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: its keys may be given again here, which overrides them
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool):
                continue  # a complex key: the safe loader itself refuses it (not hashable)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found the key {key!r} twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def split_documents(text: str) -> list[str]:
    """The YAML documents of ``text`` (separated by ``---``), each as its own text, empty ones
    left out, so each can be submitted as written. Text that does not parse is returned whole:
    the server then says what is wrong with it, and where."""
    if re.search(r"^%", text, re.MULTILINE):
        return [text]  # directives (%TAG) belong to their document: not cut apart here
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return [text]
    # Each slice starts at the beginning of its first line, so an indented document keeps the
    # indentation of its first line like the rest.
    docs = [text[n.start_mark.index - n.start_mark.column : n.end_mark.index] for n in nodes if n is not None]
    return [d for d in docs if d.strip()] or [text]


def _load(body: bytes | str, content_type: str) -> Any:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    if "json" in content_type:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise SpecError([_problem("", f"body is not valid JSON: {exc}", "parse")]) from exc
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # pyyaml's own text spans several lines with a caret drawing; its one-line problem suffices.
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError([_problem("", f"body is not valid YAML or JSON{where}: {problem}", "parse")]) from exc
    if len(docs) != 1:
        raise SpecError([_problem("", f"expected one workflow document, found {len(docs)}", "parse")])
    return docs[0]


@contextmanager
def bulk() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many objects at once (a 50,000-task spec
    makes hundreds of thousands): collection passes triggered by the allocations, not garbage,
    cost about half the time. Reference counting still frees everything; the collector resumes after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def validate(raw: Any, limits: Limits = Limits(), known_types: Iterable[str] | None = None) -> ValidatedWorkflow:
    """Validate a parsed document. Raises SpecError listing every problem; returns the checked workflow."""
    with bulk():
        return _validate(raw, limits, known_types)


def _validate(raw: Any, limits: Limits, known_types: Iterable[str] | None) -> ValidatedWorkflow:
    if not isinstance(raw, Mapping):
        raise SpecError([_problem("", "a workflow document must be an object", "type")])
    shape = _shape_problem(raw, limits)
    if shape is not None:
        raise SpecError([shape])
    tasks_raw = raw.get("spec", {}).get("tasks") if isinstance(raw.get("spec"), Mapping) else None
    if isinstance(tasks_raw, list) and len(tasks_raw) > limits.max_tasks:
        raise SpecError(
            [
                _problem(
                    "spec.tasks",
                    f"{len(tasks_raw)} tasks is over the limit of {limits.max_tasks} (DAGSMITH_MAX_TASKS)",
                    "limit",
                )
            ]
        )
    try:
        doc = WorkflowDocument.model_validate(raw, context={SUBMISSION: True})
    except ValidationError as exc:
        raise SpecError(_pydantic_problems(exc)) from None
    problems = _graph_problems(doc, limits)
    order, cycle_problems = _topological_order(doc)
    problems += cycle_problems
    # With a cycle, the order holds the tasks outside it and outside what depends on it: their
    # references are still checked, so one submission lists every problem it can.
    refs, ref_problems = _reference_problems(doc, order)
    problems += ref_problems
    if problems:
        raise SpecError(problems)
    children: dict[str, list[str]] = {t.name: [] for t in doc.spec.tasks}
    for task in doc.spec.tasks:
        for dep in task.depends_on:
            children[dep].append(task.name)
    warnings: list[Problem] = []
    if known_types is not None:
        known = set(known_types)
        unknown: dict[str, list[int]] = {}
        for i, task in enumerate(doc.spec.tasks):
            if task.type not in known:
                unknown.setdefault(task.type, []).append(i)
        for task_type, where in unknown.items():  # one warning per type, not per task
            more = f" ({len(where)} tasks)" if len(where) > 1 else ""
            warnings.append(
                _problem(f"spec.tasks[{where[0]}].type", unknown_type(task_type, known) + more, "unknown_type")
            )
    retry_warning = _policy_retries_warning(doc)
    if retry_warning is not None:
        warnings.append(retry_warning)
    if doc.spec.output is None:
        sinks = sum(1 for names in children.values() if not names)
        if sinks > MAX_DEFAULT_OUTPUT_SINKS:
            warnings.append(
                _problem(
                    "spec.output",
                    f"no spec.output and {sinks} sink tasks: the default result gathers at most "
                    f"{MAX_DEFAULT_OUTPUT_SINKS} sinks' outputs, so this workflow's result will be null; set "
                    "spec.output to choose what it returns (every task's output stays readable at "
                    "/v1/workflows/{id}/tasks)",
                    "output_too_wide",
                )
            )
    return ValidatedWorkflow(doc, order, refs, children, warnings)


def params_problems(params: dict[str, Any], limits: Limits, path: str = "params") -> list[Problem]:
    """What a task's params given outside a workflow document (a surgery's) must satisfy, as a
    submitted task's do: depth, NUL characters, 64-bit integers, and the size limit."""
    problem = _shape_problem(params, limits)
    if problem is not None:
        inner = problem["path"]
        return [{**problem, "path": f"{path}.{inner}" if inner and not inner.startswith("[") else f"{path}{inner}"}]
    too_big = _params_size_problem(params, limits, path)
    return [too_big] if too_big else []


def _params_size_problem(params: dict[str, Any], limits: Limits, path: str) -> Problem | None:
    size = len(orjson.dumps(params, default=str))
    if size > limits.max_params_bytes:
        message = f"params are {size} bytes, over the limit of {limits.max_params_bytes} (DAGSMITH_MAX_PARAMS_BYTES)"
        return _problem(path, message, "limit")
    return None


# What Postgres's JSONB cannot hold: NUL, and UTF-16 surrogates (a YAML "\ud800" escape yields one
# alone, which is not Unicode text at all).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _text_problem(text: str) -> str | None:
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "a NUL character (\\u0000), which cannot be stored"
    return f"an unpaired surrogate (\\u{ord(found.group()):04x}), which is not valid Unicode text"


def _scalar_problem(value: Any, path: str) -> Problem | None:
    if isinstance(value, str):
        problem = _text_problem(value)
        if problem is not None:
            return _problem(path, f"contains {problem}", "type")
    elif isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        # The value is not repeated: it may be a secret (a long PIN or account number).
        return _problem(path, "an integer that does not fit in 64 bits (write it as a string)", "type")
    return None


def _shape_problem(raw: Any, limits: Limits) -> Problem | None:
    """Depth, size, 64-bit integers, NUL characters and aliases (YAML anchors can build shared or
    cyclic structures), checked without recursion, before any other validation looks at the
    document. Scalars are checked in place; only containers go on the stack."""
    stack: list[tuple[Any, int, str]] = [(raw, 1, "")]
    seen = 0
    containers: set[int] = set()
    while stack:
        value, depth, path = stack.pop()
        if depth > limits.max_depth:
            return _problem(path, f"nested more than {limits.max_depth} levels deep", "limit")
        if id(value) in containers:
            # Reachable twice: plain JSON and YAML without anchors never produce that.
            return _problem(path, "the document repeats itself through YAML anchors/aliases (not supported)", "alias")
        containers.add(id(value))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        seen += len(value)
        if seen > limits.max_nodes:
            return _problem("", f"the document has more than {limits.max_nodes} values", "limit")
        for key, child in items:
            key_problem = _text_problem(key) if isinstance(key, str) else None
            if key_problem is not None:
                return _problem(path, f"a key contains {key_problem}", "type")
            if isinstance(child, dict | list):
                stack.append(
                    (
                        child,
                        depth + 1,
                        f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key),
                    )
                )
            elif isinstance(child, str | int):
                problem = _scalar_problem(
                    child, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
                )
                if problem is not None:
                    return problem
    return None


def _policy_retries_warning(doc: WorkflowDocument) -> Problem | None:
    """A task that says ``retry.limit`` lower than ``correction.maxRetries`` may still be retried
    that often by Correction Mode: said once, at the first such task, since a limit of 0 often
    means "never run this twice"."""
    correction = doc.spec.correction
    if correction.mode == CorrectionMode.off:
        return None
    low = [
        i
        for i, task in enumerate(doc.spec.tasks)
        if "limit" in task.retry.model_fields_set and task.retry.limit < correction.max_retries
    ]
    if not low:
        return None
    first = doc.spec.tasks[low[0]].retry.limit
    more = f" (and {len(low) - 1} more tasks)" if len(low) > 1 else ""
    return _problem(
        f"spec.tasks[{low[0]}].retry.limit",
        f"limit is {first}, but Correction Mode ({correction.mode.value}) may retry this task up to "
        f"correction.maxRetries ({correction.max_retries}) times{more}; to hold every task to its own limit, set "
        "spec.correction.maxRetries: 0 (or mode: off)",
        "policy_retries",
    )


def _problem(path: str, message: str, code: str) -> Problem:
    return {"path": path, "message": message, "code": code}


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed at ``loc`` (used to suggest a fix for an unknown key)."""
    model: Any = WorkflowDocument
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        info = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        if info is None:
            return []
        annotation = info.annotation
        candidates = [annotation, *get_args(annotation)]
        for arg in list(candidates):
            candidates += list(get_args(arg))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return []


def _pydantic_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        message = describe_error(err)
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            close = difflib.get_close_matches(key, _known_keys(loc[:-1]), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            elif len(loc) == 1 and key in _known_keys(("spec",)):
                message += " (it belongs under spec: check the indentation)"
        elif err["type"] == "list_type" and isinstance(err["input"], str):
            message += f" (write [{err['input']}])"
        elif err["type"] == "string_type" and isinstance(err["input"], bool):
            message += " (in YAML, quote words like off or yes)"  # YAML 1.1 reads bare yes/no/on/off as booleans
        problems.append(_problem(_loc_to_path(loc), message, str(err["type"])))
    return problems


def describe_error(err: Mapping[str, Any]) -> str:
    """One pydantic error in the words of someone who wrote the document (its path is said apart).

    The spec's validator and the API's other request bodies both speak this way."""
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown field {str(err['loc'][-1])!r}"
    elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        message = f"should be an object (key: value pairs), not {_kind(err['input'])}"
    elif err["type"] == "list_type":
        message = f"should be a list, not {_kind(err['input'])}"
    elif err["type"] == "missing":
        message = f"required field {str(err['loc'][-1])!r} is missing"
    elif err["type"] == "string_pattern_mismatch":
        pattern = err["ctx"]["pattern"]
        meaning = PATTERN_MEANINGS.get(pattern)
        message = f"{_short(err['input'])} does not match {pattern}" + (f" ({meaning})" if meaning else "")
    elif err["type"] == "literal_error":
        message = f"{_short(err['input'])} is not allowed here: {message}"
    elif err["type"] == "string_type" and isinstance(err["input"], bool):
        message = f"should be text, not the boolean {str(err['input']).lower()}"
    return message


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a refused value is echoed, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


def _kind(value: Any) -> str:
    """How a user would name what they wrote."""
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return f"the text {value[:40]!r}"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _graph_problems(doc: WorkflowDocument, limits: Limits) -> list[Problem]:
    problems: list[Problem] = []
    # The workflow's params are read by every task's templates: held to the same limit as a task's.
    too_big = _params_size_problem(doc.spec.params, limits, "spec.params")
    if too_big:
        problems.append(too_big)
    seen: dict[str, int] = {}
    for i, task in enumerate(doc.spec.tasks):
        if task.name in seen:
            problems.append(
                _problem(
                    f"spec.tasks[{i}].name",
                    f"duplicate task name {task.name!r} (first used by spec.tasks[{seen[task.name]}])",
                    "duplicate",
                )
            )
        else:
            seen[task.name] = i
    for i, task in enumerate(doc.spec.tasks):
        if len(task.depends_on) > limits.max_dependencies:
            problems.append(
                _problem(
                    f"spec.tasks[{i}].dependsOn",
                    f"{len(task.depends_on)} dependencies is over the limit of {limits.max_dependencies}",
                    "limit",
                )
            )
        for d in sorted(d for d, n in Counter(task.depends_on).items() if n > 1):
            problems.append(_problem(f"spec.tasks[{i}].dependsOn", f"{d!r} is listed more than once", "duplicate"))
        for j, dep in enumerate(task.depends_on):
            if dep not in seen:
                close = difflib.get_close_matches(dep, list(seen)[:5000], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    _problem(f"spec.tasks[{i}].dependsOn[{j}]", f"no task is named {dep!r}{hint}", "unknown_task")
                )
        too_big = _params_size_problem(task.params, limits, f"spec.tasks[{i}].params")
        if too_big:
            problems.append(too_big)
        if task.expect is not None:
            wrong = expect.problem(task.expect)
            if wrong:
                problems.append(_problem(f"spec.tasks[{i}].expect", wrong, "schema"))
        for key in task.secrets:
            if key not in task.params:
                problems.append(
                    _problem(
                        f"spec.tasks[{i}].secrets",
                        f"{key!r} is not one of this task's params",
                        "unknown_param",
                    )
                )
    return problems


def _topological_order(doc: WorkflowDocument) -> tuple[list[str], list[Problem]]:
    """Kahn's algorithm; on a cycle, report one cycle as ``a → b → a``."""
    names = list(dict.fromkeys(t.name for t in doc.spec.tasks))  # duplicates are reported elsewhere
    known = set(names)
    indegree = {n: 0 for n in names}
    children: dict[str, list[str]] = {n: [] for n in names}
    seen: set[str] = set()
    for task in doc.spec.tasks:
        if task.name in seen:
            continue
        seen.add(task.name)
        for dep in set(task.depends_on):
            if dep in known:
                indegree[task.name] += 1
                children[dep].append(task.name)
    queue = deque(n for n in names if indegree[n] == 0)
    order: list[str] = []
    while queue:
        name = queue.popleft()
        order.append(name)
        for child in children[name]:
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)
    if len(order) == len(indegree):
        return order, []
    cycle = _find_cycle({n for n, d in indegree.items() if d > 0}, doc)
    index: dict[str, int] = {}
    for i, t in enumerate(doc.spec.tasks):
        index.setdefault(t.name, i)
    text = " → ".join([*cycle, cycle[0]])
    return order, [_problem(f"spec.tasks[{index[cycle[0]]}].dependsOn", f"dependency cycle: {text}", "cycle")]


def _find_cycle(stuck: set[str], doc: WorkflowDocument) -> list[str]:
    deps: dict[str, list[str]] = {}
    for t in doc.spec.tasks:  # the first task of a duplicated name, as _topological_order counts it
        if t.name in stuck and t.name not in deps:
            deps[t.name] = [d for d in t.depends_on if d in stuck]
    # Every stuck node has a stuck dependency, so walking dependencies must revisit a node.
    start = min(stuck)
    path: list[str] = []
    position: dict[str, int] = {}
    node = start
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = deps[node][0]
    cycle = path[position[node] :]
    cycle.reverse()  # present it in execution order: a dependency before its dependent
    first = cycle.index(min(cycle))  # and start at the same place every time
    return cycle[first:] + cycle[:first]


def _reference_problems(doc: WorkflowDocument, order: list[str]) -> tuple[dict[str, frozenset[str]], list[Problem]]:
    problems: list[Problem] = []
    refs: dict[str, frozenset[str]] = {}
    names = {t.name for t in doc.spec.tasks}
    deps = {t.name: t.depends_on for t in doc.spec.tasks}
    topo = {n: i for i, n in enumerate(order)}  # without the tasks in or after a cycle, if any
    # References to tasks that are not direct dependencies, checked together at the end.
    indirect: list[tuple[str, str, str]] = []  # (referenced task, referring task, path)
    for i, task in enumerate(doc.spec.tasks):
        found: set[str] = set()
        for path, template in iter_templates(task.params, f"spec.tasks[{i}].params"):
            found_here, own = template_problems(template, path, doc.spec.params)
            problems += own
            if found_here is None:
                continue
            for ref in sorted(found_here.tasks):
                if ref not in names:
                    problems.append(
                        _problem(path, f"refers to tasks.{ref}, but no task is named {ref!r}", "unknown_task")
                    )
                elif ref == task.name:
                    problems.append(_problem(path, f"task {task.name!r} refers to its own output", "reference"))
                elif ref not in deps[task.name]:
                    # A task in or after a dependency cycle (reported) has no upstream to judge by.
                    if task.name in topo:
                        indirect.append((ref, task.name, path))
                else:
                    found.add(ref)
        refs[task.name] = frozenset(found)
    if indirect:
        upstream = _descendants({ref for ref, _, _ in indirect}, indirect, deps, topo)
        for ref, name, path in indirect:
            if name in upstream[ref]:
                refs[name] = refs[name] | {ref}
            else:
                problems.append(
                    _problem(
                        path,
                        f"refers to tasks.{ref}, which is not upstream of {name!r}; "
                        f"add {ref!r} to dependsOn (directly or through another task)",
                        "reference",
                    )
                )
    for path, template in iter_templates(doc.spec.output, "spec.output"):
        try:
            found_here = references(template)
        except TemplateError as exc:
            problems.append(_problem(path, str(exc), "template"))
            continue
        problems += _unknown_names(path, found_here.unknown)
        if "task" in found_here.names:
            problems.append(
                _problem(
                    path,
                    "refers to 'task', which only a task's params can read (the output has no task)",
                    "unknown_name",
                )
            )
        problems += _unknown_fields(path, {f for f in found_here.fields if f[0] != "task"})
        for ref in sorted(found_here.tasks - names):
            problems.append(_problem(path, f"refers to tasks.{ref}, but no task is named {ref!r}", "unknown_task"))
        for param in sorted(found_here.params - set(doc.spec.params)):
            problems.append(
                _problem(path, f"refers to params.{param}, which spec.params does not define", "unknown_param")
            )
    return refs, problems


def unknown_type(task_type: str, known: Iterable[str]) -> str:
    """The warning for a task type no executor has declared, with the close one if there is."""
    close = difflib.get_close_matches(task_type, sorted(known), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"no executor has declared task type {task_type!r} yet{hint}; the task waits until one does"


def template_problems(
    template: str, path: str, workflow_params: Mapping[str, Any]
) -> tuple[References | None, list[Problem]]:
    """What one task-param template reads (None if it does not parse) and its problems on its own:
    syntax, names and fields no template can read, workflow params ``spec.params`` lacks. Which
    tasks it may read is a question of the graph, answered by the caller."""
    try:
        found = references(template)
    except TemplateError as exc:
        return None, [_problem(path, str(exc), "template")]
    problems = [*_unknown_names(path, found.unknown), *_unknown_fields(path, found.fields)]
    for param in sorted(found.params):
        if param not in workflow_params:
            problems.append(
                _problem(path, f"refers to params.{param}, which spec.params does not define", "unknown_param")
            )
    return found, problems


def _unknown_names(path: str, names: frozenset[str]) -> list[Problem]:
    """A name a template reads that it could never find (``param.x`` for ``params.x``)."""
    problems = []
    for name in sorted(names):
        close = difflib.get_close_matches(name, CONTEXT_NAMES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        problems.append(
            _problem(
                path,
                f"refers to {name!r}, which templates cannot read (they read {', '.join(CONTEXT_NAMES)}){hint}",
                "unknown_name",
            )
        )
    return problems


def _unknown_fields(path: str, fields: Iterable[tuple[str, str]]) -> list[Problem]:
    """A field of ``workflow`` or ``task`` that does not exist (``task.greet`` for ``tasks.greet``)."""
    problems = []
    for root, name in sorted(fields):
        known = CONTEXT_FIELDS[root]
        if name in known:
            continue
        hint = f"; did you mean tasks.{name}?" if root == "task" else ""
        problems.append(
            _problem(
                path,
                f"refers to {root}.{name}, but {root} has only {', '.join(known)}{hint}",
                "unknown_name",
            )
        )
    return problems


def _descendants(
    candidates: set[str], queries: list[tuple[str, str, str]], deps: dict[str, list[str]], topo: dict[str, int]
) -> dict[str, set[str]]:
    """For each referenced task, the tasks downstream of it, as far as any task referring to it.

    One walk per referenced task, whatever the number of references to it, so a thousand tasks
    reading the same early output cost one walk, not a thousand (which made validation quadratic).
    The walk goes forward in topological order and stops past the last task that asks.
    """
    children: dict[str, list[str]] = {name: [] for name in deps}
    for name, parents in deps.items():
        for parent in parents:
            if parent in children:
                children[parent].append(name)
    reach: dict[str, int] = {}
    for ref, name, _ in queries:
        reach[ref] = max(reach.get(ref, -1), topo[name])
    found: dict[str, set[str]] = {}
    for ref in candidates:
        limit = reach[ref]
        seen: set[str] = set()
        stack = [ref]
        while stack:
            for child in children[stack.pop()]:
                if child not in seen and topo.get(child, limit + 1) <= limit:
                    seen.add(child)
                    stack.append(child)
        found[ref] = seen
    return found
