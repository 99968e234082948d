"""Sandboxed templates for task params and workflow outputs.

``{{ params.x }}`` and ``{{ tasks.<name>.output.<path> }}`` are Jinja2 expressions evaluated in an
immutable sandbox: no attribute starting with ``_``, no mutation, no unbounded string or range
building. A string that is exactly one ``{{ expression }}`` renders to the expression's native value
(a dict stays a dict); any other template renders to a string. Nothing here calls ``eval``.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.filters
import jmespath
import orjson
from jinja2 import nodes
from jinja2.nativetypes import NativeCodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dagsmith.errors import TemplateError
from dagsmith.messages import without_nul

# What one expression may build, checked before it is built. A template is short, but nested
# powers, padding, replacements and repeated references grow exponentially with its length, so
# every operation that can amplify is bounded by the size of its result (strings and lists in
# characters or serialised bytes, integers in bits); the rest are linear in their input.
MAX_BUILT_STRING = 1_000_000
MAX_INT_BITS = 100_000  # about 30,000 decimal digits
MAX_FORMAT_WIDTH = 10_000  # widths and precisions in %-style and str.format specs

_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)(\{?)")


def _refuse_large(size: int, what: str) -> None:
    if size > MAX_BUILT_STRING:
        raise TemplateError(f"template builds {what} of {size} characters or items (limit {MAX_BUILT_STRING})")


def _check_format(fmt: str) -> None:
    """Refuse format strings whose widths could build a huge string (``'%999999999s'``)."""
    for match in _PERCENT_SPEC.finditer(fmt):
        for part in match.groups():
            if part == "*":
                raise TemplateError("template format strings may not take their width from an argument ('*')")
            if part and int(part) > MAX_FORMAT_WIDTH:
                raise TemplateError(f"template format width {part} is over the limit of {MAX_FORMAT_WIDTH}")
    for match in _BRACE_SPEC.finditer(fmt):
        if match.group(2):
            raise TemplateError("template format strings may not take their width from an argument ('{:{}}')")
        for number in re.findall(r"\d+", match.group(1)):
            if int(number) > MAX_FORMAT_WIDTH:
                raise TemplateError(f"template format width {number} is over the limit of {MAX_FORMAT_WIDTH}")


def _weight(value: Any) -> int:
    """Roughly how large a value is once written out (what repeating it multiplies)."""
    if isinstance(value, str):
        return len(value)
    try:
        return len(orjson.dumps(value, default=str))
    except TypeError:
        return len(str(value))


def _replaced_size(text: str, old: str, new: str, count: int = -1) -> int:
    hits = text.count(old) if old else len(text) + 1
    if count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(len(new) - len(old), 0)


def _check_str_call(text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Bound the result of a ``str`` method call before it runs. Returns the arguments to call it
    with (an iterable it had to read, now a list)."""
    if name == "join" and args:
        items = list(args[0])  # read once, here: a generator would be empty for the call
        _refuse_large(sum(_weight(v) for v in items) + max(len(items) - 1, 0) * len(text), "a string ('join')")
        return (items, *args[1:])
    if name == "translate" and args:
        table = args[0]
        values = table.values() if isinstance(table, dict) else table if isinstance(table, list | tuple) else ()
        longest = max((_weight(v) for v in values if v is not None), default=1)
        _refuse_large(len(text) * max(longest, 1), "a string ('translate')")
    elif name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _refuse_large(args[0], f"a padded string ('{name}')")
    elif name == "expandtabs":
        size = int(args[0] if args else kwargs.get("tabsize", 8))
        _refuse_large(len(text) + text.count("\t") * size, "a string ('expandtabs')")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        _refuse_large(_replaced_size(text, args[0], args[1], int(count)), "a string ('replace')")
    elif name in ("format", "format_map"):
        _check_format(text)
    return args


def _guarded_filter(name: str, check: Any) -> Any:
    """A built-in filter that first checks the size of what it would build. A check may return
    the arguments to call the filter with (an iterable it had to read, now a list)."""
    original = jinja2.filters.FILTERS[name]

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        checked = check(*args, **kwargs)
        return original(*(checked or args), **kwargs)

    return guarded


def _check_center(value: Any, width: int = 80) -> None:
    _refuse_large(len(str(value)) + int(width), "a padded string ('center')")


def _check_indent(value: Any, width: int | str = 4, *args: Any, **kwargs: Any) -> None:
    pad = len(width) if isinstance(width, str) else int(width)
    text = str(value)
    _refuse_large(len(text) + (text.count("\n") + 1) * pad, "an indented string ('indent')")


def _check_replace(*args: Any, **kwargs: Any) -> None:
    # The filter is called as replace(eval_context, value, old, new, count=None).
    value, old, new, *rest = args[1:]
    count = rest[0] if rest else kwargs.get("count")
    _refuse_large(
        _replaced_size(str(value), str(old), str(new), -1 if count is None else int(count)), "a string ('replace')"
    )


def _check_join(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    # join(eval_context, value, d="", attribute=None); value may be any iterable, read once here.
    items = list(args[1])
    sep = args[2] if len(args) > 2 else kwargs.get("d", "")
    _refuse_large(sum(_weight(v) for v in items) + len(items) * len(str(sep)), "a string ('join')")
    return (args[0], items, *args[2:])


def _check_format_filter(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_format(str(value))


def _check_wordwrap(*args: Any, **kwargs: Any) -> None:
    # wordwrap(environment, s, width=79, break_long_words=True, wrapstring=None, ...)
    text = str(args[1])
    width = int(args[2] if len(args) > 2 else kwargs.get("width", 79))
    wrap = args[4] if len(args) > 4 else kwargs.get("wrapstring") or "\n"
    _refuse_large(len(text) + (len(text) // max(width, 1) + 1) * len(str(wrap)), "a string ('wordwrap')")


_FILTER_CHECKS = {
    "center": _check_center,
    "indent": _check_indent,
    "replace": _check_replace,
    "join": _check_join,
    "format": _check_format_filter,
    "wordwrap": _check_wordwrap,
}


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
    intercepted_binops = frozenset({"*", "**", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Outputs are JSON: ``output.items`` means the key "items", never the dict method.
        if isinstance(obj, dict):
            if attribute in obj:
                return obj[attribute]
            return self.undefined(obj=obj, name=attribute)
        value = super().getattr(obj, attribute)
        if isinstance(obj, str) and _is_method(value):
            return _guarded_method(obj, attribute, value)
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        value = super().getitem(obj, argument)
        if isinstance(obj, str) and isinstance(argument, str) and _is_method(value):
            return _guarded_method(obj, argument, value)
        return value

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "%":
            if isinstance(left, str):
                _check_format(left)
            return operator.mod(left, right)
        if op == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                bits = left.bit_length() * right
                if bits > MAX_INT_BITS:
                    raise TemplateError(f"template computes a number of up to {bits} bits (limit {MAX_INT_BITS} bits)")
            return operator.pow(left, right)
        # op == "*": refuse to build huge numbers, strings or lists ('a' * 10**9, [big] * 1000).
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise TemplateError(f"template computes a number of up to {bits} bits (limit {MAX_INT_BITS} bits)")
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and not isinstance(n, bool):
                _refuse_large(len(seq) * n, "a sequence")
                _refuse_large(_weight(seq) * n, "a sequence")
        return operator.mul(left, right)


def _is_method(value: Any) -> bool:
    # An Undefined is callable too (calling it raises): it must stay undefined, so that a missing
    # attribute of a string is reported as missing, not rendered as a function.
    return callable(value) and not isinstance(value, jinja2.Undefined)


def _guarded_method(text: str, name: str, method: Any) -> Any:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        return method(*_check_str_call(text, name, args, kwargs), **kwargs)

    return guarded


@lru_cache(maxsize=1)
def environment() -> _Environment:
    env = _Environment(undefined=_Undefined, autoescape=False)
    # Only what templates need: no lipsum (it writes paragraphs by the thousand), cycler, joiner
    # or namespace (templates hold no state).
    env.globals = {"range": env.globals["range"], "dict": env.globals["dict"]}
    for name, check in _FILTER_CHECKS.items():
        env.filters[name] = _guarded_filter(name, check)
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


# What a template can read (controller.dispatch.template_context), besides the globals.
CONTEXT_NAMES = ("params", "tasks", "workflow", "task")
# The fields of the context's fixed objects (template_context builds them). ``task`` is the task
# whose params are rendered: a workflow's output has none.
CONTEXT_FIELDS = {"workflow": ("id", "name", "namespace"), "task": ("name", "attempt")}


@dataclass(frozen=True)
class References:
    tasks: frozenset[str]
    params: frozenset[str]
    unknown: frozenset[str] = frozenset()  # names that are neither in the context nor globals
    names: frozenset[str] = frozenset()  # the context's names the template reads
    fields: frozenset[tuple[str, str]] = frozenset()  # (workflow or task, field) it reads


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
    fields: set[tuple[str, str]] = set()
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
        elif base.name in CONTEXT_FIELDS:
            fields.add((base.name, str(key)))
    known = {*CONTEXT_NAMES, *environment().globals}
    loaded = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"}
    return References(
        frozenset(tasks),
        frozenset(params),
        frozenset(loaded - known),
        frozenset(loaded & set(CONTEXT_NAMES)),
        frozenset(fields),
    )


def value_references(value: Any) -> frozenset[str]:
    """All task names referenced anywhere inside a JSON-like value."""
    found: set[str] = set()
    for _, template in iter_templates(value, ""):
        found |= references(template).tasks
    return frozenset(found)


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined whose error records which lookup failed (the object and the missing
    name), so the message can name it in the template's own terms."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._fail_with_undefined_error(*args, **kwargs)
        except jinja2.UndefinedError as exc:
            exc.dagsmith_missing = (self._undefined_obj, self._undefined_name)  # type: ignore[attr-defined]
            raise


# Undefined's operators are class-level aliases of the base method: point them at ours.
_BASE_FAIL = vars(jinja2.Undefined)["_fail_with_undefined_error"]
for _name, _value in {**vars(jinja2.Undefined), **vars(jinja2.StrictUndefined)}.items():
    if _value is _BASE_FAIL and _name != "_fail_with_undefined_error":
        setattr(_Undefined, _name, _Undefined._fail_with_undefined_error)


def _missing(template: str, context: dict[str, Any], exc: jinja2.UndefinedError) -> str | None:
    """The failed lookup said in the template's terms (jinja2 would say "'dict object' has no
    attribute 'txt'"), with the keys that are there; None when it cannot be placed exactly."""
    failed = getattr(exc, "dagsmith_missing", None)
    if failed is None:
        return None
    obj, name = failed
    for node in _parse(template).find_all((nodes.Getattr, nodes.Getitem, nodes.Name)):
        chain: list[Any] = []
        current: Any = node
        while isinstance(current, nodes.Getattr | nodes.Getitem):
            if isinstance(current, nodes.Getattr):
                chain.append(current.attr)
            elif isinstance(current.arg, nodes.Const):
                chain.append(current.arg.value)
            else:
                break
            current = current.node
        else:
            if not isinstance(current, nodes.Name):
                continue
            chain.append(current.name)
            found = _describe_missing(list(reversed(chain)), context, obj, name)
            if found:
                return found
    return None


def _describe_missing(path: list[Any], context: dict[str, Any], obj: Any, name: Any) -> str | None:
    """Walk ``path`` through the context; describe the step that looks ``name`` up in ``obj``."""
    if path[0] == name and path[0] not in context and obj is jinja2.utils.missing:
        return f"{name!r} is not defined (templates see params.<name> and tasks.<name>.output)"
    value: Any = context
    for depth, key in enumerate(path):
        if depth and value is obj and key == name:
            where = ".".join(str(k) for k in path[:depth])
            if isinstance(value, dict):
                keys = ", ".join(sorted(map(str, value))[:20]) or "none"
                return f"{where} has no key {key!r} (its keys: {keys})"
            if isinstance(value, list):
                return f"{where} has no item {key} (it has {len(value)})"
            return None
        if not _holds(value, key):
            return None
        value = value[key]
    return None


def _holds(value: Any, key: Any) -> bool:
    if isinstance(value, dict):
        return key in value
    return isinstance(value, list) and isinstance(key, int) and -len(value) <= key < len(value)


@lru_cache(maxsize=4096)
def _compile(template: str) -> jinja2.Template:
    env = environment()
    return env.from_string(_parse(template))


def render(value: Any, context: dict[str, Any], *, max_bytes: int, path: str = "") -> Any:
    """Render every template inside ``value``; other values pass through unchanged.

    ``max_bytes`` bounds what all the templates in ``value`` render to together (one task's
    params, or a workflow's output), so many small templates cannot add up to a huge message.
    Raises TemplateError naming the path of the failing template, or of the one that went over.
    """
    return _render(value, context, _Budget(max_bytes), path)


@dataclass
class _Budget:
    limit: int
    used: int = 0


def _render(value: Any, context: dict[str, Any], budget: _Budget, path: str) -> Any:
    if isinstance(value, str):
        if not is_template(value):
            return value
        where = path or "template"
        try:
            result = _compile(value).render(context)
        except TemplateError as exc:
            raise TemplateError(f"{where}: {exc}") from exc
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"{where}: {_missing(value, context, exc) or exc}") from exc
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{where}: {exc}") from exc
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise TemplateError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if isinstance(result, str):
            size, nul = len(result), "\x00" in result
        else:
            try:
                encoded = orjson.dumps(result)
            except TypeError:
                raise TemplateError(f"{where}: renders to a {type(result).__name__}, which is not JSON data") from None
            size, nul = len(encoded), b"\\u0000" in encoded and without_nul(result) != result
        if nul:
            # Postgres stores no NUL, and the rendered params are kept with the attempt.
            raise TemplateError(f"{where}: renders a NUL character (\\u0000), which cannot be stored")
        budget.used += size
        if budget.used > budget.limit:
            raise TemplateError(
                f"{where}: rendered value is {size} bytes, bringing the templates here to {budget.used} bytes, "
                f"over the limit of {budget.limit} (DAGSMITH_MAX_TEMPLATE_BYTES)"
            )
        return result
    if isinstance(value, dict):
        return {k: _render(v, context, budget, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context, budget, f"{path}[{i}]") for i, v in enumerate(value)]
    return value
