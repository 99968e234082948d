"""Every validation rule gives a problem with its path; nothing else is needed to find it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from dagsmith.errors import SpecError
from dagsmith.validation import Limits, load_document, validate


def doc(*tasks: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dagsmith.io/v1",
        "kind": "Workflow",
        "metadata": {"name": "wf"},
        "spec": {"tasks": list(tasks), **spec},
    }


def problems(raw: Any, **kw: Any) -> list[dict[str, Any]]:
    with pytest.raises(SpecError) as info:
        validate(raw, **kw)
    return info.value.problems


def test_valid_document_gives_order_refs_and_children() -> None:
    checked = validate(
        doc(
            {"name": "a", "type": "noop"},
            {"name": "b", "type": "echo", "dependsOn": ["a"], "params": {"x": "{{ tasks.a.output }}"}},
            {"name": "c", "type": "echo", "dependsOn": ["b"], "params": {"x": "{{ tasks.a.output.y }}"}},
        )
    )
    assert checked.order == ["a", "b", "c"]
    assert checked.refs == {"a": frozenset(), "b": frozenset({"a"}), "c": frozenset({"a"})}
    assert checked.children == {"a": ["b"], "b": ["c"], "c": []}


def test_unknown_key_is_reported_with_path_and_suggestion() -> None:
    found = problems(doc({"name": "a", "type": "noop", "dependson": ["x"]}))
    assert found[0]["path"] == "spec.tasks[0].dependson"
    assert "did you mean 'dependsOn'" in found[0]["message"]


def test_duplicate_names() -> None:
    found = problems(doc({"name": "a", "type": "noop"}, {"name": "a", "type": "noop"}))
    assert found == [
        {
            "path": "spec.tasks[1].name",
            "message": "duplicate task name 'a' (first used by spec.tasks[0])",
            "code": "duplicate",
        }
    ]


def test_depends_on_unknown_task() -> None:
    found = problems(doc({"name": "alpha", "type": "noop"}, {"name": "b", "type": "noop", "dependsOn": ["alpah"]}))
    assert found[0]["path"] == "spec.tasks[1].dependsOn[0]"
    assert "no task is named 'alpah'" in found[0]["message"]
    assert "did you mean 'alpha'" in found[0]["message"]


def test_cycle_is_printed() -> None:
    found = problems(
        doc(
            {"name": "a", "type": "noop", "dependsOn": ["c"]},
            {"name": "b", "type": "noop", "dependsOn": ["a"]},
            {"name": "c", "type": "noop", "dependsOn": ["b"]},
            {"name": "d", "type": "noop"},
        )
    )
    assert len(found) == 1
    assert found[0]["code"] == "cycle"
    assert "a → b → c → a" in found[0]["message"]


def test_self_dependency_is_a_cycle() -> None:
    found = problems(doc({"name": "a", "type": "noop", "dependsOn": ["a"]}))
    assert "a → a" in found[0]["message"]


def test_reference_to_non_ancestor() -> None:
    found = problems(
        doc(
            {"name": "a", "type": "noop"},
            {"name": "b", "type": "noop"},
            {"name": "c", "type": "echo", "dependsOn": ["a"], "params": {"x": "{{ tasks.b.output }}"}},
        )
    )
    assert found[0]["path"] == "spec.tasks[2].params.x"
    assert "not upstream of 'c'" in found[0]["message"]


def test_references_through_other_tasks_are_upstream_and_side_branches_are_not() -> None:
    # a → b → c → d, and e beside them; c, d and e all read a (one walk from a serves them all).
    def reads_a() -> dict[str, str]:
        return {"x": "{{ tasks.a.output }}"}

    found = problems(
        doc(
            {"name": "a", "type": "noop"},
            {"name": "b", "type": "noop", "dependsOn": ["a"]},
            {"name": "c", "type": "echo", "dependsOn": ["b"], "params": reads_a()},
            {"name": "d", "type": "echo", "dependsOn": ["c"], "params": {**reads_a(), "y": "{{ tasks.b.output }}"}},
            {"name": "e", "type": "echo", "params": reads_a()},
        )
    )
    assert [(p["path"], p["code"]) for p in found] == [("spec.tasks[4].params.x", "reference")]


def test_reference_to_unknown_task_and_param() -> None:
    found = problems(doc({"name": "a", "type": "echo", "params": {"x": "{{ tasks.zz.output }} {{ params.nope }}"}}))
    messages = sorted(p["message"] for p in found)
    assert any("no task is named 'zz'" in m for m in messages)
    assert any("params.nope" in m for m in messages)


def test_a_name_templates_cannot_read_is_a_problem_at_submission() -> None:
    template = "{{ param.who }} {{ range(2) | list }} {{ workflow.name }} {{ task.attempt }}"
    found = problems(doc({"name": "a", "type": "echo", "params": {"x": template}}, output={"y": "{{ nothing }}"}))
    assert [(p["path"], p["code"]) for p in found] == [
        ("spec.tasks[0].params.x", "unknown_name"),
        ("spec.output.y", "unknown_name"),
    ]
    assert "refers to 'param'" in found[0]["message"] and "did you mean 'params'?" in found[0]["message"]


def test_bad_duration() -> None:
    found = problems(doc({"name": "a", "type": "noop", "timeout": "10 parsecs"}))
    assert found[0]["path"] == "spec.tasks[0].timeout"
    assert "invalid duration" in found[0]["message"]


def test_template_syntax_error() -> None:
    found = problems(doc({"name": "a", "type": "echo", "params": {"x": "{{ params.who "}}, params={"who": 1}))
    assert found[0]["path"] == "spec.tasks[0].params.x"
    assert "syntax error" in found[0]["message"]


def test_expect_must_be_a_json_schema() -> None:
    found = problems(doc({"name": "a", "type": "noop", "expect": {"type": "banana"}}))
    assert found[0]["path"] == "spec.tasks[0].expect"


def test_every_problem_is_listed_at_once() -> None:
    found = problems(
        doc(
            {"name": "a", "type": "noop", "dependsOn": ["missing"]},
            {"name": "a", "type": "noop"},
            {"name": "b", "type": "Not A Type"},
        )
    )
    assert {p["path"] for p in found} >= {"spec.tasks[2].type"}
    found2 = problems(doc({"name": "a", "type": "noop", "dependsOn": ["missing"]}, {"name": "a", "type": "noop"}))
    assert {p["path"] for p in found2} == {"spec.tasks[1].name", "spec.tasks[0].dependsOn[0]"}


def test_wrong_api_version_and_kind() -> None:
    raw = doc({"name": "a", "type": "noop"})
    raw["apiVersion"] = "v2"
    raw["kind"] = "Pipeline"
    assert {p["path"] for p in problems(raw)} == {"apiVersion", "kind"}


def test_limits() -> None:
    many = doc(*({"name": f"t{i}", "type": "noop"} for i in range(11)))
    found = problems(many, limits=Limits(max_tasks=10))
    assert found[0]["path"] == "spec.tasks" and "limit of 10" in found[0]["message"]
    big = doc({"name": "a", "type": "echo", "params": {"x": "y" * 100}})
    found = problems(big, limits=Limits(max_params_bytes=50))
    assert found[0]["path"] == "spec.tasks[0].params"


def test_unknown_type_is_a_warning_not_an_error() -> None:
    checked = validate(doc({"name": "a", "type": "noop"}, {"name": "b", "type": "custom.thing"}), known_types={"noop"})
    assert checked.warnings == [
        {
            "path": "spec.tasks[1].type",
            "message": "no executor has declared task type 'custom.thing' yet; the task waits until one does",
            "code": "unknown_type",
        }
    ]


def test_more_sinks_than_the_default_result_holds_is_a_warning() -> None:
    wide = [{"name": f"t{i}", "type": "noop"} for i in range(101)]
    (warning,) = validate(doc(*wide)).warnings
    assert warning["path"] == "spec.output" and warning["code"] == "output_too_wide"
    assert "101 sink tasks" in warning["message"] and "null" in warning["message"]
    assert validate(doc(*wide[:100])).warnings == []  # 100 sinks: the result holds them all
    joined = doc(*wide, {"name": "join", "type": "noop", "dependsOn": [t["name"] for t in wide]})
    assert validate(joined).warnings == []


def test_load_document_yaml_json_and_garbage() -> None:
    assert load_document(b"a: 1") == {"a": 1}
    assert load_document(b'{"a": 1}', "application/json") == {"a": 1}
    with pytest.raises(SpecError) as info:
        load_document(b"a: [1, 2", "application/yaml")
    assert "line" in info.value.problems[0]["message"]
    with pytest.raises(SpecError):
        load_document(b"{nope", "application/json")
    with pytest.raises(SpecError) as info:
        load_document(b"a: 1\n---\nb: 2\n")
    assert "found 2" in info.value.problems[0]["message"]


def test_kubernetes_metadata_passes_through() -> None:
    raw = doc({"name": "a", "type": "noop"})
    raw["metadata"].update({"uid": "123", "resourceVersion": "7", "namespace": "team-a", "generation": 1})
    checked = validate(raw)
    assert checked.document.metadata.namespace == "team-a"


def test_an_unquoted_yaml_off_is_the_off_mode() -> None:
    body = b"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: x}\nspec:\n"
    body += b"  correction: {mode: off}\n  tasks: [{name: a, type: noop}]\n"
    assert validate(load_document(body, "application/yaml")).document.spec.correction.mode == "off"
    assert problems(doc({"name": "a", "type": "noop"}, correction={"mode": True}))[0]["path"] == "spec.correction.mode"


def test_zero_timeouts_are_problems() -> None:
    found = problems(doc({"name": "a", "type": "noop", "timeout": "0s", "queueTimeout": "0ms"}))
    by_path = {p["path"]: p["message"] for p in found}
    assert "must be longer than 0" in by_path["spec.tasks[0].timeout"]
    assert "must be longer than 0" in by_path["spec.tasks[0].queueTimeout"]


def test_durations_are_strings_as_the_schema_says() -> None:
    found = problems(doc({"name": "a", "type": "noop", "queueTimeout": 1.5, "retry": {"backoff": {"initial": 1}}}))
    by_path = {p["path"]: p["message"] for p in found}
    assert "a duration is a string with a unit" in by_path["spec.tasks[0].queueTimeout"]
    assert "a duration is a string with a unit" in by_path["spec.tasks[0].retry.backoff.initial"]
    # A spec stored before (numbers of seconds were taken then) still reads.
    from dagsmith.spec import TaskSpec

    assert TaskSpec.model_validate({"name": "a", "type": "noop", "queueTimeout": 1.5}).queue_timeout == 1.5


def test_fallback_is_a_list_as_the_crd_says() -> None:
    """The CRD's fallback is an array, and the API server refuses a lone string there: so does the
    API, saying how to write it, and the file POSTed is the file a `kubectl apply` takes."""
    from controller.operator import crd
    from dagsmith.spec import TaskSpec

    [problem] = problems(doc({"name": "a", "type": "noop", "fallback": "text.lower"}))
    assert problem["path"] == "spec.tasks[0].fallback"
    assert "write fallback: [text.lower]" in problem["message"]
    assert validate(doc({"name": "a", "type": "noop", "fallback": ["text.lower"]})).tasks[0].fallback == ["text.lower"]
    task = crd.open_api_schema()["properties"]["spec"]["properties"]["tasks"]["items"]
    assert task["properties"]["fallback"]["type"] == "array"
    # A spec stored when a lone type was taken still reads.
    assert TaskSpec.model_validate({"name": "a", "type": "noop", "fallback": "echo"}).fallback == ["echo"]


def test_undefined_params_in_the_output_and_oversized_workflow_params_are_problems() -> None:
    found = problems(doc({"name": "a", "type": "noop"}, params={"big": "x" * 70_000}, output="{{ params.nope }}"))
    by_path = {p["path"]: p["message"] for p in found}
    assert "refers to params.nope" in by_path["spec.output"]
    assert "over the limit of 65536 (DAGSMITH_MAX_PARAMS_BYTES)" in by_path["spec.params"]


def test_yaml_errors_are_one_line_and_an_unpathed_problem_has_no_stray_colon() -> None:
    with pytest.raises(SpecError) as info:
        load_document(b"spec: [unclosed", "application/yaml")
    assert "\n" not in info.value.problems[0]["message"] and "line 1" in info.value.problems[0]["message"]
    assert not str(info.value).startswith(":")


def test_a_key_given_twice_in_yaml_is_refused_with_its_line() -> None:
    from dagsmith.validation import load_document

    with pytest.raises(SpecError) as info:
        load_document("kind: Workflow\nspec:\n  tasks:\n    - {name: a, timeout: 10s, timeout: 20s}\n")
    assert "line 4" in str(info.value) and "found the key 'timeout' twice" in str(info.value)
    # A complex key is refused as before, with a parse error, not a crash.
    with pytest.raises(SpecError, match="not valid YAML"):
        load_document("? [a, b]\n: 1\n")
    # A merge key's values may be given again: that overrides them, as YAML means.
    assert load_document("a: &x {k: 1}\nb: {<<: *x, k: 2}\n") == {"a": {"k": 1}, "b": {"k": 2}}


def test_labels_and_booleans_are_what_kubernetes_would_take() -> None:
    bad = doc({"name": "a", "type": "noop", "optional": "yes"})
    bad["metadata"]["labels"] = {"bad key!": "x"}
    assert sorted(p["path"] for p in problems(bad)) == ["metadata.labels", "spec.tasks[0].optional"]
    good = doc({"name": "a", "type": "noop", "optional": True})
    good["metadata"]["labels"] = {"app.kubernetes.io/name": "demo", "team": "", "tier": "a.b-c_d"}
    validate(good)
    bad["metadata"]["labels"] = {"team": "x y"}
    assert "the value 'x y' must be empty or" in problems(bad)[0]["message"]
    for labels in ({"team": "web\n"}, {"app\n": "x"}, {"/app": "x"}):  # what Kubernetes refuses too
        bad["metadata"]["labels"] = labels
        assert problems(bad)[0]["path"] == "metadata.labels", labels


def test_a_cancellation_from_an_older_controller_counts_from_when_it_arrived() -> None:
    from dagsmith.messages import CancelMessage

    assert CancelMessage(workflow_ids=["a", "b"], at=[5.0]).times(received=9.0) == {"a": 5.0, "b": 9.0}


@pytest.mark.parametrize(
    ("yaml_params", "path", "fragment"),
    [
        ('{v: "\\ud800"}', "spec.tasks[0].params.v", "an unpaired surrogate (\\ud800)"),
        ('{"\\udfff": 1}', "spec.tasks[0].params", "a key contains an unpaired surrogate (\\udfff)"),
        ('{v: "a\\0b"}', "spec.tasks[0].params.v", "a NUL character"),
        ("{pin: 123456789012345678901234567890}", "spec.tasks[0].params.pin", "does not fit in 64 bits"),
    ],
)
def test_text_and_numbers_postgres_cannot_store_are_problems_not_crashes(
    yaml_params: str, path: str, fragment: str
) -> None:
    body = (
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: x}\n"
        f"spec:\n  tasks: [{{name: a, type: noop, params: {yaml_params}}}]\n"
    ).encode()
    with pytest.raises(SpecError) as info:
        validate(load_document(body, "application/yaml"))
    [problem] = info.value.problems
    assert problem["path"] == path and fragment in problem["message"], problem
    assert "123456789012345678901234567890" not in problem["message"]  # the value may be a secret


def test_warnings_suggest_a_served_type_and_say_when_correction_retries_past_a_limit() -> None:
    spec = doc({"name": "a", "type": "text.uper", "retry": {"limit": 0}}, {"name": "b", "type": "noop"})
    warnings = {w["code"]: w for w in validate(spec, known_types=["text.upper", "noop"]).warnings}
    assert "(did you mean 'text.upper'?)" in warnings["unknown_type"]["message"]
    retry = warnings["policy_retries"]
    assert retry["path"] == "spec.tasks[0].retry.limit"  # b left its limit unset: no warning for it
    assert "up to correction.maxRetries (2) times" in retry["message"]
    spec["spec"]["correction"] = {"maxRetries": 0}
    assert [w["code"] for w in validate(spec, known_types=["text.upper", "noop"]).warnings] == ["unknown_type"]


def test_budgets_and_backoffs_that_cannot_work_are_problems() -> None:
    spec = doc({"name": "a", "type": "noop", "retry": {"limit": 1, "backoff": {"initial": "1s", "max": "1ms"}}})
    spec["spec"]["correction"] = {"timeBudget": "0s"}
    found = {p["path"]: p["message"] for p in problems(spec)}
    assert "max (1ms) is shorter than initial (1s)" in found["spec.tasks[0].retry.backoff"]
    assert "must be longer than 0" in found["spec.correction.timeBudget"]


def test_fields_of_workflow_and_task_that_do_not_exist_are_problems() -> None:
    spec = doc(
        {"name": "greet", "type": "noop"},
        {"name": "b", "type": "echo", "dependsOn": ["greet"], "params": {"v": "{{ task.greet }} {{ task.name }}"}},
        output={"who": "{{ task.name }}", "id": "{{ workflow.id }}", "typo": "{{ workflow.nme }}"},
    )
    found = {(p["path"], p["message"]) for p in problems(spec)}
    assert found == {
        ("spec.tasks[1].params.v", "refers to task.greet, but task has only name, attempt; did you mean tasks.greet?"),
        ("spec.output.who", "refers to 'task', which only a task's params can read (the output has no task)"),
        ("spec.output.typo", "refers to workflow.nme, but workflow has only id, name, namespace"),
    }


def test_the_fields_validation_knows_are_the_ones_templates_get() -> None:
    from types import SimpleNamespace

    from controller.dispatch import template_context
    from dagsmith.templating import CONTEXT_FIELDS, CONTEXT_NAMES

    workflow = SimpleNamespace(params={}, id="w", name="n", namespace="ns")
    context = template_context(workflow, SimpleNamespace(name="t"), {}, attempt=1)  # type: ignore[arg-type]
    assert tuple(context) == CONTEXT_NAMES
    assert {root: tuple(context[root]) for root in CONTEXT_FIELDS} == CONTEXT_FIELDS


def test_shape_mistakes_are_named_as_a_user_wrote_them() -> None:
    body = (
        b"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: x}\nspec:\ntasks:\n  - {name: a, type: noop}\n"
    )
    with pytest.raises(SpecError) as info:
        validate(load_document(body, "application/yaml"))
    found = {p["path"]: p["message"] for p in info.value.problems}
    assert found == {
        "spec": "should be an object (key: value pairs), not empty",
        "tasks": "unknown field 'tasks' (it belongs under spec: check the indentation)",
    }
    found = {p["path"]: p["message"] for p in problems(doc({"name": "a", "type": "noop", "dependsOn": "b"}))}
    assert found["spec.tasks[0].dependsOn"] == "should be a list, not the text 'b' (write [b])"


def test_specs_stored_before_a_rule_existed_are_still_read() -> None:
    """The controller reads stored specs without the submission context: a rule added later must
    not make an accepted workflow unreadable (every round of it would fail)."""
    from dagsmith.spec import Backoff, CorrectionSpec

    assert Backoff.model_validate({"initial": "1s", "max": "1ms"}).delay(3) == 0.001
    assert CorrectionSpec.model_validate_json('{"timeBudget": 0}').time_budget == 0.0


def test_a_backoff_initial_above_the_default_max_raises_the_max_it_did_not_write() -> None:
    found = validate(doc({"name": "a", "type": "noop", "retry": {"limit": 1, "backoff": {"initial": "10m"}}}))
    backoff = found.tasks[0].retry.backoff
    assert (backoff.initial, backoff.max, backoff.delay(3)) == (600.0, 600.0, 600.0)


def test_a_yaml_file_splits_into_its_documents_as_written() -> None:
    from dagsmith.validation import split_documents

    first = "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: a}\nspec:\n  tasks: [{name: t, type: noop}]\n"
    second = "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: b}  # b\n"
    second += "spec:\n  tasks:\n    - {name: t, type: noop}\n"
    text = f"# two workflows\n{first}---\n---\n{second}...\n"
    parts = split_documents(text)
    assert [validate(load_document(p.encode(), "application/yaml")).document.metadata.name for p in parts] == ["a", "b"]
    assert split_documents(first) == [first]
    broken = "a: [unclosed\n---\nb: 1\n"
    assert split_documents(broken) == [broken]  # the server says what is wrong, and where
    indented = "---\n  name: a\n  x: 1\n---\nname: b\n"
    assert [yaml.safe_load(p) for p in split_documents(indented)] == [{"name": "a", "x": 1}, {"name": "b"}]
    tagged = "%TAG !e! tag:example.com,2000:\n---\na: !e!x 1\n---\nb: 2\n"
    assert split_documents(tagged) == [tagged]


@pytest.mark.parametrize(
    ("expect", "complaint"),
    [
        ({"$ref": "#/$defs/missing", "$defs": {"a": {"type": "string"}}}, "$ref '#/$defs/missing' does not resolve"),
        ({"properties": {"x": {"$ref": "http://127.0.0.1:9/schema.json"}}}, "nothing is fetched"),
        ({"$ref": "other.json"}, "does not resolve within the schema"),
    ],
)
def test_expect_references_must_resolve_inside_the_schema(expect: dict[str, object], complaint: str) -> None:
    found = problems(doc({"name": "a", "type": "noop", "expect": expect}))
    assert found[0]["path"] == "spec.tasks[0].expect" and complaint in found[0]["message"]


def test_expect_with_local_references_is_accepted() -> None:
    schema = {"$ref": "#/$defs/answer", "$defs": {"answer": {"type": "object", "required": ["text"]}}}
    assert validate(doc({"name": "a", "type": "noop", "expect": schema})).document.spec.tasks[0].expect == schema


def test_a_word_yaml_read_as_a_boolean_is_explained() -> None:
    from dagsmith.validation import load_document

    text = (
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: off}\nspec:\n  tasks: [{name: a, type: noop}]\n"
    )
    [problem] = problems(load_document(text))
    assert problem["path"] == "metadata.name"
    assert problem["message"] == "should be text, not the boolean false (in YAML, quote words like off or yes)"


def test_a_cycle_does_not_hide_the_other_reference_problems() -> None:
    found = problems(
        doc(
            {"name": "a", "type": "noop", "dependsOn": ["b"]},
            {"name": "b", "type": "noop", "dependsOn": ["a"]},
            {"name": "d", "type": "noop"},
            {"name": "e", "type": "noop", "params": {"x": "{{ tasks.d.output }}"}},
            {"name": "f", "type": "noop", "dependsOn": ["a"], "params": {"x": "{{ tasks.d.output }}"}},
        )
    )
    by_code = {p["code"]: p for p in found}
    assert set(by_code) == {"cycle", "reference"}  # f, after the cycle, is not judged
    assert by_code["reference"]["path"] == "spec.tasks[3].params.x"
    assert "not upstream of 'e'" in by_code["reference"]["message"]


@pytest.mark.parametrize(
    "schema",
    [
        {"const": {"$ref": "not-a-reference.json"}},  # data that looks like a reference
        {"enum": [{"$ref": "x"}]},
        {
            "$id": "https://example.com/root",
            "$defs": {
                "sub": {"$id": "https://example.com/sub", "$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"}
            },
            "$ref": "sub",
        },
    ],
)
def test_expect_references_are_judged_in_their_own_scope_and_data_is_not_a_reference(schema: dict[str, object]) -> None:
    assert validate(doc({"name": "a", "type": "noop", "expect": schema})).document.spec.tasks[0].expect == schema
