from __future__ import annotations

import pytest

from dagsmith.errors import TemplateError
from dagsmith.templating import references, render, value_references

CTX = {"params": {"who": "world", "n": 3}, "tasks": {"a": {"output": {"text": "123", "items": [{"id": 7}]}}}}


def r(value: object) -> object:
    return render(value, CTX, max_bytes=10_000)


def test_single_expression_keeps_native_type() -> None:
    assert r("{{ params.n }}") == 3
    assert r("{{ tasks.a.output.items }}") == [{"id": 7}]


def test_strings_that_look_like_numbers_stay_strings() -> None:
    assert r("{{ tasks.a.output.text }}") == "123"


def test_interpolation_renders_a_string() -> None:
    assert r("Hello {{ params.who }}!") == "Hello world!"
    assert r({"x": ["{{ params.n }}", "plain"]}) == {"x": [3, "plain"]}


def test_jmespath_filter() -> None:
    assert r("{{ tasks.a.output | jmespath('items[0].id') }}") == 7


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ params.__class__ }}",
        "{{ tasks.a.output.items.append(1) }}",
        "{{ 'a' * 100000000 }}",
        "{{ 2 ** 100000 }}",
        "{{ range(10**9) | list }}",
    ],
)
def test_sandbox_refuses_unsafe_templates(template: str) -> None:
    with pytest.raises(TemplateError):
        r(template)


def test_unknown_reference_names_the_path() -> None:
    with pytest.raises(TemplateError, match=r"params.x: .*'nope'"):
        render({"x": "{{ tasks.nope.output }}"}, CTX, max_bytes=1000, path="params")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ tasks.a.output.txt }}", "tasks.a.output has no key 'txt' (its keys: items, text)"),
        ("{{ tasks.b.output }}", "tasks has no key 'b' (its keys: a)"),
        ("{{ params.whom }}", "params has no key 'whom' (its keys: n, who)"),
        ("{{ tasks.a.output['items'][3] }}", "tasks.a.output.items has no item 3 (it has 1)"),
        ("{{ nothing.here }}", "'nothing' is not defined"),
        ("{{ params.who.nope }}", "'str object' has no attribute 'nope'"),  # not rendered as a function
        # The lookup that failed, not another one the template guards or defaults.
        ('{{ params.opt | default("d") }}-{{ tasks.a.output.txt }}', "tasks.a.output has no key 'txt'"),
        ("{{ params.who if params.who is defined else tasks.a.output.no }}{{ tasks.a.output.txt }}", "key 'txt'"),
        ("{{ tasks.a.output.txt + 1 }}", "tasks.a.output has no key 'txt'"),
    ],
)
def test_a_missing_key_is_named_with_the_keys_that_are_there(template: str, message: str) -> None:
    with pytest.raises(TemplateError) as raised:
        r(template)
    assert message in str(raised.value)


def test_output_size_limit() -> None:
    with pytest.raises(TemplateError, match="over the limit"):
        render("{{ params.who * 100 }}", CTX, max_bytes=50)


def test_references() -> None:
    refs = references("{{ tasks.a.output.x }} {{ tasks['b'].output }} {{ params.z }}")
    assert refs.tasks == {"a", "b"}
    assert refs.params == {"z"}
    assert value_references({"k": ["{{ tasks.c.output }}", 1]}) == {"c"}


@pytest.mark.parametrize("template", ['{{ "%c" % 0 }}', '{{ "a\\x00b" }}', '{{ ["%c" % 0] }}'])
def test_a_template_that_renders_a_nul_fails_clearly(template: str) -> None:
    with pytest.raises(TemplateError, match="renders a NUL character"):
        render({"x": template}, {}, max_bytes=1000)


def test_a_backslash_u0000_text_is_not_a_nul() -> None:
    assert render({"x": '{{ "\\\\u0000" }}'}, {}, max_bytes=1000) == {"x": "\\u0000"}


def test_an_error_reported_with_nul_characters_is_stored_with_replacements() -> None:
    from dagsmith.messages import TaskError

    error = TaskError.model_validate_json(
        b'{"class": "permanent", "message": "a\\u0000b", "details": {"k\\u0000": ["\\u0000"]}}'
    )
    assert error.message == "a\ufffdb" and error.details == {"k\ufffd": ["\ufffd"]}
