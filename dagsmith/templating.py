"""Sandboxed templates for task params and workflow outputs.

``{{ params.x }}`` and ``{{ tasks.<name>.output.<path> }}`` are Jinja2 expressions evaluated in an
immutable sandbox: no attribute starting with ``_``, no mutation, no unbounded string or range
building. A string that is exactly one ``{{ expression }}`` renders to the expression's native value
(a dict stays a dict); any other template renders to a string. Nothing here calls ``eval``.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
import jmespath
import orjson
from jinja2 import nodes
from jinja2.nativetypes import NativeCodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dagsmith.errors import TemplateError

# Any string longer than this built by ``*`` inside a template is refused before it is built.
MAX_BUILT_STRING = 1_000_000


def _concat(values: Iterator[Any]) -> Any:
    # Unlike Jinja's own native concat, never literal_eval a string: "123" from an output stays "123".
    parts = list(values)
    if len(parts) == 1:
        if isinstance(parts[0], jinja2.Undefined):
            str(parts[0])  # raises UndefinedError naming what is missing
        return parts[0]
    return "".join(str(p) for p in parts)


def _jmespath(value: Any, expression: str) -> Any:
    return jmespath.search(expression, value)


def _tojson(value: Any) -> str:
    return orjson.dumps(value).decode()


def _fromjson(value: str) -> Any:
    return orjson.loads(value)


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = NativeCodeGenerator
    concat = staticmethod(_concat)  # type: ignore[assignment]
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Outputs are JSON: ``output.items`` means the key "items", never the dict method.
        if isinstance(obj, dict):
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            if isinstance(right, int | float) and abs(right) > 100:
                raise TemplateError("exponent too large in template (limit 100)")
            return operator.pow(left, right)
        # op == "*": refuse to build huge strings or lists ('a' * 10**9).
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_BUILT_STRING:
                raise TemplateError(f"template builds a sequence of {len(seq) * n} items (limit {MAX_BUILT_STRING})")
        return operator.mul(left, right)


@lru_cache(maxsize=1)
def environment() -> _Environment:
    env = _Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["jmespath"] = _jmespath
    env.filters["tojson"] = _tojson
    env.filters["fromjson"] = _fromjson
    return env


def is_template(value: object) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def iter_templates(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Yield ``(path, template)`` for every template string inside a JSON-like value."""
    if isinstance(value, str):
        if is_template(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_templates(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from iter_templates(item, f"{path}[{i}]")


@dataclass(frozen=True)
class References:
    tasks: frozenset[str]
    params: frozenset[str]


def _parse(template: str) -> nodes.Template:
    """Parse, allowing only ``{{ expressions }}`` (and comments): no ``{% for %}``, ``{% set %}``,
    macros or other statements. Expressions are linear in their input (ranges and built sequences
    are capped), so a template can never loop for ever inside the controller."""
    try:
        tree = environment().parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message} (line {exc.lineno})") from exc
    for node in tree.body:
        if not isinstance(node, nodes.Output):
            raise TemplateError(
                f"templates may only contain {{{{ expressions }}}}; {{% {type(node).__name__.lower()} %}} "
                "blocks are not supported"
            )
    return tree


@lru_cache(maxsize=4096)
def references(template: str) -> References:
    """The task names and workflow params a template refers to. Raises TemplateError on bad syntax."""
    tree = _parse(template)
    tasks: set[str] = set()
    params: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, nodes.Getattr | nodes.Getitem)
        base = node.node
        if not isinstance(base, nodes.Name):
            continue
        if isinstance(node, nodes.Getattr):
            key: Any = node.attr
        elif isinstance(node.arg, nodes.Const):
            key = node.arg.value
        else:
            continue
        if base.name == "tasks":
            tasks.add(str(key))
        elif base.name == "params":
            params.add(str(key))
    return References(frozenset(tasks), frozenset(params))


def value_references(value: Any) -> frozenset[str]:
    """All task names referenced anywhere inside a JSON-like value."""
    found: set[str] = set()
    for _, template in iter_templates(value, ""):
        found |= references(template).tasks
    return frozenset(found)


@lru_cache(maxsize=4096)
def _compile(template: str) -> jinja2.Template:
    env = environment()
    return env.from_string(_parse(template))


def render(value: Any, context: dict[str, Any], *, max_bytes: int, path: str = "") -> Any:
    """Render every template inside ``value``; other values pass through unchanged.

    Raises TemplateError naming the path of the failing template, or if a rendered string is
    larger than ``max_bytes``.
    """
    if isinstance(value, str):
        if not is_template(value):
            return value
        try:
            result = _compile(value).render(context)
        except TemplateError as exc:
            raise TemplateError(f"{path or 'template'}: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{path or 'template'}: {exc}") from exc
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise TemplateError(f"{path or 'template'}: {type(exc).__name__}: {exc}") from exc
        try:
            size = len(result) if isinstance(result, str) else len(orjson.dumps(result))
        except TypeError:
            raise TemplateError(
                f"{path or 'template'}: renders to a {type(result).__name__}, which is not JSON data"
            ) from None
        if size > max_bytes:
            raise TemplateError(f"{path or 'template'}: rendered value is {size} bytes, over the limit of {max_bytes}")
        return result
    if isinstance(value, dict):
        return {k: render(v, context, max_bytes=max_bytes, path=f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context, max_bytes=max_bytes, path=f"{path}[{i}]") for i, v in enumerate(value)]
    return value
