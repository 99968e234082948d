"""The API's contract: invalid specs, error shapes, limits, listing — over real HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from api.middleware import MAX_TARGET_BYTES
from dagsmith.client import Client
from dagsmith.settings import Settings
from tests.e2e.conftest import auth, pg, submit, wait_finished, workflow
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e

INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "unknown key",
        workflow("x", {"name": "a", "type": "noop", "retires": 1}),
        "spec.tasks[0].retires",
        "unknown field",
    ),
    (
        "duplicate name",
        workflow("x", {"name": "a", "type": "noop"}, {"name": "a", "type": "noop"}),
        "spec.tasks[1].name",
        "duplicate",
    ),
    (
        "unknown dependency",
        workflow("x", {"name": "a", "type": "noop", "dependsOn": ["b"]}),
        "spec.tasks[0].dependsOn[0]",
        "no task is named 'b'",
    ),
    (
        "cycle",
        workflow(
            "x", {"name": "a", "type": "noop", "dependsOn": ["b"]}, {"name": "b", "type": "noop", "dependsOn": ["a"]}
        ),
        "spec.tasks[0].dependsOn",
        "a → b → a",
    ),
    (
        "reference to a non-ancestor",
        workflow(
            "x", {"name": "a", "type": "noop"}, {"name": "b", "type": "echo", "params": {"v": "{{ tasks.a.output }}"}}
        ),
        "spec.tasks[1].params.v",
        "not upstream",
    ),
    (
        "bad duration",
        workflow("x", {"name": "a", "type": "noop", "timeout": "soon"}),
        "spec.tasks[0].timeout",
        "invalid duration",
    ),
    ("bad task name", workflow("x", {"name": "no spaces", "type": "noop"}), "spec.tasks[0].name", "does not match"),
    ("no tasks", workflow("x"), "spec.tasks", "at least 1"),
]


@pytest.mark.parametrize(("case", "doc", "path", "fragment"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_422_with_path_and_nothing_written(
    stack: Stack, settings: Settings, case: str, doc: dict[str, Any], path: str, fragment: str
) -> None:
    with pg(settings) as conn:
        before = conn.execute("SELECT count(*) FROM workflows").fetchone()
    response = httpx.post(
        f"{stack.url}/v1/workflows",
        content=orjson.dumps(doc),
        headers={"Content-Type": "application/json", **auth(stack)},
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_spec"
    problem = next(p for p in error["details"]["problems"] if p["path"] == path)
    assert fragment in problem["message"]
    with pg(settings) as conn:
        assert conn.execute("SELECT count(*) FROM workflows").fetchone() == before


def test_yaml_body_and_unparseable_body(stack: Stack) -> None:
    bad = httpx.post(
        f"{stack.url}/v1/workflows", content=b"spec: [", headers={"Content-Type": "application/yaml", **auth(stack)}
    )
    assert bad.status_code == 422
    assert "not valid YAML" in bad.json()["error"]["details"]["problems"][0]["message"]
    xml = httpx.post(
        f"{stack.url}/v1/workflows", content=b"<workflow/>", headers={"Content-Type": "application/xml", **auth(stack)}
    )
    assert xml.status_code == 415 and "'application/xml' is not a workflow document" in xml.json()["error"]["message"]


def test_oversized_body_is_413(stack: Stack, settings: Settings) -> None:
    response = httpx.post(
        f"{stack.url}/v1/workflows",
        content=b"x" * (settings.max_body_bytes + 1),
        headers={"Content-Type": "application/json", **auth(stack)},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_overlong_url_is_414_with_error_shape(stack: Stack) -> None:
    filters = "&".join(f"label=k{i}=v" for i in range(MAX_TARGET_BYTES // 10))
    response = httpx.get(f"{stack.url}/v1/workflows?{filters}", headers=auth(stack))
    assert response.status_code == 414
    assert response.json()["error"]["code"] == "too_long"
    assert f"the limit is {MAX_TARGET_BYTES}" in response.json()["error"]["message"]
    # Just under the limit, the same filters reach the route.
    fits = "&".join(f"label=k{i}=v" for i in range(MAX_TARGET_BYTES // 16))
    assert len(fits) < MAX_TARGET_BYTES - len("/v1/workflows?")
    assert httpx.get(f"{stack.url}/v1/workflows?{fits}", headers=auth(stack)).status_code == 200


def test_unknown_ids_are_404_with_error_shape(stack: Stack) -> None:
    for path in (
        "/v1/workflows/00000000-0000-0000-0000-000000000000",
        "/v1/workflows/not-a-uuid",
        "/v1/workflows/00000000-0000-0000-0000-000000000000/tasks",
        "/v1/workflows/00000000-0000-0000-0000-000000000000/result",
        "/v1/nothing-here",
    ):
        response = httpx.get(stack.url + path, headers=auth(stack))
        assert response.status_code == 404, path
        assert set(response.json()["error"]) == {"code", "message", "details"}
    # A path no route serves is named (a wrong base URL, such as one ending in /v1, shows at once).
    missing = httpx.get(stack.url + "/v1/v1/workflows", headers=auth(stack)).json()["error"]["message"]
    assert missing.startswith("no route GET /v1/v1/workflows"), missing


def test_list_filters_and_cursor(client: Client) -> None:
    ids = [
        submit(
            client,
            {
                **workflow("listed", {"name": "a", "type": "noop"}),
                "metadata": {"name": "listed", "labels": {"batch": "b1"}},
            },
        )
        for _ in range(3)
    ]
    for wid in ids:
        wait_finished(client, wid)
    page1 = client.workflows(label="batch=b1", limit=2)
    assert len(page1["items"]) == 2 and page1["next_cursor"]
    page2 = client.workflows(label="batch=b1", limit=2, cursor=page1["next_cursor"])
    assert len(page2["items"]) == 1 and page2["next_cursor"] is None
    assert {w["id"] for w in page1["items"] + page2["items"]} == set(ids)
    assert all(w["status"] == "succeeded" for w in client.workflows(name="listed", status="succeeded")["items"])
    assert client.workflows(label="batch=none")["items"] == []


def test_health_ready_metrics_openapi(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok", "checks": {}}
    ready = httpx.get(f"{stack.url}/readyz").json()
    assert ready["checks"] == {"postgres": "ok", "rabbitmq": "ok"}
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert "dagsmith_api_request_seconds_bucket" in metrics
    schema = httpx.get(f"{stack.url}/openapi.json").json()
    assert "WorkflowDocument" in schema["components"]["schemas"]
    assert {"/v1/workflows", "/v1/workflows/{workflow_id}/dag", "/v1/executors", "/readyz"} <= set(schema["paths"])


def test_executor_registry(client: Client) -> None:
    (executor,) = [e for e in client.executors() if e["alive"]]
    assert {"noop", "text.upper", "json.parse"} <= set(executor["types"])
    parse = next(c for c in executor["capabilities"] if c["type"] == "json.parse")
    assert parse["repair"] == "json.repair"


def test_secret_params_are_redacted(client: Client) -> None:
    doc = workflow("secret", {"name": "a", "type": "echo", "params": {"token": "s3cr3t", "x": 1}, "secrets": ["token"]})
    wid = submit(client, doc)
    wait_finished(client, wid)
    (task,) = client.tasks(wid)["items"]
    assert task["params"] == {"token": "***", "x": 1}


def test_event_streams_are_limited_per_api_process(stack: Stack, client: Client, settings: Settings) -> None:
    """DAGSMITH_MAX_SSE_CONNECTIONS: the stream past the limit is a 503 naming the setting, and a
    closed stream frees its place."""
    from dagsmith.local import free_port
    from tests.support.wait import wait_until

    port = free_port()
    stack.start("api-sse", "api", "--port", str(port), env={"DAGSMITH_MAX_SSE_CONNECTIONS": "1"})
    url = f"http://127.0.0.1:{port}"
    wid = submit(client, workflow("streamed", {"name": "s", "type": "sleep", "params": {"seconds": 60}}))
    headers = auth(stack)
    path = f"{url}/v1/workflows/{wid}/events"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=30, what="the second API to answer")
        with httpx.stream("GET", path, headers=headers, timeout=30) as first:
            assert first.status_code == 200
            second = httpx.get(path, headers=headers, timeout=10)
            assert second.status_code == 503
            assert second.json()["error"]["code"] == "too_many_streams"
            assert "DAGSMITH_MAX_SSE_CONNECTIONS" in second.json()["error"]["message"]
            # An open stream holds no database connection in a transaction (it would for days).
            with pg(settings) as conn:
                held = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dagsmith-api' "
                    "AND state = 'idle in transaction'"
                ).fetchone()
            assert held == (0,)

        def freed() -> bool:
            with httpx.stream("GET", path, headers=headers, timeout=10) as again:
                return again.status_code == 200

        wait_until(freed, timeout=15, what="the closed stream's place to be free again")
        # Past any event id, and a digit that is not ASCII (Starlette reads latin-1): ignored, so
        # the stream starts from the beginning (they were a broken stream, and a 500).
        for wrong in (b"9" * 30, b"\xb2"):
            query = f"{path}?follow=false"

            def answered(wrong: bytes = wrong, query: str = query) -> bool:
                with httpx.stream("GET", query, headers={**headers, "Last-Event-ID": wrong}, timeout=10) as ignored:
                    # 503 while the last stream's place is not free yet; never a 500 or a 422
                    assert ignored.status_code in (200, 503), ignored.status_code
                    return ignored.status_code == 200 and "event: end" in "".join(ignored.iter_text())

            wait_until(answered, timeout=15, what="a stream with a Last-Event-ID it cannot use")
    finally:
        client.cancel(wid)
        stack.stop("api-sse")
