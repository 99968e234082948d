"""Nobody in who doesn't belong: tokens, scopes, namespaces, revocation, hashes only."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import httpx
import orjson
import pytest

from dagsmith.client import Client, ClientError
from dagsmith.settings import Settings
from tests.e2e.conftest import pg, submit, wait_finished, workflow
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_token_is_401_but_probes_stay_open(stack: Stack) -> None:
    for method, path in (
        ("GET", "/v1/workflows"),
        ("POST", "/v1/workflows"),
        ("GET", "/v1/executors"),
        ("GET", "/v1/tokens"),
        ("GET", "/v1/workflows/00000000-0000-0000-0000-000000000000"),
    ):
        response = httpx.request(method, stack.url + path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(stack.url + path).status_code == 200, path
    schema = httpx.get(stack.url + "/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_wrong_token_is_401(stack: Stack) -> None:
    response = httpx.get(stack.url + "/v1/workflows", headers=bearer("dgs_not-a-real-token"))
    assert response.status_code == 401


def test_scopes(stack: Stack, client: Client) -> None:
    reader = client.create_token("reader", ["read"], ["*"])["token"]
    writer = client.create_token("writer", ["write"], ["*"])["token"]
    wid = submit(client, workflow("scoped", {"name": "a", "type": "noop"}))
    with stack.client(reader) as as_reader:
        assert as_reader.workflow(wid)["id"] == wid
        with pytest.raises(ClientError) as info:
            submit(as_reader, workflow("nope", {"name": "a", "type": "noop"}))
        assert info.value.status == 403
        for write in (as_reader.cancel, as_reader.delete):
            with pytest.raises(ClientError) as info:
                write(wid)
            assert info.value.status == 403, write
    with stack.client(writer) as as_writer:
        assert wait_finished(as_writer, submit(as_writer, workflow("w", {"name": "a", "type": "noop"})))
        with pytest.raises(ClientError) as info:
            as_writer.tokens()
        assert info.value.status == 403
        assert "admin" in info.value.message


def test_namespaces_are_invisible_to_other_tokens(stack: Stack, client: Client) -> None:
    team = client.create_token("team-a", ["write"], ["team-a"])["token"]
    elsewhere = submit(client, workflow("default-ns", {"name": "a", "type": "noop"}))
    mine_doc = workflow("mine", {"name": "a", "type": "noop"})
    mine_doc["metadata"]["namespace"] = "team-a"
    with stack.client(team) as as_team:
        mine = submit(as_team, mine_doc)
        assert as_team.workflow(mine)["namespace"] == "team-a"
        for call in (
            as_team.workflow,
            as_team.tasks,
            as_team.result,
            as_team.dag,
            as_team.cancel,
            as_team.delete,
            as_team.revisions,
            lambda w: list(as_team.events(w)),
            lambda w: as_team.surgery(w, {"op": "retry", "task": "a"}),
        ):
            with pytest.raises(ClientError, match="no workflow") as info:
                call(elsewhere)
            assert info.value.status == 404, call
        listed = {w["id"] for w in as_team.workflows(limit=500)["items"]}
        assert mine in listed and elsewhere not in listed
        assert as_team.workflows(namespace="default")["items"] == []
        with pytest.raises(ClientError) as info:
            submit(as_team, workflow("into-default", {"name": "a", "type": "noop"}))
        assert info.value.status == 403


def test_an_admin_of_one_namespace_cannot_reach_beyond_it(stack: Stack, client: Client) -> None:
    """An admin token for team-a manages tokens for team-a only; policies (installation-wide)
    need an admin for every namespace."""
    team_admin = client.create_token("team-a-admin", ["admin", "write", "read"], ["team-a"])["token"]
    client.create_token("global-reader", ["read"], ["*"])
    with stack.client(team_admin) as as_team_admin:
        for namespaces in (["*"], ["team-a", "team-b"], ["team-b"]):
            with pytest.raises(ClientError) as info:
                as_team_admin.create_token("escalate", ["read"], namespaces)
            assert info.value.status == 403 and "its own namespaces" in info.value.message, namespaces
        made = as_team_admin.create_token("team-a-bot", ["read"], ["team-a"])
        assert made["namespaces"] == ["team-a"]
        listed = {t["name"] for t in as_team_admin.tokens()}
        assert "team-a-bot" in listed and "global-reader" not in listed
        with pytest.raises(ClientError) as info:
            as_team_admin.revoke_token("global-reader")
        assert info.value.status == 404
        assert as_team_admin.revoke_token("team-a-bot")["revoked_at"] is not None
        with pytest.raises(ClientError) as info:
            as_team_admin.policies()
        assert info.value.status == 403 and "every namespace" in info.value.message
    assert next(t for t in client.tokens() if t["name"] == "global-reader")["revoked_at"] is None
    assert isinstance(client.policies(), list)


def test_revoked_token_is_401_at_once(stack: Stack, client: Client) -> None:
    token = client.create_token("short-lived", ["read"], ["*"])["token"]
    assert httpx.get(stack.url + "/v1/workflows", headers=bearer(token)).status_code == 200
    client.revoke_token("short-lived")
    assert httpx.get(stack.url + "/v1/workflows", headers=bearer(token)).status_code == 401
    assert next(t for t in client.tokens() if t["name"] == "short-lived")["revoked_at"] is not None


def test_revoking_a_token_ends_the_event_streams_it_opened(stack: Stack, client: Client) -> None:
    from api.routes.workflows import STREAM_REAUTH_SECONDS

    token = client.create_token("watcher", ["read"], ["*"])["token"]
    wid = submit(client, workflow("watched", {"name": "s", "type": "sleep", "params": {"seconds": 120}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env.update({"DAGSMITH_API": stack.url, "DAGSMITH_TOKEN": token})
    watching = subprocess.Popen(
        [sys.executable, "-m", "dagsmith", "watch", wid],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with stack.client(token) as as_watcher:
            events = as_watcher.events(wid)
            assert next(events)[0] == "transition"  # open, and streaming
            client.revoke_token("watcher")
            revoked = time.monotonic()
            with pytest.raises(ClientError) as info:
                for _ in events:
                    pass
        assert info.value.status == 401 and "revoked" in info.value.message
        assert time.monotonic() - revoked < STREAM_REAUTH_SECONDS + 5  # the next check, give or take a query
        # The CLI following the same workflow stops too: one line, the "not allowed" exit code.
        _, err = watching.communicate(timeout=STREAM_REAUTH_SECONDS + 10)
        assert watching.returncode == 5, err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error:"), err
    finally:
        watching.kill()
        client.cancel(wid)


def test_only_hashes_are_stored(settings: Settings, client: Client) -> None:
    created = client.create_token("hashed", ["read"], ["*"])
    token = created["token"]
    assert "token" not in client.tokens()[0]
    with pg(settings) as conn:
        rows = conn.execute("SELECT t::text, token_hash FROM api_tokens t WHERE name = 'hashed'").fetchall()
    ((row_text, token_hash),) = rows
    assert token not in row_text
    assert token_hash == hashlib.sha256(token.encode()).hexdigest()


def test_metrics_reveal_no_secrets(stack: Stack, settings: Settings) -> None:
    text = httpx.get(stack.url + "/metrics").text
    assert stack.token and stack.token not in text
    assert "postgresql" not in text and "amqp://" not in text


def test_secret_params_never_reach_logs(stack: Stack, client: Client) -> None:
    doc = workflow(
        "leaky",
        {
            "name": "s",
            "type": "chaos.fail",
            "params": {"class": "permanent", "password": "hunter2-xyzzy"},
            "secrets": ["password"],
        },
    )
    wid = submit(client, doc)
    wait_finished(client, wid)
    (task,) = client.tasks(wid)["items"]
    assert task["params"]["password"] == "***"
    for proc in stack.procs.values():
        assert "hunter2-xyzzy" not in proc.log.read_text(errors="replace"), proc.name


def test_cli_tokens(stack: Stack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env.update({"DAGSMITH_API": stack.url, "DAGSMITH_TOKEN": stack.token or "", "COLUMNS": "200"})

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dagsmith", *args], capture_output=True, text=True, env=env, timeout=60
        )

    created = run("tokens", "create", "cli-bot", "--scope", "write", "--namespace", "ci")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("dgs_")
    listed = run("tokens", "list")
    assert "cli-bot" in listed.stdout and token not in listed.stdout
    assert run("tokens", "revoke", "cli-bot").returncode == 0
    brief = run("tokens", "create", "brief", "--scope", "read", "--namespace", "ci", "--expires-in", "1s")
    assert brief.returncode == 0, brief.stderr

    def state(name: str) -> str:
        row = next(line for line in run("tokens", "list").stdout.splitlines() if f" {name} " in line)
        return row.split()[-2]  # the STATE column, before the table's right border

    assert state("cli-bot") == "revoked"
    deadline = time.monotonic() + 30
    while state("brief") != "expired":
        assert time.monotonic() < deadline, "the expired token is still listed as live"
    denied = subprocess.run(
        [sys.executable, "-m", "dagsmith", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "DAGSMITH_TOKEN": token},
    )
    assert denied.returncode == 5
    assert "revoked" in denied.stderr
    # Refused values are named as the options that were typed.
    for args, said in (
        (["--expires-in", "5000d"], "--expires-in: "),
        (["--scope", "root"], "--scope (0): 'root' is not allowed here"),
    ):
        refused = run("tokens", "create", "refused", *args)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr


def test_submit_body_stays_json_or_yaml(stack: Stack) -> None:
    """The API accepts YAML with a token too (the CLI's default content type)."""
    body = b"apiVersion: dagsmith.io/v1\nkind: Workflow\nmetadata: {name: y}\nspec:\n  tasks: [{name: a, type: noop}]\n"
    response = httpx.post(
        stack.url + "/v1/workflows",
        content=body,
        headers={"Content-Type": "application/yaml", **bearer(stack.token or "")},
    )
    assert response.status_code == 201
    assert orjson.loads(response.content)["status"] == "pending"
