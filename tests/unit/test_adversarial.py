"""Random and hostile input to the validator and the templates: a clean error or a safe result,
never a crash and never code execution."""

from __future__ import annotations

import os
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagsmith.errors import SpecError, TemplateError
from dagsmith.templating import references, render
from dagsmith.validation import Limits, load_document, validate

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)
names = st.text(alphabet=string.ascii_letters + string.digits + "_-. é漢", min_size=0, max_size=12)


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly-valid workflow documents with random damage: cycles, bad names, unknown keys, templates."""
    n = draw(st.integers(0, 8))
    task_names = [draw(names) for _ in range(n)]
    tasks = []
    for name in task_names:
        task: dict[str, Any] = {"name": name, "type": draw(st.sampled_from(["noop", "echo", "Bad Type", "text.upper"]))}
        if draw(st.booleans()) and task_names:
            task["dependsOn"] = draw(st.lists(st.sampled_from(task_names), max_size=3))
        if draw(st.booleans()):
            ref = draw(st.sampled_from([*task_names, "nope"])) if task_names else "nope"
            task["params"] = {
                "x": draw(
                    st.sampled_from(
                        [
                            f"{{{{ tasks.{ref}.output }}}}",
                            "{{ params.p }}",
                            "{{ ''.__class__ }}",
                            "{{ broken",
                            "plain",
                        ]
                    )
                )
            }
        if draw(st.booleans()):
            task[draw(st.sampled_from(["timeout", "retry", "bogus", "expect"]))] = draw(json_values)
        tasks.append(task)
    doc: dict[str, Any] = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": draw(names)},
        "spec": {"tasks": tasks},
    }
    if draw(st.booleans()):
        doc["spec"]["params"] = draw(st.dictionaries(st.text(max_size=5), json_values, max_size=3))
    if draw(st.booleans()):
        doc[draw(st.text(max_size=5))] = draw(json_values)
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs())
def test_validator_gives_a_clean_answer(doc: dict[str, Any]) -> None:
    problems: list[dict[str, Any]] = []
    try:
        checked = validate(doc, Limits(max_tasks=50))
    except SpecError as exc:
        problems = exc.problems
        assert problems, "a SpecError names at least one problem"
    else:
        assert len(checked.order) == len(checked.document.spec.tasks)  # a valid DAG has a full order
    for problem in problems:
        assert set(problem) == {"path", "message", "code"}
        assert isinstance(problem["message"], str)
        assert problem["message"]


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_value_is_a_clean_error_or_valid(value: Any) -> None:
    with pytest.raises(SpecError):
        validate(value)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # nesting deeper than any parser should follow
        b"a: " + b"[" * 50_000,
        b"\xff\xfe\x00garbage",
        b"",
        b"!!python/object/apply:os.system ['echo pwned']",
        b"&a [*a, *a]",
        b"{" + b'"k": ' * 20_000 + b"1" + b"}" * 20_000,
    ],
)
def test_hostile_bodies_are_spec_errors(body: bytes) -> None:
    for content_type in ("application/yaml", "application/json"):
        with pytest.raises(SpecError):
            validate(load_document(body, content_type))


def test_deeply_nested_params_are_refused_cleanly() -> None:
    nested: Any = "x"
    for _ in range(5000):
        nested = {"k": nested}
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "deep"},
        "spec": {"tasks": [{"name": "a", "type": "echo", "params": {"deep": nested}}]},
    }
    with pytest.raises(SpecError):
        validate(doc)


INJECTIONS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ params.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].system('touch /tmp/dagsmith-pwned') }}",
    "{{ self._TemplateReference__context }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ config }}",
    "{{ request }}",
    "{{ namespace.__init__ }}",
    "{{ 'a' * 10000000 }}",
    "{{ (2 ** 1000) ** 1000 }}",
    "{% set x = [1] %}{% for i in range(100000) %}{% set x = x + x %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ range(100000000) | list | length }}",
    "{{ tasks.a.output.items() }}",
    "{{ params.x.pop() }}",
    # Each of these is short but builds gigabytes or runs for minutes if not bounded up front.
    "{{ ((((9 ** 100) ** 100) ** 100) ** 100) }}",
    "{{ 'a' | center(2000000000) }}",
    "{{ 'a' | indent(2000000000) }}",
    "{{ 'a'.center(2000000000) }}",
    "{{ 'a'['ljust'](2000000000) }}",
    "{{ 'a'.zfill(2000000000) }}",
    "{{ '%2000000000s' % 'a' }}",
    "{{ '%*s' % (2000000000, 'a') }}",
    "{{ '{:>2000000000}'.format('a') }}",
    "{{ '{:{}}'.format('a', 2000000000) }}",
    "{{ '%2000000000s' | format('a') }}",
    "{{ ('a' * 1000000) | replace('a', 'a' * 1000000) }}",
    "{{ ('a' * 1000000).replace('a', 'a' * 1000000) }}",
    "{{ range(100000) | join('a' * 1000000) }}",
    # Built and then measured (| length) the result would never reach the output's size check.
    "{{ (('a' * 999999).join(['b'] * 200)) | length }}",
    "{{ ('a' * 999999).join(params.x | map('string') | list * 200) | length }}",
    "{{ ('a' * 999999).translate(''.maketrans({'a': 'b' * 200000})) | length }}",
    "{{ ('a' * 999999).translate(['b' * 200000] * 200) | length }}",
    "{{ ([('a' * 1000000)] * 1000000) | tojson }}",
    "{{ 'ab' | wordwrap(1, true, 'x' * 1000000) }}",
    "{{ lipsum(1000000) }}",
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_template_injection_is_refused(template: str) -> None:
    context = {"params": {"x": [1, 2]}, "tasks": {"a": {"output": {"k": 1}}}}
    with pytest.raises(TemplateError):
        render(template, context, max_bytes=100_000)
    assert not os.path.exists("/tmp/dagsmith-pwned")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable, max_size=60))
def test_random_templates_never_crash(body: str) -> None:
    template = "{{ " + body + " }}"
    try:
        references(template)
    except TemplateError:
        return
    try:
        render(template, {"params": {"a": 1}, "tasks": {}}, max_bytes=10_000)
    except TemplateError:
        pass


def test_a_cycle_through_a_duplicated_name_is_reported() -> None:
    """Found by the test above: the cycle search read the last task of a duplicated name, the
    ordering the first."""
    doc = {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "dup"},
        "spec": {"tasks": [{"name": "A", "type": "noop", "dependsOn": ["A"]}, {"name": "A", "type": "noop"}]},
    }
    with pytest.raises(SpecError) as caught:
        validate(doc, Limits())
    problems = {p["code"]: p["path"] for p in caught.value.problems}
    assert problems == {"duplicate": "spec.tasks[1].name", "cycle": "spec.tasks[0].dependsOn"}


def test_bounded_operations_still_work_below_their_limits() -> None:
    context = {"params": {"x": [1, 2]}}
    assert render("{{ '%5.2f' % 3.14159 }}", context, max_bytes=100) == " 3.14"
    assert render("{{ '{:>3}'.format('a') }}", context, max_bytes=100) == "  a"
    assert render("{{ params.x | join(',') }}", context, max_bytes=100) == "1,2"
    assert render("{{ 'a b' | replace('a', 'c') }}", context, max_bytes=100) == "c b"
    assert render("{{ 'x' | center(3) }}", context, max_bytes=100) == " x "
    assert render("{{ (2 ** 40) * 3 }}", context, max_bytes=100) == 3 * 2**40
    assert render("{{ '-'.join(params.x | map('string')) }}", context, max_bytes=100) == "1-2"
    assert render("{{ 'ab'.translate(''.maketrans({'a': 'xy'})) }}", context, max_bytes=100) == "xyb"


def test_the_template_size_limit_covers_all_of_a_tasks_templates_together() -> None:
    params = {f"p{i}": "{{ 'a' * 1000 }}" for i in range(20)}
    assert len(render(params, {}, max_bytes=20_000)) == 20
    with pytest.raises(TemplateError, match=r"params\.p10: .* 11000 bytes, over the limit of 10000"):
        render(params, {}, max_bytes=10_000, path="params")
