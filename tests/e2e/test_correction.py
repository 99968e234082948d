"""Correction Mode on the live stack: the policy picks a surgery, the DAG changes, the decision is
logged with what the learning loop needs, and the outcome is filled in when known."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest

from dagsmith.client import Client
from dagsmith.settings import Settings
from tests.e2e.conftest import pg, submit, wait_finished, workflow
from tests.support.stack import Stack
from tests.support.wait import wait_until

pytestmark = pytest.mark.e2e


def decisions(settings: Settings, wid: str) -> list[dict[str, Any]]:
    with pg(settings) as conn:
        conn.row_factory = psycopg.rows.dict_row
        return conn.execute("SELECT * FROM correction_decisions WHERE workflow_id = %s ORDER BY id", (wid,)).fetchall()


def test_rules_insert_a_repair_task_for_bad_input(client: Client, settings: Settings) -> None:
    doc = workflow(
        "auto-repair",
        {"name": "parse", "type": "json.parse", "params": {"text": "```json\n{'answer': 42,}\n```"}},
        output="{{ tasks.parse.output.value }}",
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid)
    assert wf["status"] == "succeeded", wf
    assert client.result(wid)["output"] == {"answer": 42}
    (rev,) = client.revisions(wid)
    assert rev["actor"] == "rules" and rev["operation"] == "insert"
    assert rev["reason"]["error_class"] == "invalid_input" and rev["reason"]["action"] == "insert_repair"
    (d,) = decisions(settings, wid)
    assert d["action"] == "insert_repair" and d["policy_version"] == "rules-v1" and d["mode"] == "rules"
    assert d["probability"] == 1.0 and sum(d["probabilities"]) == pytest.approx(1.0)
    assert len(d["observation"]) == 43  # the feature vector of schema v1
    assert d["mask"][4] is True  # insert_repair was valid: json.parse declares json.repair
    assert d["features"]["has_repair"] is True and d["features"]["error_class"] == "invalid_input"
    assert d["outcome"]["fixed"] is True and d["outcome"]["inserted"] == 1


def test_rules_retry_a_transient_failure_within_the_correction_allowance(client: Client, settings: Settings) -> None:
    wid = submit(client, workflow("blip", {"name": "b", "type": "chaos.flaky", "params": {"failTimes": 1}}))
    assert wait_finished(client, wid)["status"] == "succeeded"
    (d,) = decisions(settings, wid)
    assert d["action"] == "retry_now" and d["features"]["max_retries"] == 2  # spec.correction.maxRetries
    assert d["outcome"]["fixed"] is True
    # The task's history reads as one story: each transition starts where the one before ended,
    # and the surgery's says which attempt failed and why.
    with pg(settings) as conn:
        history = conn.execute(
            "SELECT from_status, to_status, reason FROM task_events WHERE workflow_id = %s AND task_id IS NOT NULL "
            "ORDER BY id",
            (wid,),
        ).fetchall()
    assert all(prev[1] == cur[0] for prev, cur in itertools.pairwise(history)), history
    assert ("running", "pending") in [(f, t) for f, t, _ in history]
    assert any(r and r.startswith("attempt 1 failed (transient); surgery r1: retry") for _, _, r in history), history


def test_rules_reroute_to_the_fallback(client: Client) -> None:
    doc = workflow(
        "reroute",
        {
            "name": "call",
            "type": "chaos.fail",
            "params": {"class": "unavailable"},
            "fallback": ["echo"],
            "retry": {"backoff": {"initial": "100ms"}},
        },
    )
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "succeeded"
    ops = [r["operation"] for r in client.revisions(wid)]
    assert ops == ["retry", "reroute"]  # unavailable: back off first, then another capability
    (node,) = client.dag(wid)["nodes"]
    assert node["type"] == "echo" and node["rerouted"] is True


def test_rules_reroute_to_a_fallback_the_executors_declare(client: Client) -> None:
    """No fallback in the spec: the registry's (chaos.outage's executors name echo) is used."""
    doc = workflow(
        "registry-fallback",
        {"name": "call", "type": "chaos.outage", "params": {"v": 1}, "retry": {"backoff": {"initial": "100ms"}}},
    )
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "succeeded"
    assert [r["operation"] for r in client.revisions(wid)] == ["retry", "reroute"]
    (node,) = client.dag(wid)["nodes"]
    assert node["type"] == "echo" and node["rerouted"] is True
    assert {"type": "chaos.outage", "fallback": ["echo"]}.items() <= next(
        c for e in client.executors() for c in e["capabilities"] if c["type"] == "chaos.outage"
    ).items()


def test_rules_tune_a_timeout(client: Client) -> None:
    doc = workflow("tune", {"name": "slow", "type": "chaos.hang", "params": {"seconds": 1.2}, "timeout": "1s"})
    wid = submit(client, doc)
    assert wait_finished(client, wid, timeout=30)["status"] == "succeeded"
    (rev,) = client.revisions(wid)
    assert rev["reason"]["action"] == "retry_tuned"
    assert {"op": "set", "task": "slow", "field": "timeout", "old": 1.0, "new": 2.0} in rev["diff"]


def test_skip_optional_and_abort_otherwise(client: Client) -> None:
    doc = workflow(
        "skip-me",
        {
            "name": "extra",
            "type": "chaos.fail",
            "params": {"class": "permanent"},
            "optional": True,
            "default": {"n": 0},
        },
        {"name": "use", "type": "echo", "dependsOn": ["extra"], "params": {"n": "{{ tasks.extra.output.n }}"}},
    )
    wid = submit(client, doc)
    assert wait_finished(client, wid)["status"] == "succeeded"
    assert {t["name"]: t["status"] for t in client.tasks(wid)["items"]} == {"extra": "skipped", "use": "succeeded"}

    doc = workflow(
        "abort-me",
        {"name": "doomed", "type": "chaos.fail", "params": {"class": "permanent", "message": "no way"}},
        {"name": "bystander", "type": "sleep", "params": {"seconds": 30}},
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid)
    assert wf["status"] == "failed"
    assert wf["error"]["code"] == "aborted"
    assert "task 'doomed' failed: permanent: no way" in wf["error"]["message"]
    statuses = {t["name"]: t["status"] for t in client.tasks(wid)["items"]}
    assert statuses == {"doomed": "failed", "bystander": "cancelled"}  # aborting cancels what runs
    events = [e for kind, e in client.events(wid) if kind == "transition"]
    assert any(e["task"] == "bystander" and e["to"] == "cancelled" for e in events)  # the history says so
    assert events[-1]["to"] == "failed" and events[-1]["task"] is None


def test_budget_exhausted_fails_with_a_clear_reason(client: Client) -> None:
    doc = workflow(
        "budget",
        {"name": "t", "type": "chaos.fail", "params": {"class": "transient"}},
        correction={"maxSurgeries": 1, "maxRetries": 5},
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid)
    assert wf["status"] == "failed"
    assert wf["dag_revision"] == 2  # one retry, then the abort
    assert "correction" in wf["error"]["message"]


@pytest.mark.parametrize(
    ("budget", "task", "named"),
    [
        (
            {"maxInsertedTasks": 0},
            {"name": "parse", "type": "json.parse", "params": {"text": "{'answer': 42,}"}},
            "maxInsertedTasks (0) reached",
        ),
        (
            {"timeBudget": "1s", "maxRetries": 50},
            {"name": "t", "type": "chaos.fail", "params": {"class": "transient"}, "retry": {"limit": 0}},
            "timeBudget",
        ),
        (
            {"taskSecondsBudget": 0.5, "maxRetries": 50},
            {"name": "t", "type": "chaos.hang", "params": {"seconds": 30}, "timeout": "0.3s"},
            "taskSecondsBudget",
        ),
    ],
)
def test_each_budget_ends_correction_with_a_clear_reason(
    client: Client, budget: dict[str, Any], task: dict[str, Any], named: str
) -> None:
    wid = submit(client, workflow(f"budget-{named.split()[0].lower()}", task, correction=budget))
    wf = wait_finished(client, wid, timeout=60)
    assert wf["status"] == "failed"
    assert named in wf["error"]["message"], wf["error"]


def test_surgery_survives_a_controller_crash_in_the_middle(stack: Stack, client: Client, settings: Settings) -> None:
    """A trigger holds the surgery's transaction open; the controller is killed inside it.
    Nothing is half-applied, the failed result is redelivered, and the surgery happens once."""
    with pg(settings) as conn:
        conn.execute(
            """
            CREATE OR REPLACE FUNCTION test_hold_surgery() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.task_name = 'held' THEN PERFORM pg_sleep(30); END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER test_hold_surgery BEFORE INSERT ON dag_revisions
                FOR EACH ROW EXECUTE FUNCTION test_hold_surgery();
            """
        )
    try:
        wid = submit(client, workflow("crashy", {"name": "held", "type": "chaos.flaky", "params": {"failTimes": 1}}))
        with pg(settings) as conn:
            wait_until(
                lambda: conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%INSERT INTO dag_revisions%' "
                    "AND state = 'active'"
                ).fetchone()[0],  # type: ignore[index]
                timeout=30,
                what="the controller to be inside the surgery",
            )
            stack.kill("controller")
            conn.execute("DROP TRIGGER test_hold_surgery ON dag_revisions")
            assert conn.execute("SELECT count(*) FROM dag_revisions WHERE workflow_id = %s", (wid,)).fetchone() == (0,)
        stack.start("controller", "controller")
        assert wait_finished(client, wid, timeout=60)["status"] == "succeeded"
        assert len(client.revisions(wid)) == 1
        assert len(decisions(settings, wid)) == 1
    finally:
        with pg(settings) as conn:
            conn.execute("DROP TRIGGER IF EXISTS test_hold_surgery ON dag_revisions")
            # the killed controller's backend may still sleep in the trigger: end it
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)%' "
                "AND pid <> pg_backend_pid()"
            )
        if not stack.procs["controller"].alive():
            stack.start("controller", "controller")


def test_a_decision_that_did_not_fix_records_what_the_next_attempt_cost(client: Client, settings: Settings) -> None:
    """The learner weighs actions by what they cost: a decision followed by another failure is
    closed with the run time of the attempt it led to (it used to be recorded as 0)."""
    doc = workflow(
        "costly",
        {"name": "t", "type": "chaos.hang", "params": {"seconds": 30}, "timeout": "0.4s"},
        correction={"maxSurgeries": 1},
    )
    wid = submit(client, doc)
    assert wait_finished(client, wid, timeout=30)["status"] == "failed"
    first, second = decisions(settings, wid)
    assert first["outcome"]["fixed"] is False and first["outcome"]["follow_up"] == second["id"]
    assert 0.3 <= first["outcome"]["task_seconds"] <= 5.0, first["outcome"]


def test_a_budget_that_runs_out_ends_correction_at_once_and_logs_the_abort(client: Client, settings: Settings) -> None:
    """The task-seconds budget counts the attempt that just failed (it used to be checked one
    attempt late), and the decision logged is the abort the controller took, not the retry the
    rules chose before the budget ruled it out (the learner would blame the retry)."""
    doc = workflow(
        "spent",
        {"name": "t", "type": "chaos.hang", "params": {"seconds": 30}, "timeout": "0.3s"},
        correction={"taskSecondsBudget": 0.5, "maxRetries": 50},
    )
    wid = submit(client, doc)
    wf = wait_finished(client, wid, timeout=60)
    assert wf["status"] == "failed"
    assert [t["attempt"] for t in client.tasks(wid)["items"]] == [2]  # 0.3 s, then 0.6 s: over 0.5 s
    first, last = decisions(settings, wid)
    assert first["action"] != "abort"
    assert last["action"] == "abort" and last["probability"] == 1.0
    assert last["fallback_reason"].startswith("budget: tasks ran"), last["fallback_reason"]
    assert last["outcome"]["ended"] == "abort"


@pytest.mark.parametrize("mode", ["off", "rules"])
def test_a_retry_goes_when_its_backoff_ends_not_at_the_next_resync(stack: Stack, client: Client, mode: str) -> None:
    """With a resync interval of two minutes, three attempts separated by 100 ms backoffs still
    finish in seconds: the controller sets a timer for each backoff (they used to wait for the
    resync), both for the spec's retries (mode off) and for Correction Mode's retry_backoff."""
    stack.stop("controller")
    stack.start("controller", "controller", env={"DAGSMITH_RESYNC_INTERVAL": "120"})
    try:
        doc = workflow(
            f"backoff-{mode}",
            {
                "name": "t",
                "type": "chaos.fail",
                "params": {"class": "transient"},
                "retry": {"limit": 2, "backoff": {"initial": "100ms", "factor": 1}},
            },
            correction={"mode": mode, "maxRetries": 2},
        )
        wid = submit(client, doc)
        assert wait_finished(client, wid, timeout=30)["status"] == "failed"
        (task,) = client.tasks(wid)["items"]
        assert task["attempt"] == 3
    finally:
        stack.stop("controller")
        stack.start("controller", "controller")


def test_decisions_left_open_by_a_cancelled_workflow_are_closed_as_censored(client: Client, settings: Settings) -> None:
    """A decision whose task is cancelled before its outcome is known does not stay open for ever;
    it is closed as censored, and the trainer's records leave it out."""
    doc = workflow(
        "censored",
        {"name": "t", "type": "chaos.hang", "params": {"seconds": 60}, "timeout": "0.3s"},
        correction={"maxSurgeries": 3},
    )
    wid = submit(client, doc)
    wait_until(lambda: decisions(settings, wid), timeout=30, what="the first correction decision")
    client.cancel(wid)
    assert wait_finished(client, wid)["status"] == "cancelled"
    logged = decisions(settings, wid)
    assert all(d["outcome"] is not None for d in logged), logged
    assert logged[-1]["outcome"]["censored"] is True and logged[-1]["outcome"]["ended"] == "workflow_cancelled"
    from sqlalchemy import create_engine

    from trainer.loop import load_records

    engine = create_engine(settings.database_url.get_secret_value())
    with engine.connect() as conn:
        assert logged[-1]["id"] not in {r["id"] for r in load_records(conn)}
    engine.dispose()
