"""The CLI as users call it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from tests.e2e.conftest import EXAMPLES
from tests.support.stack import Stack, free_port

pytestmark = pytest.mark.e2e


def cli(
    stack: Stack,
    *args: str,
    stdin: bytes | None = None,
    url: str | None = None,
    token: str | None = None,
    columns: int | None = 200,  # None: no COLUMNS, as when the output is piped
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_") and k != "COLUMNS"}
    env.update({"DAGSMITH_API": url or stack.url, "DAGSMITH_TOKEN": token or stack.token or "", **extra})
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "dagsmith", *args],
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_submit_wait_prints_result_and_exits_0(stack: Stack) -> None:
    done = cli(stack, "submit", str(EXAMPLES / "hello.yaml"), "--wait")
    assert done.returncode == 0, done.stderr
    assert '"result": "HELLO WORLD"' in done.stdout
    assert "succeeded" in done.stderr


def test_watch_shows_progress(stack: Stack) -> None:
    done = cli(stack, "submit", str(EXAMPLES / "hello.yaml"), "--watch")
    assert done.returncode == 0, done.stderr
    assert "2/2" in done.stderr


def test_watch_follows_a_submitted_workflow_to_its_result(stack: Stack) -> None:
    submitted = cli(stack, "submit", str(EXAMPLES / "hello.yaml"))
    assert submitted.returncode == 0, submitted.stderr
    wid = submitted.stdout.strip()
    done = cli(stack, "watch", wid)
    assert done.returncode == 0, done.stderr
    assert "2/2" in done.stderr and '"result": "HELLO WORLD"' in done.stdout
    missing = cli(stack, "watch", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 4, missing.stderr


def test_failed_workflow_exits_1_with_reason(stack: Stack, tmp_path: Path) -> None:
    spec = tmp_path / "fail.yaml"
    spec.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: fails}\n"
        "spec:\n  tasks:\n    - {name: bad, type: chaos.fail, params: {class: permanent, message: nope}}\n"
    )
    done = cli(stack, "submit", str(spec), "--wait")
    assert done.returncode == 1
    assert "task 'bad' failed: permanent: nope" in done.stderr
    assert done.stdout == ""  # a failed workflow has no output to print (it used to print null)


def test_invalid_spec_exits_2_listing_problems(stack: Stack) -> None:
    body = (
        b"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: x}\n"
        b"spec:\n  tasks:\n    - {name: a, type: noop, dependsOn: [zz]}\n"
    )
    done = cli(stack, "submit", "-", stdin=body)
    assert done.returncode == 2
    assert "spec.tasks[0].dependsOn[0]" in done.stderr
    assert done.stderr.count("no task is named 'zz'") == 1  # named once, not repeated under the header
    # Several problems: a head, then each once, in document order.
    three = (
        b"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: x}\n"
        b"spec:\n  tasks:\n    - {name: a, type: noop, dependsOn: [zz]}\n"
        b"    - {name: b, type: noop, dependsOn: [ww]}\n    - {name: c, type: noop, dependsOn: [yy]}\n"
    )
    done = cli(stack, "submit", "-", stdin=three)
    lines = done.stderr.splitlines()
    assert lines[0] == "error: the workflow document has 3 problems:", done.stderr
    assert [line.split(":")[0].strip() for line in lines[1:4]] == [
        "spec.tasks[0].dependsOn[0]",
        "spec.tasks[1].dependsOn[0]",
        "spec.tasks[2].dependsOn[0]",
    ], done.stderr
    # What the server says is printed as it is: brackets in it are not taken for terminal markup.
    bad_type = body.replace(b"type: noop", b"type: 'Text Upper'")
    done = cli(stack, "submit", "-", stdin=bad_type)
    assert done.returncode == 2 and "[a-z]" in done.stderr, done.stderr


def test_a_file_of_several_workflows_submits_each(stack: Stack, tmp_path: Path) -> None:
    head = "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {{name: {name}}}\n"
    body = "spec:\n  tasks: [{name: t, type: noop}]\n"
    both = tmp_path / "both.yaml"
    both.write_text(head.format(name="one") + body + "---\n" + head.format(name="two") + body)
    done = cli(stack, "submit", str(both), "--wait")
    assert done.returncode == 0, done.stderr
    assert "submitted workflow one" in done.stderr and "submitted workflow two" in done.stderr
    assert done.stderr.count("succeeded") == 2
    ids = cli(stack, "submit", str(both)).stdout.split()
    assert len(ids) == 2 and ids[0] != ids[1]
    keyed = cli(stack, "submit", str(both), "--idempotency-key", "k")
    assert keyed.returncode == 2 and "holds 2" in keyed.stderr
    # The second is invalid: the first is in, and the error says which document and what went in.
    bad = tmp_path / "bad.yaml"
    bad.write_text(head.format(name="fine") + body + "---\n" + head.format(name="Bad_Name") + body)
    half = cli(stack, "submit", str(bad))
    assert half.returncode == 2, half.stderr
    assert "in document 2 of 2 (1 before it submitted: " in half.stderr and "metadata.name" in half.stderr


def test_unreachable_api_exits_3(stack: Stack) -> None:
    done = cli(stack, "list", url=f"http://127.0.0.1:{free_port()}", columns=40)
    assert done.returncode == 3
    assert "cannot reach the API" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # one line, not wrapped at the terminal's width


def test_status_result_dag_and_not_found(stack: Stack) -> None:
    submitted = cli(stack, "submit", str(EXAMPLES / "hello.yaml"), "--wait")
    wid = next(line.split()[-1] for line in submitted.stderr.splitlines() if line.startswith("submitted workflow"))
    status = cli(stack, "status", wid)
    assert status.returncode == 0 and "succeeded" in status.stdout
    assert json.loads(cli(stack, "status", wid, "--json").stdout)["status"] == "succeeded"
    live = json.loads(cli(stack, "executors", "--json").stdout)
    assert live and all(e["alive"] for e in live[:1])
    result = cli(stack, "result", wid)
    assert result.returncode == 0 and "HELLO WORLD" in result.stdout
    dag = cli(stack, "dag", wid, "--format", "mermaid")
    assert dag.stdout.startswith("flowchart TD")
    listing = cli(stack, "list", columns=60)
    assert wid in listing.stdout  # whole, even in a narrow terminal
    piped = cli(stack, "list", columns=None)  # piped: rows whole, not fitted to 80 columns
    assert any(wid in line and "hello" in line and "succeeded" in line for line in piped.stdout.splitlines())
    found = json.loads(cli(stack, "list", "--name", "hello", "--json").stdout)
    assert wid in [w["id"] for w in found["items"]] and {w["name"] for w in found["items"]} == {"hello"}
    bad_label = cli(stack, "list", "--label", "team")
    assert bad_label.returncode == 2 and "write it as key=value" in bad_label.stderr
    bad_status = cli(stack, "tasks", wid, "--status", "queud")
    assert bad_status.returncode == 2 and "--status 'queud' is not one of" in bad_status.stderr
    assert "(did you mean 'queued'?)" in bad_status.stderr
    missing = cli(stack, "status", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 4


def test_cancel(stack: Stack, tmp_path: Path) -> None:
    from dagsmith.client import Client
    from tests.support.wait import wait_until

    spec = tmp_path / "long.yaml"
    spec.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: long}\n"
        "spec:\n  tasks: [{name: s, type: sleep, params: {seconds: 60}}]\n"
    )
    submitted = cli(stack, "submit", str(spec))
    assert submitted.returncode == 0, submitted.stderr
    wid = next(line.split()[-1] for line in submitted.stderr.splitlines() if line.startswith("submitted workflow"))
    done = cli(stack, "cancel", wid)
    assert done.returncode == 0 and f"cancelling {wid}" in done.stderr, done.stderr  # messages go to stderr
    with Client(stack.url, token=stack.token) as client:
        wait_until(lambda: client.workflow(wid)["status"] == "cancelled", timeout=20, what="the cancel")
    again = cli(stack, "cancel", wid)
    assert again.returncode == 6 and len(again.stderr.strip().splitlines()) == 1, again.stderr  # 409: finished


def test_events_print_the_history_and_follow_a_running_workflow(stack: Stack, tmp_path: Path) -> None:
    done = cli(stack, "submit", str(EXAMPLES / "hello.yaml"), "--wait")
    wid = next(line.split()[-1] for line in done.stderr.splitlines() if line.startswith("submitted workflow"))
    shown = cli(stack, "events", wid)
    assert shown.returncode == 0, shown.stderr
    assert any("greet #1" in line and "→ succeeded" in line for line in shown.stdout.splitlines()), shown.stdout
    lines = [json.loads(line) for line in cli(stack, "events", wid, "--json").stdout.splitlines()]
    assert (
        lines
        and {e["workflow_id"] for e in lines} == {wid}
        and [e["id"] for e in lines] == sorted(e["id"] for e in lines)
    )
    later = [
        json.loads(line)
        for line in cli(stack, "events", wid, "--json", "--after", str(lines[0]["id"])).stdout.splitlines()
    ]
    assert later == lines[1:]
    # Without --follow, a running workflow's history so far, at once; with it, until it ends.
    slow = tmp_path / "slow.yaml"
    slow.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: slow}\n"
        "spec:\n  tasks: [{name: s, type: sleep, params: {seconds: 6}}]\n"
    )
    wid = _submitted(stack, slow)
    so_far = cli(stack, "events", wid)
    assert so_far.returncode == 0 and "→ succeeded" not in so_far.stdout
    followed = cli(stack, "events", wid, "--follow", "--timeout", "60s")
    assert followed.returncode == 0 and "s #1  running → succeeded" in followed.stdout, followed.stdout


def test_status_says_which_task_types_no_executor_runs(stack: Stack, tmp_path: Path) -> None:
    from tests.support.wait import wait_until

    spec = tmp_path / "stuck.yaml"
    spec.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: stuck}\n"
        "spec:\n  tasks: [{name: a, type: test.nobody}, {name: b, type: noop}]\n"
    )
    wid = _submitted(stack, spec)
    try:
        wait_until(
            lambda: json.loads(cli(stack, "status", wid, "--json").stdout)["waiting_for"] == ["test.nobody"],
            timeout=20,
            what="the task of a type nobody runs to be queued",
        )
        shown = cli(stack, "status", wid)
        assert "no live executor runs task type 'test.nobody'" in shown.stdout, shown.stdout
        watched = cli(stack, "watch", wid, "--timeout", "3s")
        assert watched.returncode == 7, watched.stderr
        assert watched.stderr.count("no live executor runs task type 'test.nobody'") == 1, watched.stderr
    finally:
        cli(stack, "cancel", wid)


def test_delete_and_prune(stack: Stack, tmp_path: Path) -> None:
    from dagsmith.client import Client
    from tests.support.wait import wait_until

    namespace = f"prune-{os.urandom(4).hex()}"
    long, quick = tmp_path / "long.yaml", tmp_path / "quick.yaml"
    head = f"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {{name: w, namespace: {namespace}}}\n"
    long.write_text(head + "spec:\n  tasks: [{name: s, type: sleep, params: {seconds: 60}}]\n")
    quick.write_text(head + "spec:\n  tasks: [{name: n, type: noop}]\n")
    sleeping = _submitted(stack, long)
    running = cli(stack, "delete", sleeping)
    assert running.returncode == 6 and "cancel it first" in running.stderr, running.stderr
    with Client(stack.url, token=stack.token) as client:
        client.cancel(sleeping)
        wait_until(lambda: client.workflow(sleeping)["status"] == "cancelled", timeout=20, what="the cancel")
    # Kept a day: executors that connect meanwhile must still be told it was cancelled.
    recent = cli(stack, "delete", sleeping)
    assert recent.returncode == 6 and "cancelled less than a day ago" in recent.stderr, recent.stderr

    first, second = _submitted(stack, quick), _submitted(stack, quick)
    for wid in (first, second):
        assert cli(stack, "watch", wid).returncode == 0
    done = cli(stack, "delete", first)
    assert done.returncode == 0 and f"deleted {first}" in done.stderr, done.stderr
    assert cli(stack, "status", first).returncode == 4

    db = {"DAGSMITH_DATABASE_URL": stack.settings.database_url.get_secret_value()}
    dry = cli(stack, "prune", "--older-than", "0s", "--namespace", namespace, "--dry-run", env=db)
    assert dry.returncode == 0, dry.stderr
    assert f"1 workflow in namespace {namespace} finished before" in dry.stderr  # not the cancelled one
    assert "UTC, with 1 task (dry run: nothing deleted)" in dry.stderr
    unasked = cli(stack, "prune", "--older-than", "0s", "--namespace", namespace, env=db)
    assert unasked.returncode == 2 and "pass --yes" in unasked.stderr, unasked.stderr
    assert cli(stack, "status", second).returncode == 0  # neither the dry run nor the refusal deleted it
    pruned = cli(stack, "prune", "--older-than", "0s", "--namespace", namespace, "--yes", env=db)
    assert pruned.returncode == 0 and "deleted 1/1 workflow, 1 task" in pruned.stderr, pruned.stderr
    assert cli(stack, "status", second).returncode == 4
    assert cli(stack, "status", sleeping).returncode == 0
    bad = cli(stack, "prune", "--older-than", "soon", env=db)
    assert bad.returncode == 2 and "--older-than: invalid duration 'soon'" in bad.stderr, bad.stderr


def test_executor_whose_plugin_cannot_start_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "broken_plugin.py").write_text(
        "from executors import Executor, executor\n\n"
        "@executor('t.broken')\n"
        "class Broken(Executor):\n"
        "    async def start(self):\n"
        "        raise ConnectionError('model server unreachable')\n\n"
        "    async def run(self, params, ctx):\n"
        "        return None\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    # The `dagsmith` script, run where the module is: --module finds it in the working directory.
    script = Path(sys.executable).with_name("dagsmith")
    done = subprocess.run(
        [str(script), "executor", "--module", "broken_plugin", "--types", "t.broken"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "error: task type 't.broken' failed to start: ConnectionError: model server unreachable" in done.stderr


def test_a_service_waiting_for_rabbitmq_stops_when_told_to() -> None:
    """SIGTERM (docker stop, a pod's deletion) ends a service still waiting for the broker at once,
    without a traceback; it does not wait out its connection attempts first."""
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env.update({"DAGSMITH_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/", "DAGSMITH_METRICS_PORT": "-1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagsmith", "evaluator"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # its first retry says it is waiting
            seen.append(line)
            if "rabbitmq not reachable" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(seen) + rest
    assert "Traceback" not in rest and "stopped while waiting for RabbitMQ" in rest


def test_client_commands_read_the_api_and_token_from_dotenv(stack: Stack, tmp_path: Path) -> None:
    """DAGSMITH_API and DAGSMITH_TOKEN work from a .env file in the working directory, as every
    other setting does; --api overrides them."""
    (tmp_path / ".env").write_text(f"DAGSMITH_API={stack.url}\nDAGSMITH_TOKEN={stack.token or ''}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env["COLUMNS"] = "200"
    run = [sys.executable, "-m", "dagsmith", "list"]
    found = subprocess.run(run, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert found.returncode == 0, found.stderr
    elsewhere = subprocess.run(
        [*run, "--api", f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert elsewhere.returncode == 3 and "cannot reach the API" in elsewhere.stderr


def _submitted(stack: Stack, path: Path) -> str:
    done = cli(stack, "submit", str(path))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_surgery_params_are_text_unless_given_as_json(stack: Stack, tmp_path: Path) -> None:
    """Re-run a failed step with a new template (text as written) and a typed value (key:=JSON)."""
    spec = tmp_path / "broken.yaml"
    spec.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: broken-template}\n"
        "spec:\n  correction: {mode: 'off'}\n  tasks:\n"
        "    - {name: greet, type: text.template, params: {template: 'hi there'}}\n"
        "    - {name: shout, type: echo, dependsOn: [greet], params: {text: '{{ tasks.greet.output.txt }}'}}\n"
        "  output: {text: '{{ tasks.shout.output.text }}', n: '{{ tasks.shout.output.n }}'}\n"
    )
    wid = _submitted(stack, spec)
    assert cli(stack, "watch", wid).returncode == 1  # the template names a key greet's output lacks
    fixed = cli(
        stack, "surgery", wid, "retry", "shout", "--param", "text={{ tasks.greet.output.text }}: ok", "-p", "n:=3"
    )
    assert fixed.returncode == 0, fixed.stderr
    done = cli(stack, "watch", wid)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"text": "hi there: ok", "n": 3}
    bad = cli(stack, "surgery", wid, "retry", "shout", "-p", "n:=[unclosed")
    assert bad.returncode == 2 and "takes a JSON value" in bad.stderr and "Traceback" not in bad.stderr
    wrong = cli(stack, "surgery", wid, "retry", "shout", "--type", "echo")  # named as the CLI spells it
    assert wrong.returncode == 2 and "retry does not take --type (it takes --param/--params, --delay)" in wrong.stderr
    # What the API refuses is reported as the option that was typed, not as the request's field.
    refused = cli(stack, "surgery", wid, "insert", "shout", "--type", "Text.Clean", "--name", "2nd")
    assert refused.returncode == 2, refused.stderr
    assert "--type: 'Text.Clean' does not match" in refused.stderr and "dotted lowercase words" in refused.stderr
    assert "--name: '2nd' does not match" in refused.stderr and "body." not in refused.stderr
    for args, said in (
        (["retry", "shout", "--delay", "5x"], "--delay: invalid duration '5x'"),
        (["replace", "shout"], "replace needs --type"),
        (["retry", "shout", "--reason", "x" * 1001], "--reason: String should have at most 1000 characters"),
    ):
        done = cli(stack, "surgery", wid, *args)
        assert done.returncode == 2 and said in done.stderr, done.stderr


def test_tasks_marks_the_error_of_an_earlier_attempt(stack: Stack, tmp_path: Path) -> None:
    from tests.support.wait import wait_until

    spec = tmp_path / "retrying.yaml"
    spec.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: retrying}\n"
        "spec:\n  correction: {mode: 'off'}\n  tasks:\n"
        "    - {name: f, type: chaos.fail, params: {class: transient},\n"
        "       retry: {limit: 2, backoff: {initial: 1h, max: 1h}}}\n"
    )
    wid = _submitted(stack, spec)

    def waiting() -> bool:
        [task] = json.loads(cli(stack, "tasks", wid, "--json").stdout)["items"]
        return task["status"] == "pending" and task["error"] is not None

    wait_until(waiting, timeout=30, what="the first attempt to fail and the retry to wait")
    assert "(an earlier attempt) transient" in cli(stack, "tasks", wid).stdout
    cli(stack, "cancel", wid)


def test_tasks_lists_every_page_and_list_says_where_the_next_starts(stack: Stack, tmp_path: Path) -> None:
    tasks = [{"name": f"n{i}", "type": "noop"} for i in range(1001)]
    spec = tmp_path / "wide.json"
    spec.write_text(
        json.dumps(
            {
                "apiVersion": "dagsmith.io/v1",
                "kind": "Workflow",
                "metadata": {"name": "paged"},
                "spec": {"tasks": tasks},
            }
        )
    )
    # Another succeeded workflow, older than the paged one: the second page of one has it.
    assert cli(stack, "submit", str(EXAMPLES / "hello.yaml"), "--wait").returncode == 0
    wid = _submitted(stack, spec)
    assert cli(stack, "watch", wid).returncode == 0
    listed = json.loads(cli(stack, "tasks", wid, "--json").stdout)["items"]
    assert len(listed) == 1001  # past the API's page of 1,000
    first = cli(stack, "list", "--limit", "1", "--status", "succeeded")
    assert wid in first.stdout and "more: dagsmith list --status succeeded --limit 1 --cursor " in first.stderr
    again = shlex.split(first.stderr.split("more: ")[1].strip())[2:]  # the printed command, as given
    second = cli(stack, "list", *again, "--json")
    assert second.returncode == 0 and wid not in second.stdout
    assert {w["status"] for w in json.loads(second.stdout)["items"]} == {"succeeded"}  # the filter held
    assert cli(stack, "list", "--limit", "0").returncode == 2


def test_waiting_gives_up_at_the_timeout_and_the_workflow_goes_on(stack: Stack, tmp_path: Path) -> None:
    spec = tmp_path / "slow.yaml"
    spec.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: slow}\n"
        "spec:\n  tasks:\n    - {name: s, type: sleep, params: {seconds: 60}}\n"
    )
    ids = []
    for command in (["submit", str(spec), "--wait"], ["submit", str(spec), "--watch"]):
        done = cli(stack, *command, "--timeout", "1s")
        assert done.returncode == 7, done.stderr
        assert "did not finish within 1s; it goes on" in done.stderr
        ids.append(done.stderr.split("dagsmith watch ")[1].split(" ")[0].rstrip(")"))
    wid = ids[-1]
    followed = cli(stack, "watch", wid, "--timeout", "500ms")
    assert followed.returncode == 7 and "it goes on" in followed.stderr
    # Past the stream's first keep-alive ping (15 s), which must not restart the wait.
    began = time.monotonic()
    followed = cli(stack, "watch", wid, "--timeout", "16s")
    assert followed.returncode == 7 and time.monotonic() - began < 16 + 5, time.monotonic() - began
    assert cli(stack, "status", wid).returncode == 0  # still there, still running
    assert "running" in cli(stack, "status", wid).stdout
    assert cli(stack, "submit", str(spec), "--timeout", "1s").returncode == 2  # only with --wait or --watch
    before = len(json.loads(cli(stack, "list", "--name", "slow", "--json").stdout)["items"])
    typo = cli(stack, "submit", str(spec), "--wait", "--timeout", "10x")
    assert typo.returncode == 2 and "--timeout" in typo.stderr
    assert len(json.loads(cli(stack, "list", "--name", "slow", "--json").stdout)["items"]) == before  # nothing sent
    for each in ids:
        assert cli(stack, "cancel", each).returncode == 0


def test_a_refused_token_says_how_to_give_one(stack: Stack) -> None:
    if not stack.token:
        pytest.skip("this stack runs without authentication")
    done = cli(stack, "list", token="not-a-token")
    assert done.returncode == 5 and "give one with --token or DAGSMITH_TOKEN" in done.stderr, done.stderr


def test_an_argument_cannot_name_another_resource(stack: Stack) -> None:
    """`tokens revoke ../workflows/ID` once deleted the workflow: the dots were resolved in the URL."""
    wid = _submitted(stack, EXAMPLES / "hello.yaml")
    revoked = cli(stack, "tokens", "revoke", f"../workflows/{wid}")
    assert revoked.returncode == 4, revoked.stderr  # no such token
    assert cli(stack, "status", wid).returncode == 0  # the workflow is still there
    for command in (["tokens", "revoke", ".."], ["status", "."], ["cancel", ".."]):
        refused = cli(stack, *command)
        assert refused.returncode == 2 and "is not valid: it would change the URL's path" in refused.stderr
    empty = cli(stack, "status", "")
    assert empty.returncode == 2 and empty.stderr.strip() == "error: workflow id is empty", empty.stderr


def test_waiting_rides_out_an_api_restart(stack: Stack, tmp_path: Path) -> None:
    """The API away for a while (a restart) is waited out, said once, as kubectl wait does; the
    wait goes on from the last event it had and ends with the result."""
    import queue
    import threading

    from tests.support.wait import wait_until

    spec = tmp_path / "slow.yaml"
    spec.write_text(
        "apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: outlasts}\n"
        "spec:\n  tasks:\n    - {name: s, type: sleep, params: {seconds: 4}}\n"
        "  output: {slept: '{{ tasks.s.output.slept }}'}\n"
    )
    wid = _submitted(stack, spec)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env.update({"DAGSMITH_API": stack.url, "DAGSMITH_TOKEN": stack.token or ""})
    watcher = subprocess.Popen(
        [sys.executable, "-m", "dagsmith", "watch", wid, "--timeout", "90s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def pump(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)

    def printed(text: str) -> bool:
        while not lines.empty():
            seen.append(lines.get())
        return any(text in line for line in seen)

    assert watcher.stderr is not None and watcher.stdout is not None
    reader = threading.Thread(target=pump, args=(watcher.stderr,), daemon=True)
    reader.start()
    try:
        wait_until(lambda: printed("outlasts: "), timeout=30, what="watch to follow the workflow")
        stack.kill("api")
        wait_until(lambda: printed("API unreachable, retrying"), timeout=30, what="watch to say it retries")
        stack.start_api()
        watcher.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if watcher.poll() is None:
            watcher.kill()
        if not stack.procs["api"].alive():
            stack.start_api()
    printed("")  # what came after
    assert watcher.returncode == 0, "".join(seen)
    out = watcher.stdout.read()
    assert json.loads(out) == {"slept": 4}, out
    assert sum("API unreachable, retrying" in line for line in seen) == 1, "".join(seen)
    assert "cannot reach the API" not in "".join(seen)


def test_prune_answered_no_deletes_nothing(stack: Stack, tmp_path: Path) -> None:
    import pty

    namespace = f"keep-{os.urandom(4).hex()}"
    quick = tmp_path / "quick.yaml"
    quick.write_text(
        f"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {{name: w, namespace: {namespace}}}\n"
        "spec:\n  tasks: [{name: n, type: noop}]\n"
    )
    wid = _submitted(stack, quick)
    assert cli(stack, "watch", wid).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env["DAGSMITH_DATABASE_URL"] = stack.settings.database_url.get_secret_value()
    # The question is asked only on a terminal: answer it on one.
    terminal, answering = pty.openpty()
    try:
        asked = subprocess.Popen(
            [sys.executable, "-m", "dagsmith", "prune", "--older-than", "0s", "-n", namespace],
            stdin=answering,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        os.write(terminal, b"n\n")
        _, err = asked.communicate(timeout=60)
    finally:
        os.close(answering)
        os.close(terminal)
    assert asked.returncode == 0, err
    assert "Delete them?" in err and err.strip().endswith("nothing deleted") and "stopped" not in err, err
    assert cli(stack, "status", wid).returncode == 0


def test_the_next_page_command_keeps_the_api_given(stack: Stack) -> None:
    for _ in range(2):
        _submitted(stack, EXAMPLES / "hello.yaml")
    listed = cli(stack, "list", "--limit", "1", "--api", stack.url, url="http://127.0.0.1:9")
    assert listed.returncode == 0, listed.stderr
    again = shlex.split(listed.stderr.split("more: ")[1].strip())
    assert again[again.index("--api") + 1] == stack.url
    assert "--token" not in again  # a secret is never printed
