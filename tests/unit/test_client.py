"""The API client: answers that are not the API's, path parameters, and waiting out an absent API."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from dagsmith.client import Backoff, Client, ClientError, WaitTimeout, segment

Handler = Callable[[httpx.Request], httpx.Response]


def mocked(handler: Handler) -> Client:
    client = Client("http://127.0.0.1:9")
    client.http = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(handler))
    return client


def test_a_page_that_is_not_the_apis_json_is_a_clear_error_not_a_traceback() -> None:
    client = mocked(
        lambda request: httpx.Response(200, text="<html>proxy</html>", headers={"content-type": "text/html"})
    )
    with pytest.raises(ClientError) as info:
        client.workflows()
    assert info.value.status == 0 and info.value.code == "not_the_api"
    assert "answered 200 with text/html, not the API's JSON" in info.value.message
    assert "DAGSMITH_API" in info.value.message


def test_an_html_error_page_is_not_the_api_either() -> None:
    """--api pointing at another web server: its 404 page is not dumped as the error message."""
    page = "<!DOCTYPE html><html><body><h1>Not Found</h1></body></html>"
    client = mocked(lambda request: httpx.Response(404, text=page, headers={"content-type": "text/html"}))
    with pytest.raises(ClientError) as info:
        client.workflow("abc")
    assert info.value.status == 0 and info.value.code == "not_the_api"  # exit 3, not 4 ("not found")
    assert "answered 404 with text/html" in info.value.message and "<html>" not in info.value.message


def test_a_graph_in_text_must_come_as_text_plain() -> None:
    html = mocked(lambda request: httpx.Response(200, text="<html/>", headers={"content-type": "text/html"}))
    with pytest.raises(ClientError) as info:
        html.dag("abc", "mermaid")
    assert info.value.code == "not_the_api" and "text/plain" in info.value.message
    plain = mocked(lambda request: httpx.Response(200, text="flowchart TD\n", headers={"content-type": "text/plain"}))
    assert plain.dag("abc", "mermaid") == "flowchart TD\n"


def test_path_parameters_stay_one_segment() -> None:
    """`tokens revoke ../workflows/ID` once deleted the workflow: the URL resolved the dots."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, json={})

    client = mocked(answer)
    client.revoke_token("../workflows/0b2c")
    client.workflow("a/b?c#d")
    client.activate_policy("v 1")
    assert seen == [
        "/v1/tokens/..%2Fworkflows%2F0b2c",
        "/v1/workflows/a%2Fb%3Fc%23d",
        "/v1/policies/v%201/activate?force=false",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [("", "workflow id is empty"), (".", "workflow id '.' is not valid"), ("..", "workflow id '..' is not valid")],
)
def test_empty_and_dot_segments_are_refused_before_any_request(value: str, message: str) -> None:
    def never(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request should be sent, got {request.url}")

    with pytest.raises(ClientError) as info:
        mocked(never).workflow(value)
    assert info.value.status == 422 and info.value.code == "invalid_argument"  # the CLI's exit 2
    assert message in info.value.message
    assert segment("x", "workflow id") == "x"


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def sse(*events: tuple[int | None, str, str]) -> httpx.Response:
    lines = []
    for event_id, event, data in events:
        if event_id is not None:
            lines.append(f"id: {event_id}")
        lines += [f"event: {event}", f"data: {data}", ""]
    return httpx.Response(200, text="\n".join(lines) + "\n", headers={"content-type": "text/event-stream"})


def test_a_followed_stream_waits_out_an_absent_api_and_resumes_after_the_last_event() -> None:
    """A refused connection, a proxy's 503 page, then a stream that breaks mid-way: the events come
    once each, in order, and each outage is reported once."""
    afters: list[str] = []
    answers: list[Handler] = [
        refuse,
        lambda r: httpx.Response(503, text="<html>bad gateway</html>", headers={"content-type": "text/html"}),
        lambda r: sse((5, "transition", '{"id": 5}')),  # closes before `end`: it broke
        lambda r: sse((6, "transition", '{"id": 6}'), (None, "end", '{"status": "succeeded"}')),
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        afters.append(request.url.params["after"])
        return answers.pop(0)(request)

    outages: list[str] = []
    retry = Backoff(first=0.001, most=0.002, notify=lambda exc: outages.append(exc.code))
    got = list(mocked(answer).events("0b2c", retry=retry))
    assert got == [("transition", {"id": 5}), ("transition", {"id": 6}), ("end", {"status": "succeeded"})]
    assert afters == ["0", "0", "0", "5"]  # reopened after the last event it had
    assert outages == ["unreachable", "unreachable"]  # two outages, one notice each


def test_without_retries_a_broken_stream_is_an_error_not_a_silent_end() -> None:
    client = mocked(lambda request: sse((5, "transition", '{"id": 5}')))
    with pytest.raises(ClientError) as info:
        list(client.events("0b2c"))
    assert info.value.status == 0 and "closed before the workflow's end" in info.value.message


def test_the_api_s_own_refusals_are_not_retried() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no workflow 0b2c"}})

    with pytest.raises(ClientError) as info:
        Backoff(first=0.001).call(lambda: mocked(answer).workflow("0b2c"))
    assert info.value.status == 404 and calls == 1


def test_retries_end_at_the_deadline() -> None:
    client = mocked(refuse)
    began = time.monotonic()
    with pytest.raises(WaitTimeout):
        Backoff(time.monotonic() + 0.3, first=0.05, most=0.1).call(lambda: client.workflow("0b2c"))
    assert time.monotonic() - began < 2.0
