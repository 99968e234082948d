"""A small HTTP client for the Dagsmith API (used by the CLI; handy in scripts and tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import orjson

from dagsmith.errors import DagsmithError


class WaitTimeout(Exception):
    """A wait for a workflow passed its deadline (the workflow itself goes on)."""


class ClientError(DagsmithError):
    """The API answered with an error (``status`` > 0) or could not be reached (``status`` == 0).

    An argument that cannot go into a URL is refused before any request, as the API would refuse
    it: status 422, code ``invalid_argument``."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


T = TypeVar("T")

# Answers worth waiting out: a proxy or load balancer in front of an API that restarts.
RETRY_STATUSES = frozenset({502, 503, 504})


def segment(value: str, what: str) -> str:
    """``value`` as one URL path segment. Quoted whole (a ``/`` in it stays inside the segment),
    and "", "." and ".." refused: those would make the URL name another resource (``revoke
    ../workflows/ID`` would otherwise delete the workflow)."""
    if value == "":
        raise ClientError(422, "invalid_argument", f"{what} is empty")
    if value in (".", ".."):
        raise ClientError(422, "invalid_argument", f"{what} {value!r} is not valid: it would change the URL's path")
    return quote(value, safe="")


def is_transient(exc: ClientError) -> bool:
    """The API could not be reached, or a proxy said it is away (502/503/504): worth retrying.
    The API's own refusals are not, nor its 503 for too many event streams (polling does instead)."""
    if exc.code == "too_many_streams":
        return False
    return exc.code == "unreachable" or exc.status in RETRY_STATUSES or exc.details.get("http_status") in RETRY_STATUSES


class Backoff:
    """Waits between retries while the API is away: ``first`` seconds, doubling up to ``most``,
    until ``deadline`` (a ``time.monotonic()``; None: for ever), then WaitTimeout.

    ``notify`` is called once per outage (with the error), not on every retry; :meth:`reset`
    after a request succeeds starts the next outage's waits from ``first`` again."""

    def __init__(
        self,
        deadline: float | None = None,
        *,
        first: float = 0.5,
        most: float = 5.0,
        notify: Callable[[ClientError], None] | None = None,
    ) -> None:
        self.deadline = deadline
        self.first = first
        self.most = most
        self.notify = notify
        self.delay = first
        self.away = False

    def reset(self) -> None:
        self.delay = self.first
        self.away = False

    def pause(self, exc: ClientError) -> None:
        """Wait before the next try; WaitTimeout if the deadline comes first."""
        if not self.away and self.notify is not None:
            self.notify(exc)
        self.away = True
        wait = self.delay
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout
            wait = min(wait, left)
        time.sleep(wait)
        self.delay = min(self.delay * 2, self.most)

    def call(self, request: Callable[[], T]) -> T:
        """``request()``, tried again while the API is away."""
        while True:
            try:
                answer = request()
            except ClientError as exc:
                if not is_transient(exc):
                    raise
                self.pause(exc)
                continue
            self.reset()
            return answer


class Client:
    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            message = f"cannot reach the API at {self.base_url}: {exc} (set --api or DAGSMITH_API)"
            raise ClientError(0, "unreachable", message) from exc
        if response.status_code >= 400:
            self._raise_for(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._decode(self._request(method, path, **kwargs))

    def _decode(self, response: httpx.Response) -> Any:
        """The answer's JSON body. Something else (an HTML page from a proxy, another service on
        the port) means --api does not point at a Dagsmith API: said as such, not as a traceback."""
        try:
            return response.json()
        except ValueError:
            raise self._not_the_api(response, "the API's JSON") from None

    def _not_the_api(self, response: httpx.Response, expected: str) -> ClientError:
        # Status 0 (as unreachable): not an answer of the API's, whatever its HTTP status says;
        # that status stays in the details, for the retries of a proxy's 502/503/504.
        kind = response.headers.get("content-type", "no content type")
        message = (
            f"{self.base_url} answered {response.status_code} with {kind}, not {expected}: "
            "is --api (DAGSMITH_API) the Dagsmith API's address?"
        )
        return ClientError(0, "not_the_api", message, {"http_status": response.status_code})

    def submit(
        self, body: bytes, *, content_type: str = "application/yaml", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Content-Type": content_type}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._json("POST", "/v1/workflows", content=body, headers=headers)

    def workflow(self, workflow_id: str) -> dict[str, Any]:
        return self._json("GET", _workflow_path(workflow_id))

    def workflows(self, **params: Any) -> dict[str, Any]:
        return self._json("GET", "/v1/workflows", params={k: v for k, v in params.items() if v is not None})

    def tasks(self, workflow_id: str, **params: Any) -> dict[str, Any]:
        return self._json("GET", _workflow_path(workflow_id, "tasks"), params=params)

    def result(self, workflow_id: str) -> dict[str, Any]:
        return self._json("GET", _workflow_path(workflow_id, "result"))

    def dag(self, workflow_id: str, fmt: str = "json", revision: int | None = None) -> Any:
        params: dict[str, Any] = {"format": fmt}
        if revision is not None:
            params["revision"] = revision
        response = self._request("GET", _workflow_path(workflow_id, "dag"), params=params)
        if fmt == "json":
            return self._decode(response)
        # Mermaid and dot are text/plain: anything else (a proxy's HTML page) is not a graph to print.
        if response.headers.get("content-type", "").split(";")[0].strip().lower() != "text/plain":
            raise self._not_the_api(response, f"the API's {fmt} text (text/plain)")
        return response.text

    def cancel(self, workflow_id: str) -> dict[str, Any]:
        return self._json("POST", _workflow_path(workflow_id, "cancel"))

    def delete(self, workflow_id: str) -> None:
        self._request("DELETE", _workflow_path(workflow_id))

    def executors(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/executors")

    def surgery(self, workflow_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", _workflow_path(workflow_id, "surgery"), json=body)

    def revisions(self, workflow_id: str) -> list[dict[str, Any]]:
        return self._json("GET", _workflow_path(workflow_id, "revisions"))

    def policies(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/policies")

    def activate_policy(self, version: str, force: bool = False) -> dict[str, Any]:
        path = f"/v1/policies/{segment(version, 'policy version')}/activate"
        return self._json("POST", path, params={"force": force})

    def rollback_policy(self) -> dict[str, Any] | None:
        return self._json("POST", "/v1/policies/rollback")

    def create_token(
        self, name: str, scopes: list[str], namespaces: list[str], expires_in: str | None = None
    ) -> dict[str, Any]:
        body = {"name": name, "scopes": scopes, "namespaces": namespaces, "expires_in": expires_in}
        return self._json("POST", "/v1/tokens", json=body)

    def tokens(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/tokens")

    def revoke_token(self, name_or_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/tokens/{segment(name_or_id, 'token name or id')}")

    def events(
        self,
        workflow_id: str,
        after: int = 0,
        deadline: float | None = None,
        follow: bool = True,
        retry: Backoff | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the workflow's event stream until it ends.

        With a ``deadline`` (``time.monotonic()``), raise WaitTimeout once it has passed. A read
        waits at most the time that was left when the stream opened; the server's pings (every
        15 s) would start that wait again, so after a ping the stream is opened again, after the
        last event seen, with a read wait no longer than what is left now.

        With ``retry``, a stream that cannot be opened or breaks while the API is away is opened
        again, after the last event seen (none is repeated or lost), once the API is back."""
        path = _workflow_path(workflow_id, "events")
        while True:
            try:
                for event, data, last in self._stream(path, after, deadline, follow, retry):
                    after = last
                    yield event, data
                    if event == "end":
                        return
                # the connection was closed after a ping: open it again
            except ClientError as exc:
                if retry is None or not is_transient(exc):
                    raise
                retry.pause(exc)

    def _stream(
        self, path: str, after: int, deadline: float | None, follow: bool, retry: Backoff | None
    ) -> Iterator[tuple[str, dict[str, Any], int]]:
        """One connection of :meth:`events`: (event, data, id of the last event so far). Returns
        when a ping calls for a fresh read wait; a stream that closes before its ``end`` event
        broke (the server always sends one)."""
        opened = time.monotonic()
        left = None if deadline is None else max(deadline - opened, 0.01)
        timeout = None if left is None else httpx.Timeout(10.0, read=left)
        broke = f"event stream from {self.base_url} broke"
        try:
            with self.http.stream(
                "GET", path, params={"after": after, "follow": str(follow).lower()}, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise_for(response)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    response.read()
                    raise self._not_the_api(response, "the API's event stream")
                if retry is not None:
                    retry.reset()  # the API is back: a later outage is news again
                event, data, last = "message", "", after
                for line in response.iter_lines():
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise WaitTimeout
                    if line.startswith("id:"):
                        last = int(line[3:].strip() or last)
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        if event == "error":  # the server ended the stream (the token was revoked)
                            err = orjson.loads(data).get("error", {})
                            code = err.get("code", "error")
                            status = 503 if code == "too_many_streams" else 401
                            raise ClientError(status, code, err.get("message", data))
                        yield event, orjson.loads(data), last
                        if event == "end":
                            return
                        event, data = "message", ""
                    elif line.startswith(":") and left is not None and now - opened > 1.0:
                        return  # a ping: open again, with a read wait no longer than what is left
        except httpx.ReadTimeout as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout from None
            raise ClientError(0, "unreachable", f"{broke}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise ClientError(0, "unreachable", f"{broke}: {exc}") from exc
        raise ClientError(0, "unreachable", f"{broke}: it closed before the workflow's end")

    def _raise_for(self, response: httpx.Response) -> None:
        """The error an answer of 400 or more stands for. The API's errors are JSON: any other
        body (an HTML error page) comes from something else at that address."""
        if not _is_json(response):
            raise self._not_the_api(response, "the API's JSON")
        try:
            error = response.json()["error"]
            raise ClientError(response.status_code, error["code"], error["message"], error.get("details"))
        except (ValueError, KeyError, TypeError):
            raise ClientError(
                response.status_code, "http_error", response.text[:500] or response.reason_phrase
            ) from None


def _is_json(response: httpx.Response) -> bool:
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _workflow_path(workflow_id: str, *rest: str) -> str:
    return "/".join(["/v1/workflows", segment(workflow_id, "workflow id"), *rest])
