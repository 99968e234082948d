"""Two plain ASGI middlewares (cheaper per request than Starlette's BaseHTTPMiddleware):

- :class:`RequestGuard` refuses, before any route runs, a path and query longer than
  :data:`MAX_TARGET_BYTES`, a NUL in them (Postgres cannot store or compare it) and a body over
  ``DAGSMITH_MAX_BODY_BYTES`` — by its Content-Length, or by counting a body sent without one —
  with the API's error shape.
- :class:`Observe` records each request's latency by method, route template and status.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body

REQUEST_SECONDS = Histogram(
    "dagsmith_api_request_seconds",
    "API request latency.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


# Longest path and query the API answers (414 above), well under the HTTP server's own limit
# (about 64 KiB with httptools), past which the server refuses the request itself with a plain-text
# 400 before the application sees it. No route needs more: filters are short, and lists are paged.
MAX_TARGET_BYTES = 8192


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = (scope.get("raw_path") or b"") + b"?" + (scope.get("query_string") or b"")
        if len(target) - 1 > MAX_TARGET_BYTES:
            too_long = (
                f"the URL's path and query are {len(target) - 1} bytes; the limit is {MAX_TARGET_BYTES}: "
                "use fewer filters (page through a long list with `cursor`)"
            )
            await _reply(send, 414, error_body("too_long", too_long))
            return
        if b"%00" in target.lower() or b"\x00" in target:
            await _reply(
                send, 422, error_body("invalid_request", "NUL characters (%00) are not allowed in the path or query")
            )
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            declared = f"request body is {int(length)} bytes; the limit is {self.limit} (DAGSMITH_MAX_BODY_BYTES)"
            await _reply(send, 413, error_body("too_large", declared))
            return
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # No declared length (chunked): read it all here, counting, then replay it to the app.
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limit:
                    await _reply(
                        send, 413, error_body("too_large", f"request body is over the limit of {self.limit} bytes")
                    )
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


class Observe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUEST_SECONDS.labels(scope.get("method", ""), route, str(status)).observe(time.perf_counter() - start)
