"""A user's view: submit over HTTP, let the real services run it, read the results."""

from __future__ import annotations

import collections

import pytest

from dagsmith.client import Client, ClientError
from dagsmith.settings import Settings
from tests.e2e.conftest import EXAMPLES, pg, submit, wait_finished, workflow
from tests.support.stack import Stack
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e

# These tests are about the spec's own retry policy: Correction Mode stays out of the way.
RETRY_POLICY_ONLY = {"mode": "off"}


def test_hello_example(client: Client) -> None:
    wid = client.submit((EXAMPLES / "hello.yaml").read_bytes())["id"]
    assert wait_finished(client, wid)["status"] == "succeeded"
    result = client.result(wid)
    assert result["output"] == {"result": "HELLO WORLD"}
    assert result["total_reward"] > 1.5
    tasks = {t["name"]: t for t in client.tasks(wid)["items"]}
    assert tasks["shout"]["resolved_params"] == {"text": "Hello world"}
    assert tasks["shout"]["feedback_notes"]["verdict"] == "pass"
    assert tasks["shout"]["reward"] == pytest.approx(1.0, abs=0.05)


def test_diamond_runs_join_after_both_branches(client: Client) -> None:
    doc = workflow(
        "diamond",
        {"name": "a", "type": "echo", "params": {"n": 1}},
        {"name": "b", "type": "echo", "dependsOn": ["a"], "params": {"left": "{{ tasks.a.output.n }}"}},
        {"name": "c", "type": "sleep", "dependsOn": ["a"], "params": {"seconds": 0.3}},
        {
            "name": "d",
            "type": "json.merge",
            "dependsOn": ["b", "c"],
            "params": {"objects": ["{{ tasks.b.output }}", "{{ tasks.c.output }}"]},
        },
        output="{{ tasks.d.output.value }}",
    )
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "succeeded"
    assert client.result(wid)["output"] == {"left": 1, "slept": 0.3}
    t = {x["name"]: x for x in client.tasks(wid)["items"]}
    assert t["d"]["started_at"] >= max(t["b"]["finished_at"], t["c"]["finished_at"])


def test_fan_out_fan_in_200(client: Client) -> None:
    doc = workflow(
        "fan",
        {"name": "root", "type": "noop"},
        *({"name": f"w{i}", "type": "echo", "dependsOn": ["root"], "params": {"i": i}} for i in range(200)),
        {
            "name": "join",
            "type": "echo",
            "dependsOn": [f"w{i}" for i in range(200)],
            "params": {"first": "{{ tasks.w0.output.i }}", "last": "{{ tasks.w199.output.i }}"},
        },
        output="{{ tasks.join.output }}",
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid, timeout=90)
    assert wf["status"] == "succeeded"
    assert wf["progress"]["succeeded"] == 202
    assert client.result(wid)["output"] == {"first": 0, "last": 199}
    t = {x["name"]: x for x in client.tasks(wid, limit=1000)["items"]}
    assert t["join"]["started_at"] >= max(t[f"w{i}"]["finished_at"] for i in range(200))


def test_retry_then_succeed(client: Client) -> None:
    doc = workflow(
        "flaky",
        {
            "name": "flaky",
            "type": "chaos.flaky",
            "params": {"failTimes": 2},
            "retry": {"limit": 3, "backoff": {"initial": "100ms", "factor": 2, "max": "1s"}},
        },
        correction=RETRY_POLICY_ONLY,
    )
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "succeeded"
    (task,) = client.tasks(wid)["items"]
    assert task["attempt"] == 3
    assert task["retries"] == 2
    assert task["output"] == {"attempt": 3}
    assert task["reward"] == pytest.approx(0.8, abs=0.01)  # two retries cost 0.1 each
    transitions = [e["to"] for _, e in client.events(wid) if e.get("task") == "flaky"]
    assert transitions.count("pending") == 2  # two scheduled retries


def test_retries_exhausted_fails_and_cancels_downstream(client: Client) -> None:
    doc = workflow(
        "exhausted",
        {
            "name": "bad",
            "type": "chaos.flaky",
            "params": {"failTimes": 5},
            "retry": {"limit": 1, "backoff": {"initial": "50ms"}},
        },
        {"name": "after", "type": "noop", "dependsOn": ["bad"]},
        {"name": "independent", "type": "noop"},
        correction=RETRY_POLICY_ONLY,
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid)
    assert wf["status"] == "failed"
    assert wf["error"]["task"] == "bad"
    assert "transient" in wf["error"]["message"]
    t = {x["name"]: x for x in client.tasks(wid)["items"]}
    assert t["bad"]["status"] == "failed" and t["bad"]["attempt"] == 2
    assert t["after"]["status"] == "cancelled"
    assert t["independent"]["status"] == "succeeded"


def test_permanent_errors_are_not_retried(client: Client) -> None:
    doc = workflow(
        "permanent",
        {"name": "p", "type": "chaos.fail", "params": {"class": "invalid_input"}, "retry": {"limit": 3}},
        correction=RETRY_POLICY_ONLY,
    )
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "failed"
    (task,) = client.tasks(wid)["items"]
    assert task["attempt"] == 1
    assert task["error"]["class"] == "invalid_input"


def test_output_failing_expect_is_failed_by_the_evaluator(client: Client) -> None:
    doc = workflow("expect", {"name": "e", "type": "echo", "params": {"a": 1}, "expect": {"required": ["b"]}})
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "failed"
    (task,) = client.tasks(wid)["items"]
    assert task["error"]["class"] == "invalid_output"
    assert task["feedback_notes"]["checks"][1] == {
        "name": "expect",
        "passed": False,
        "detail": "output: 'b' is a required property",
    }


def test_timeout(client: Client) -> None:
    doc = workflow(
        "timeout",
        {"name": "slow", "type": "chaos.hang", "params": {"seconds": 60}, "timeout": "1s"},
        correction=RETRY_POLICY_ONLY,
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid, timeout=30)
    assert wf["status"] == "failed"
    (task,) = client.tasks(wid)["items"]
    assert task["error"]["class"] == "timeout"


def test_cancel_stops_running_and_drops_queued(client: Client, stack: Stack) -> None:
    doc = workflow(
        "cancel-me",
        {"name": "long", "type": "sleep", "params": {"seconds": 60}},
        {"name": "next", "type": "noop", "dependsOn": ["long"]},
    )
    wid = submit(client, doc)
    wait_until(lambda: client.workflow(wid)["progress"]["running"] == 1, timeout=20, what="the sleep to start")
    client.cancel(wid)
    wf = wait_finished(client, wid, timeout=20)
    assert wf["status"] == "cancelled"
    assert {t["status"] for t in client.tasks(wid)["items"]} == {"cancelled"}
    wait_until(
        lambda: all(e["running"] == 0 for e in client.executors() if e["alive"]),
        timeout=15,
        what="the executor to stop the cancelled sleep",
    )
    with pytest.raises(ClientError) as info:
        client.cancel(wid)
    assert info.value.status == 409


def test_result_is_409_until_finished(client: Client) -> None:
    wid = submit(client, workflow("later", {"name": "s", "type": "sleep", "params": {"seconds": 0.5}}))
    with pytest.raises(ClientError) as info:
        client.result(wid)
    assert info.value.status == 409
    assert info.value.code == "not_finished"
    wait_finished(client, wid)
    assert client.result(wid)["status"] == "succeeded"


def test_idempotent_resubmission(client: Client) -> None:
    doc = workflow("idem", {"name": "a", "type": "noop"})
    first = client.submit(__import__("orjson").dumps(doc), content_type="application/json", idempotency_key="key-1")
    again = client.submit(__import__("orjson").dumps(doc), content_type="application/json", idempotency_key="key-1")
    assert first["created"] is True
    assert again["created"] is False
    assert again["id"] == first["id"]
    other = workflow("idem", {"name": "b", "type": "noop"})
    with pytest.raises(ClientError) as info:
        client.submit(__import__("orjson").dumps(other), content_type="application/json", idempotency_key="key-1")
    assert info.value.status == 409


def test_events_stream_and_dag(client: Client) -> None:
    wid = submit(
        client, workflow("watch", {"name": "a", "type": "noop"}, {"name": "b", "type": "noop", "dependsOn": ["a"]})
    )
    events = list(client.events(wid))
    assert events[-1] == ("end", {"status": "succeeded"})
    task_events = [(d["task"], d["to"]) for kind, d in events if kind == "transition" and d["task"]]
    assert task_events.index(("a", "succeeded")) < task_events.index(("b", "queued"))
    graph = client.dag(wid)
    assert {(e["from"], e["to"]) for e in graph["edges"]} == {("a", "b")}
    assert {n["status"] for n in graph["nodes"]} == {"succeeded"}
    assert "t_a --> t_b" in client.dag(wid, "mermaid")
    assert '"a" -> "b";' in client.dag(wid, "dot")


def test_unknown_type_waits_visibly(client: Client) -> None:
    body = __import__("orjson").dumps(workflow("nobody", {"name": "x", "type": "test.nobody"}))
    submitted = client.submit(body, content_type="application/json")
    assert submitted["warnings"][0]["code"] == "unknown_type"
    wid = submitted["id"]
    wait_until(lambda: client.workflow(wid)["progress"]["queued"] == 1, timeout=20, what="the task to be queued")
    client.cancel(wid)
    assert wait_finished(client, wid)["status"] == "cancelled"


def test_task_counters_match_task_rows(settings: Settings, client: Client) -> None:
    """The triggers' counters agree with a full count for every workflow the suite ran."""
    with pg(settings) as conn:
        rows = conn.execute(
            """
            SELECT w.id, w.n_total, w.n_pending, w.n_queued, w.n_running, w.n_succeeded, w.n_failed, w.n_skipped,
                   w.n_cancelled, array_agg(t.status) AS statuses
            FROM workflows w JOIN tasks t ON t.workflow_id = w.id GROUP BY w.id
            """
        ).fetchall()
    assert rows
    for row in rows:
        counts = collections.Counter(row[9])
        assert row[1] == sum(counts.values())
        assert list(row[2:9]) == [
            counts[s] for s in ("pending", "queued", "running", "succeeded", "failed", "skipped", "cancelled")
        ]


def test_queue_timeout_fails_a_task_no_executor_runs(client: Client) -> None:
    doc = workflow(
        "unrunnable",
        {"name": "x", "type": "test.nobody", "queueTimeout": "1s"},
        {"name": "after", "type": "noop", "dependsOn": ["x"]},
        correction=RETRY_POLICY_ONLY,
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid, timeout=30)
    assert wf["status"] == "failed"
    tasks = {t["name"]: t for t in client.tasks(wid)["items"]}
    assert tasks["x"]["error"]["class"] == "unavailable"
    assert "queueTimeout" in tasks["x"]["error"]["message"]
    assert tasks["after"]["status"] == "cancelled"
