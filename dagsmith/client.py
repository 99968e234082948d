"""A small HTTP client for the Dagsmith API (used by the CLI; handy in scripts and tests)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson

from dagsmith.errors import DagsmithError


class WaitTimeout(Exception):
    """A wait for a workflow passed its deadline (the workflow itself goes on)."""


class ClientError(DagsmithError):
    """The API answered with an error (``status`` > 0) or could not be reached (``status`` == 0)."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


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
            try:
                error = response.json()["error"]
                raise ClientError(response.status_code, error["code"], error["message"], error.get("details"))
            except (ValueError, KeyError, TypeError):
                raise ClientError(
                    response.status_code, "http_error", response.text[:500] or response.reason_phrase
                ) from None
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._decode(self._request(method, path, **kwargs))

    def _decode(self, response: httpx.Response) -> Any:
        """The answer's JSON body. Something else (an HTML page from a proxy, another service on
        the port) means --api does not point at a Dagsmith API: said as such, not as a traceback."""
        try:
            return response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            message = (
                f"{self.base_url} answered {response.status_code} with {kind}, not the API's JSON: "
                "is --api (DAGSMITH_API) the Dagsmith API's address?"
            )
            raise ClientError(0, "not_the_api", message) from None

    def submit(
        self, body: bytes, *, content_type: str = "application/yaml", idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Content-Type": content_type}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._json("POST", "/v1/workflows", content=body, headers=headers)

    def workflow(self, workflow_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/workflows/{workflow_id}")

    def workflows(self, **params: Any) -> dict[str, Any]:
        return self._json("GET", "/v1/workflows", params={k: v for k, v in params.items() if v is not None})

    def tasks(self, workflow_id: str, **params: Any) -> dict[str, Any]:
        return self._json("GET", f"/v1/workflows/{workflow_id}/tasks", params=params)

    def result(self, workflow_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/workflows/{workflow_id}/result")

    def dag(self, workflow_id: str, fmt: str = "json", revision: int | None = None) -> Any:
        params: dict[str, Any] = {"format": fmt}
        if revision is not None:
            params["revision"] = revision
        response = self._request("GET", f"/v1/workflows/{workflow_id}/dag", params=params)
        return self._decode(response) if fmt == "json" else response.text

    def cancel(self, workflow_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/workflows/{workflow_id}/cancel")

    def delete(self, workflow_id: str) -> None:
        self._request("DELETE", f"/v1/workflows/{workflow_id}")

    def executors(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/executors")

    def surgery(self, workflow_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", f"/v1/workflows/{workflow_id}/surgery", json=body)

    def revisions(self, workflow_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/workflows/{workflow_id}/revisions")

    def policies(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/policies")

    def activate_policy(self, version: str, force: bool = False) -> dict[str, Any]:
        return self._json("POST", f"/v1/policies/{version}/activate", params={"force": force})

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
        return self._json("DELETE", f"/v1/tokens/{name_or_id}")

    def events(
        self, workflow_id: str, after: int = 0, deadline: float | None = None, follow: bool = True
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the workflow's event stream until it ends.

        With a ``deadline`` (``time.monotonic()``), raise WaitTimeout once it has passed. A read
        waits at most the time that was left when the stream opened; the server's pings (every
        15 s) would start that wait again, so after a ping the stream is opened again, after the
        last event seen, with a read wait no longer than what is left now."""
        while True:
            opened = time.monotonic()
            left = None if deadline is None else max(deadline - opened, 0.01)
            timeout = None if left is None else httpx.Timeout(10.0, read=left)
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/workflows/{workflow_id}/events",
                    params={"after": after, "follow": str(follow).lower()},
                    timeout=timeout,
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise_for(response)
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
                                raise ClientError(401, err.get("code", "error"), err.get("message", data))
                            yield event, orjson.loads(data)
                            if event == "end":
                                return
                            event, data, after = "message", "", last
                        elif line.startswith(":") and left is not None and now - opened > 1.0:
                            break  # a ping: open again, with a read wait no longer than what is left
                    else:
                        return
            except httpx.ReadTimeout as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout from None
                raise ClientError(0, "unreachable", f"event stream from {self.base_url} broke: {exc}") from exc
            except httpx.HTTPError as exc:
                raise ClientError(0, "unreachable", f"event stream from {self.base_url} broke: {exc}") from exc

    def _raise_for(self, response: httpx.Response) -> None:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise ClientError(response.status_code, "http_error", response.text[:500]) from None
        raise ClientError(response.status_code, error["code"], error["message"], error.get("details"))
