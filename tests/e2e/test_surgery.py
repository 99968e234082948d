"""DAG surgery by hand, over the API and the CLI: re-run with edited inputs, repair, reroute, skip."""

from __future__ import annotations

from typing import Any

import pytest

from dagsmith.client import Client, ClientError
from dagsmith.settings import Settings
from tests.e2e.conftest import pg, submit, wait_finished, workflow
from tests.support.stack import Stack
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

OFF = {"mode": "off"}  # these tests drive surgery by hand; the policy stays out of the way


def tasks_of(client: Client, wid: str) -> dict[str, dict[str, Any]]:
    """The workflow's tasks by name."""
    return {t["name"]: t for t in client.tasks(wid)["items"]}


def failed(client: Client, doc: dict[str, Any]) -> str:
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "failed"
    return wid


def test_retry_with_edited_params_revives_a_failed_workflow(client: Client, settings: Settings) -> None:
    doc = workflow(
        "rerun",
        {"name": "flaky", "type": "chaos.fail", "params": {"class": "permanent", "output": {"v": 7}}},
        {"name": "after", "type": "echo", "dependsOn": ["flaky"], "params": {"v": "{{ tasks.flaky.output.v }}"}},
        {"name": "side", "type": "noop"},
        correction=OFF,
        output="{{ tasks.after.output.v }}",
    )
    wid = failed(client, doc)
    tasks = tasks_of(client, wid)
    assert tasks["after"]["status"] == "cancelled"

    done = client.surgery(wid, {"op": "retry", "task": "flaky", "params": {"probability": 0}, "reason": "stop failing"})
    assert done["revision"] == 1
    assert done["diff"][0]["field"] == "params" and done["diff"][0]["new"]["probability"] == 0
    wf = wait_finished(client, wid)
    assert wf["status"] == "succeeded"
    assert wf["dag_revision"] == 1
    assert client.result(wid)["output"] == 7
    tasks = tasks_of(client, wid)
    assert tasks["flaky"]["attempt"] == 2
    assert tasks["side"]["attempt"] == 1  # untouched tasks did not run again
    (rev,) = client.revisions(wid)
    assert rev["actor"] == "user:admin" and rev["operation"] == "retry" and rev["reason"]["message"] == "stop failing"
    with pg(settings) as conn:
        (n,) = conn.execute("SELECT surgeries FROM workflows WHERE id = %s", (wid,)).fetchone()  # type: ignore[misc]
    assert n == 1


def test_insert_a_repair_task_before_a_failed_one(client: Client) -> None:
    doc = workflow(
        "repair",
        {"name": "parse", "type": "json.parse", "params": {"text": "{'answer': 42,}"}},
        correction=OFF,
        output="{{ tasks.parse.output.value }}",
    )
    wid = failed(client, doc)
    assert client.tasks(wid)["items"][0]["error"]["class"] == "invalid_input"
    done = client.surgery(wid, {"op": "insert", "task": "parse", "type": "json.repair"})
    assert done["diff"][0]["task"]["name"] == "parse_repair1"
    assert wait_finished(client, wid)["status"] == "succeeded"
    assert client.result(wid)["output"] == {"answer": 42}
    graph = client.dag(wid)
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert nodes["parse_repair1"]["inserted"] is True and nodes["parse"]["inserted"] is False
    assert {(e["from"], e["to"]) for e in graph["edges"]} == {("parse_repair1", "parse")}
    before = client.dag(wid, revision=0)
    assert [n["id"] for n in before["nodes"]] == ["parse"] and before["edges"] == []
    assert "✚ inserted" in client.dag(wid, "mermaid")


def test_replace_a_task_type(client: Client) -> None:
    doc = workflow("reroute", {"name": "t", "type": "chaos.fail", "params": {"class": "unavailable"}}, correction=OFF)
    wid = failed(client, doc)
    client.surgery(wid, {"op": "replace", "task": "t", "type": "echo"})
    assert wait_finished(client, wid)["status"] == "succeeded"
    (node,) = client.dag(wid)["nodes"]
    assert node["type"] == "echo" and node["rerouted"] is True


def test_replace_with_params_and_a_type_no_executor_has(client: Client) -> None:
    doc = workflow(
        "reroute-params", {"name": "t", "type": "chaos.fail", "params": {"class": "permanent"}}, correction=OFF
    )
    wid = failed(client, doc)
    done = client.surgery(wid, {"op": "replace", "task": "t", "type": "echo", "params": {"note": "rerouted"}})
    assert done["warnings"] == []
    assert {"op": "set", "task": "t", "field": "params"}.items() <= done["diff"][1].items()
    assert wait_finished(client, wid)["status"] == "succeeded"
    (task,) = client.tasks(wid)["items"]
    assert task["params"] == {"class": "permanent", "note": "rerouted"}
    other = failed(
        client,
        workflow(
            "reroute-nowhere", {"name": "t", "type": "chaos.fail", "params": {"class": "permanent"}}, correction=OFF
        ),
    )
    waiting = client.surgery(other, {"op": "replace", "task": "t", "type": "no.such.type"})
    assert waiting["warnings"] == [
        "no executor has declared task type 'no.such.type' yet; the task waits until one does"
    ]
    typo = client.surgery(other, {"op": "replace", "task": "t", "type": "text.uper"})
    assert "(did you mean 'text.upper'?)" in typo["warnings"][0]
    client.cancel(other)


def test_a_task_no_executor_takes_can_be_rerouted_while_queued(client: Client) -> None:
    """A type nobody runs leaves its task queued for good: replacing it there saves the workflow
    (and what already ran) instead of cancelling it."""
    doc = workflow(
        "stuck-queued",
        {"name": "a", "type": "echo", "params": {"v": 1}},
        {"name": "b", "type": "no.such.runner", "dependsOn": ["a"], "params": {"v": "{{ tasks.a.output.v }}"}},
        correction=OFF,
        output="{{ tasks.b.output.v }}",
    )
    wid = submit(client, doc)
    wait_until(
        lambda: {t["name"]: t["status"] for t in client.tasks(wid)["items"]}.get("b") == "queued",
        timeout=30,
        what="b to be queued",
    )
    done = client.surgery(wid, {"op": "replace", "task": "b", "type": "echo", "reason": "typo in the type"})
    assert done["revision"] == 1
    wf = wait_finished(client, wid)
    assert wf["status"] == "succeeded" and client.result(wid)["output"] == 1
    tasks = tasks_of(client, wid)
    assert tasks["a"]["attempt"] == 1 and tasks["b"]["attempt"] == 2  # a did not run again

    # A queued task whose type a live executor runs may start at any moment: refused.
    busy = submit(
        client, workflow("busy", *({"name": f"s{i}", "type": "sleep", "params": {"seconds": 5}} for i in range(60)))
    )
    # The last of 60 waits behind the executor's slots (and its prefetch) for 5 s at least.
    wait_until(
        lambda: (
            {t["name"]: t["status"] for t in client.tasks(busy)["items"]}.get("s59") == "queued"
            and client.workflow(busy)["progress"]["running"] > 0
        ),
        timeout=30,
        what="the executor busy and s59 waiting in its queue",
    )
    with pytest.raises(ClientError) as refused:
        client.surgery(busy, {"op": "retry", "task": "s59"})
    assert refused.value.status == 409 and "a live executor runs 'sleep'" in refused.value.message
    client.cancel(busy)


def test_skip_an_optional_task_gives_its_default(client: Client) -> None:
    doc = workflow(
        "skippy",
        {
            "name": "enrich",
            "type": "chaos.fail",
            "params": {"class": "permanent"},
            "optional": True,
            "default": {"score": 0.5},
        },
        {"name": "use", "type": "echo", "dependsOn": ["enrich"], "params": {"s": "{{ tasks.enrich.output.score }}"}},
        correction=OFF,
    )
    wid = failed(client, doc)
    client.surgery(wid, {"op": "skip", "task": "enrich", "reason": "enrichment is best-effort"})
    assert wait_finished(client, wid)["status"] == "succeeded"
    tasks = tasks_of(client, wid)
    assert tasks["enrich"]["status"] == "skipped" and tasks["enrich"]["output"] == {"score": 0.5}
    assert tasks["use"]["output"] == {"s": 0.5}


def test_refusals_are_clear(client: Client, stack: Stack) -> None:
    wid = failed(
        client,
        workflow("refuse", {"name": "t", "type": "chaos.fail", "params": {"class": "permanent"}}, correction=OFF),
    )
    cases = [
        ({"op": "skip", "task": "t"}, 422, "not optional"),
        ({"op": "retry", "task": "nope"}, 404, "no task named 'nope'"),
        ({"op": "replace", "task": "t", "type": "Bad Type"}, 422, "body.type: 'Bad Type' does not match"),
        ({"op": "retry", "task": "t\u0000"}, 422, "body.task: 't\\x00' does not match"),
        ({"op": "retry", "task": "t", "reason": "a\u0000b"}, 422, "body.reason: contains a NUL"),
        ({"op": "insert", "task": "t"}, 422, "needs the type"),
        # An option the operation does not use is refused, not ignored.
        ({"op": "skip", "task": "t", "params": {"x": 1}}, 422, "skip does not take params"),
        ({"op": "replace", "task": "t", "type": "echo", "delay": "5s"}, 422, "replace does not take delay"),
        ({"op": "retry", "task": "t", "type": "echo"}, 422, "retry does not take type (it takes only params, delay)"),
        # Params given to a surgery are held to a submitted task's rules and limits.
        ({"op": "retry", "task": "t", "params": {"text": "a\u0000b"}}, 422, "params.text: contains a NUL"),
        ({"op": "insert", "task": "t", "type": "noop", "params": {"x": "y" * 70_000}}, 422, "over the limit"),
        ({"op": "retry", "task": "t", "params": {"n": 2**70}}, 422, "does not fit in 64 bits"),
    ]
    for body, status, fragment in cases:
        with pytest.raises(ClientError) as info:
            client.surgery(wid, body)
        assert info.value.status == status, body
        assert fragment in info.value.message
    running = submit(client, workflow("busy", {"name": "s", "type": "sleep", "params": {"seconds": 30}}))
    from tests.support.wait import wait_until

    wait_until(lambda: client.workflow(running)["progress"]["running"] == 1, timeout=20, what="the sleep to start")
    with pytest.raises(ClientError) as info:
        client.surgery(running, {"op": "retry", "task": "s"})
    assert info.value.status == 409 and "running" in info.value.message
    client.cancel(running)
    outsider = client.create_token("surgeon-elsewhere", ["write"], ["elsewhere"])["token"]
    with stack.client(outsider) as other:
        with pytest.raises(ClientError) as info:
            other.surgery(wid, {"op": "retry", "task": "t"})
        assert info.value.status == 404
    assert client.revisions(wid) == []  # nothing was half-applied by any refusal


def test_secret_params_stay_masked_through_surgery(client: Client, stack: Stack) -> None:
    """A retry with edited params and an inserted repair task (which inherits the params) show
    secret values as *** in the diff, the revisions, the events and the tasks, and log none."""
    doc = workflow(
        "secret-surgery",
        {
            "name": "s",
            "type": "chaos.fail",
            "params": {"class": "permanent", "password": "first-xyzzy-1"},
            "secrets": ["password"],
        },
        correction=OFF,
    )
    wid = failed(client, doc)
    params = {"class": "permanent", "password": "second-xyzzy-2"}
    done = client.surgery(wid, {"op": "retry", "task": "s", "params": params})
    assert done["diff"][0]["old"]["password"] == "***" and done["diff"][0]["new"]["password"] == "***"
    assert wait_finished(client, wid)["status"] == "failed"
    done = client.surgery(wid, {"op": "insert", "task": "s", "type": "noop"})  # (echo would output them)
    assert done["diff"][0]["task"]["params"]["password"] == "***"
    wait_finished(client, wid)
    tasks = tasks_of(client, wid)
    assert tasks["s_repair1"]["params"]["password"] == "***"
    seen = repr(client.revisions(wid)) + repr(list(client.events(wid))) + repr(tasks)
    for proc in stack.procs.values():
        seen += proc.log.read_text(errors="replace")
    assert "first-xyzzy-1" not in seen and "second-xyzzy-2" not in seen
    # Where a task's secrets go (its type, its other params, an inserted task's output, which
    # becomes its params) is the submitter's or an admin's decision; a plain retry is anyone's.
    writer = client.create_token("secret-surgeon", ["write"], ["*"])["token"]
    with stack.client(writer) as as_writer:
        for body in (
            {"op": "replace", "task": "s", "type": "echo"},
            {"op": "insert", "task": "s", "type": "echo"},
            {"op": "insert", "task": "s", "type": "echo", "params": {"url": "https://elsewhere.example"}},
            {"op": "retry", "task": "s", "params": {"url": "https://elsewhere.example"}},
        ):
            with pytest.raises(ClientError) as info:
                as_writer.surgery(wid, body)
            assert info.value.status == 403 and "needs the admin scope" in info.value.message, body
        assert as_writer.surgery(wid, {"op": "retry", "task": "s"})["revision"] > 0


def test_an_inserted_task_waits_for_the_dependencies_it_takes_over(client: Client) -> None:
    """Inserted before a task whose parent is still running, the new task waits for that parent,
    and the task waits for the new one: nothing runs before its (new) dependencies."""
    from datetime import datetime

    from tests.support.wait import wait_until

    doc = workflow(
        "insert-while-running",
        {"name": "parent", "type": "sleep", "params": {"seconds": 1.5}},
        {"name": "child", "type": "noop", "dependsOn": ["parent"]},
        correction=OFF,
    )
    wid = submit(client, doc)
    wait_until(lambda: client.workflow(wid)["progress"]["running"] == 1, timeout=20, what="the parent to start")
    done = client.surgery(wid, {"op": "insert", "task": "child", "type": "noop", "name": "between"})
    assert done["revision"] == 1
    assert wait_finished(client, wid)["status"] == "succeeded"
    tasks = tasks_of(client, wid)

    def at(name: str, field: str) -> datetime:
        return datetime.fromisoformat(tasks[name][field])

    assert at("between", "started_at") >= at("parent", "finished_at")
    assert at("child", "started_at") >= at("between", "finished_at")
    assert tasks["child"]["depends_on"] == ["between"] and tasks["between"]["depends_on"] == ["parent"]


def test_a_task_whose_dependency_failed_cannot_be_brought_back_on_its_own(client: Client) -> None:
    """Retrying b while a, its dependency, stays failed would leave b pending for ever (and the
    revived workflow running for ever): refused with what to do instead; retrying a brings b back."""
    wid = failed(
        client,
        workflow(
            "upstream-dead",
            {"name": "a", "type": "chaos.fail", "params": {"class": "permanent"}},
            {"name": "b", "type": "noop", "dependsOn": ["a"]},
            correction=OFF,
        ),
    )
    for body in ({"op": "retry", "task": "b"}, {"op": "replace", "task": "b", "type": "echo"}):
        with pytest.raises(ClientError) as info:
            client.surgery(wid, body)
        assert info.value.status == 409
        assert "depends on 'a' (failed)" in info.value.message and "operate on 'a' instead" in info.value.message
    assert client.revisions(wid) == []
    assert client.workflow(wid)["status"] == "failed"
    client.surgery(wid, {"op": "replace", "task": "a", "type": "noop"})
    assert wait_finished(client, wid)["status"] == "succeeded"


def test_params_set_by_a_retry_win_over_an_earlier_repair_tasks_output(client: Client) -> None:
    wid = failed(
        client,
        workflow("edit-after-repair", {"name": "p", "type": "json.parse", "params": {"text": "x"}}, correction=OFF),
    )
    client.surgery(wid, {"op": "insert", "task": "p", "type": "echo", "params": {"text": "still bad"}})
    assert wait_finished(client, wid)["status"] == "failed"  # the echo "repaired" nothing
    done = client.surgery(wid, {"op": "retry", "task": "p", "params": {"text": '{"ok": 1}'}})
    assert done["diff"][0]["new"] == {"text": '{"ok": 1}'}
    assert wait_finished(client, wid)["status"] == "succeeded"  # what ran is what the diff said
    tasks = tasks_of(client, wid)
    assert tasks["p"]["output"] == {"value": {"ok": 1}}


def test_a_retry_can_give_templates_that_read_any_upstream_task(client: Client) -> None:
    wid = failed(
        client,
        workflow(
            "late-template",
            {"name": "a", "type": "echo", "params": {"text": "from a"}},
            {"name": "side", "type": "noop"},
            {"name": "b", "type": "chaos.fail", "dependsOn": ["a"], "params": {"class": "permanent"}},
            correction=OFF,
        ),
    )
    for params, complaint in (
        ({"output": "{{ tasks.side.output }}"}, "params.output: refers to tasks.side, which is not upstream of 'b'"),
        ({"output": "{{ params.nope }}"}, "params.output: refers to params.nope, which spec.params does not define"),
        ({"output": "{{ tasks.a.output.text"}, "params.output: "),
    ):
        with pytest.raises(ClientError) as info:
            client.surgery(wid, {"op": "retry", "task": "b", "params": params})
        assert info.value.status == 422 and complaint in info.value.message, info.value.message
    assert client.revisions(wid) == []  # nothing half-done
    client.surgery(
        wid, {"op": "retry", "task": "b", "params": {"probability": 0, "output": "{{ tasks.a.output.text }}"}}
    )
    assert wait_finished(client, wid)["status"] == "succeeded"
    tasks = tasks_of(client, wid)
    assert tasks["b"]["output"] == "from a"


def test_an_inserted_task_takes_upstream_values_as_data_not_as_templates(client: Client) -> None:
    """An upstream output that looks like a template ("{{ name }}" in a model's answer) reaches a
    repair task as it is: rendering it again would fail (or read what it should not)."""
    wid = failed(
        client,
        workflow(
            "braces",
            {"name": "a", "type": "echo", "params": {"text": "{{ '{{ name }} is not JSON' }}"}},
            {"name": "p", "type": "json.parse", "dependsOn": ["a"], "params": {"text": "{{ tasks.a.output.text }}"}},
            correction=OFF,
        ),
    )
    client.surgery(wid, {"op": "insert", "task": "p", "type": "echo"})
    assert wait_finished(client, wid)["status"] == "failed"  # p still cannot parse it
    tasks = tasks_of(client, wid)
    assert tasks["p_repair1"]["status"] == "succeeded"
    assert tasks["p_repair1"]["output"] == {"text": "{{ name }} is not JSON"}


def test_a_cancelled_workflow_stays_cancelled(client: Client) -> None:
    wid = submit(client, workflow("no-revival", {"name": "a", "type": "test.nobody"}, correction=OFF))
    client.cancel(wid)
    assert wait_finished(client, wid)["status"] == "cancelled"
    with pytest.raises(ClientError) as info:
        client.surgery(wid, {"op": "replace", "task": "a", "type": "noop"})
    assert info.value.status == 409 and "the workflow was cancelled" in info.value.message
    assert client.workflow(wid)["status"] == "cancelled" and client.revisions(wid) == []


def test_reviving_an_aborted_workflow_brings_back_the_branches_the_abort_cancelled(client: Client) -> None:
    wid = submit(
        client,
        workflow(
            "abort-then-retry",
            {"name": "a", "type": "chaos.fail", "params": {"class": "permanent", "output": {"v": 1}}},
            {"name": "a2", "type": "noop", "dependsOn": ["a"]},
            # Still running when a fails (however slow the machine), quick once revived.
            {"name": "b", "type": "sleep", "params": {"seconds": "{{ 60 if task.attempt == 1 else 0 }}"}},
            {"name": "c", "type": "noop", "dependsOn": ["b"]},
            correction={"mode": "rules"},  # a permanent failure of a required task: abort
        ),
    )
    assert wait_finished(client, wid)["status"] == "failed"
    tasks = tasks_of(client, wid)
    assert tasks["b"]["status"] == "cancelled" and tasks["c"]["status"] == "cancelled"
    client.surgery(wid, {"op": "retry", "task": "a", "params": {"probability": 0}})
    assert wait_finished(client, wid)["status"] == "succeeded"
    assert {t["name"]: t["status"] for t in client.tasks(wid)["items"]} == dict.fromkeys(
        ("a", "a2", "b", "c"), "succeeded"
    )


def test_a_skip_cannot_run_the_tasks_after_a_failed_dependency(client: Client) -> None:
    wid = failed(
        client,
        workflow(
            "skip-dead-upstream",
            {"name": "a", "type": "chaos.fail", "params": {"class": "permanent"}},
            {"name": "b", "type": "noop", "dependsOn": ["a"], "optional": True, "default": {}},
            {"name": "c", "type": "noop", "dependsOn": ["b"]},
            correction=OFF,
        ),
    )
    with pytest.raises(ClientError) as info:
        client.surgery(wid, {"op": "skip", "task": "b"})
    assert info.value.status == 409 and "operate on 'a' instead" in info.value.message
    assert client.workflow(wid)["status"] == "failed" and client.revisions(wid) == []


def test_a_writer_cannot_redirect_secrets_through_an_upstream_task(client: Client, stack: Stack) -> None:
    """Changing what an upstream task outputs changes the params a secret-bearing task renders
    from it (here, where its header goes): that needs the admin scope too."""
    wid = failed(
        client,
        workflow(
            "secret-upstream",
            {"name": "src", "type": "chaos.fail", "params": {"class": "permanent", "output": {"url": "http://a"}}},
            {"name": "mid", "type": "echo", "dependsOn": ["src"], "params": {"url": "{{ tasks.src.output.url }}"}},
            {
                "name": "call",
                "type": "echo",
                "dependsOn": ["mid"],
                "params": {"url": "{{ tasks.mid.output.url }}", "token": "t0p-secret"},
                "secrets": ["token"],
            },
            {"name": "free", "type": "chaos.fail", "params": {"class": "permanent"}},
            correction=OFF,
        ),
    )
    writer = client.create_token("upstream-surgeon", ["write"], ["*"])["token"]
    with stack.client(writer) as as_writer:
        for body in (
            {"op": "retry", "task": "src", "params": {"probability": 0, "output": {"url": "http://stolen"}}},
            {"op": "replace", "task": "src", "type": "echo"},
            {"op": "insert", "task": "src", "type": "echo"},
        ):
            with pytest.raises(ClientError) as info:
                as_writer.surgery(wid, body)
            assert info.value.status == 403, body
            assert "task 'call', downstream of 'src', has secret params" in info.value.message, body
        assert as_writer.surgery(wid, {"op": "retry", "task": "free", "params": {"probability": 0}})["revision"] == 1
    assert client.surgery(wid, {"op": "retry", "task": "src", "params": {"probability": 0}})["revision"] == 2


def test_inserting_twice_before_a_long_named_task_picks_free_names(client: Client) -> None:
    long = "t" * 60
    wid = failed(
        client,
        workflow("long-name", {"name": long, "type": "chaos.fail", "params": {"class": "permanent"}}, correction=OFF),
    )
    names = []
    for _ in range(2):
        done = client.surgery(wid, {"op": "insert", "task": long, "type": "noop"})
        names.append(done["diff"][0]["task"]["name"])
        wait_finished(client, wid)
    assert len(set(names)) == 2 and all(len(n) <= 63 and "_repair" in n for n in names), names
