"""http.request: one HTTP call, with its status mapped to an error class."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, Field

from executors.registry import TaskContext, TaskFailed, executor


class RequestParams(BaseModel):
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(None, alias="json")
    body: str | None = None
    timeout: float = Field(10.0, gt=0, le=300)
    max_response_bytes: int = Field(1_000_000, gt=0)


def classify_status(status: int) -> str | None:
    """The error class for an HTTP status, or None for success."""
    if status < 400:
        return None
    if status == 429:
        return "rate_limited"
    if status in (408, 504):
        return "timeout"
    if status in (502, 503):
        return "unavailable"
    if status >= 500:
        return "transient"
    if status in (400, 404, 405, 409, 410, 413, 415, 422):
        return "invalid_input"
    return "permanent"


def _check_host(host: str, allowed: tuple[str, ...]) -> None:
    if allowed and host not in allowed:
        raise TaskFailed(
            "invalid_input", f"host {host!r} is not in this executor's allow-list", {"allowed": list(allowed)}
        )


@executor(
    "http.request",
    description="Makes an HTTP request; returns {status, headers, json|text}.",
    tunable={"timeout": "x2"},
)
async def request(params: RequestParams, ctx: TaskContext) -> dict[str, Any]:
    allowed = ctx.options.http_allow_hosts
    _check_host(urlsplit(params.url).hostname or "", allowed)

    async def each_request(request: httpx.Request) -> None:
        # Redirects are followed, and each hop is held to the allow-list: an allowed host must
        # not be able to send the executor anywhere else.
        _check_host(request.url.host, allowed)

    headers = {"Idempotency-Key": ctx.idempotency_key, **params.headers}
    hooks: dict[str, list[Any]] = {"request": [each_request]}
    try:
        async with httpx.AsyncClient(timeout=params.timeout, follow_redirects=True, event_hooks=hooks) as client:
            response = await client.request(
                params.method, params.url, headers=headers, json=params.json_body, content=params.body
            )
    except httpx.TimeoutException as exc:
        raise TaskFailed("timeout", f"{params.method} {params.url} timed out after {params.timeout}s") from exc
    except httpx.HTTPError as exc:
        raise TaskFailed("unavailable", f"{params.method} {params.url} failed: {exc}") from exc
    if len(response.content) > params.max_response_bytes:
        raise TaskFailed("resource_exhausted", f"response is {len(response.content)} bytes, over max_response_bytes")
    result: dict[str, Any] = {"status": response.status_code, "headers": dict(response.headers)}
    if "json" in response.headers.get("content-type", ""):
        try:
            result["json"] = response.json()
        except ValueError:
            result["text"] = response.text
    else:
        result["text"] = response.text
    error_class = classify_status(response.status_code)
    if error_class is not None:
        raise TaskFailed(
            error_class,
            f"{params.method} {params.url} returned {response.status_code}",
            {"status": response.status_code, "body": response.text[:1000]},
        )
    return result
