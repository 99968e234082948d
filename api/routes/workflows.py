"""/v1/workflows: submit, list, inspect, watch, cancel, delete."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import Counter
from sse_starlette.sse import EventSourceResponse

from api.auth import Principal, Reader, Writer, authenticate, bearer
from api.dag_render import nodes_and_edges, structure_at, to_dot, to_mermaid
from api.deps import AppState, Conn, State
from api.errors import APIError, error_body
from api.models import (
    Cancelled,
    Dag,
    ErrorResponse,
    Result,
    Revision,
    Submitted,
    Surgery,
    SurgeryRequest,
    TaskList,
    Workflow,
    WorkflowList,
)
from controller import queries, retention, revisions
from controller.store import known_task_types
from controller.submit import submit
from dagsmith.durations import parse_duration
from dagsmith.errors import NotFound
from dagsmith.validation import load_document, params_problems, unknown_type, validate

# What a workflow document may be sent as (none at all is read as YAML, which JSON also is).
DOCUMENT_TYPES = frozenset(
    {"application/json", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", "text/plain"}
)
router = APIRouter(prefix="/v1/workflows", tags=["workflows"])

STREAM_REAUTH_SECONDS = 15.0  # how soon an open event stream notices its token was revoked or expired
SUBMITTED = Counter("dagsmith_api_workflows_submitted_total", "Workflows accepted by the API.", ["source"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body could not be read (not JSON, not UTF-8)."},
    401: {"model": ErrorResponse, "description": "No token, or an unknown, revoked or expired one."},
    403: {"model": ErrorResponse, "description": "The token lacks the scope this needs."},
    404: {"model": ErrorResponse, "description": "No such workflow."},
    422: {"model": ErrorResponse, "description": "Invalid request."},
}


async def _known_types(state: AppState, conn: Conn) -> set[str]:
    fetched_at, types = state.known_types
    if time.monotonic() - fetched_at > 5.0:
        types = await known_task_types(conn)
        state.known_types = (time.monotonic(), types)
    return types


@router.post(
    "",
    status_code=201,
    response_model=Submitted,
    responses={
        **_ERRORS,
        200: {
            "model": Submitted,
            "description": "Same Idempotency-Key as an earlier submission: that workflow.",
        },
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different document."},
        413: {"model": ErrorResponse, "description": "Body larger than DAGSMITH_MAX_BODY_BYTES."},
        415: {"model": ErrorResponse, "description": "A Content-Type other than JSON or YAML."},
        422: {
            "model": ErrorResponse,
            "description": "Invalid workflow document; details.problems lists each.",
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/WorkflowDocument"}},
                "application/yaml": {"schema": {"$ref": "#/components/schemas/WorkflowDocument"}},
            },
        }
    },
    summary="Submit a workflow (JSON or YAML)",
)
async def submit_workflow(
    request: Request,
    response: Response,
    state: State,
    conn: Conn,
    principal: Writer,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Submitted:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media and media not in DOCUMENT_TYPES and not media.endswith(("+json", "+yaml")):
        raise APIError(
            415, "unsupported_media_type", f"Content-Type {media!r} is not a workflow document: send JSON or YAML"
        )
    body = await request.body()
    raw = load_document(body, content_type)
    checked = validate(raw, state.settings.limits(), await _known_types(state, conn))
    namespace = checked.document.metadata.namespace or "default"
    if not principal.may_use(namespace):
        raise APIError(403, "forbidden", f"this token may not submit workflows to namespace {namespace!r}")
    await conn.commit()  # end the read transaction; the write below is its own
    async with state.db.begin() as tx:
        result = await submit(tx, checked, namespace=namespace, idempotency_key=idempotency_key, source="api")
    if result.created:
        SUBMITTED.labels("api").inc()
    else:
        response.status_code = 200
    return Submitted(
        id=str(result.id),
        name=checked.document.metadata.name,
        namespace=namespace,
        status=result.status,
        created=result.created,
        warnings=checked.warnings,
    )


def _visible(principal: Principal, namespace: str | None) -> list[str] | None:
    """The namespaces a listing may show: the asked one (if allowed) or all the principal sees."""
    allowed = principal.namespace_filter
    if namespace:
        return [namespace] if allowed is None or namespace in allowed else []
    return allowed


def _labels(selectors: list[str]) -> dict[str, str]:
    labels = {}
    for selector in selectors:
        key, sep, value = selector.partition("=")
        if not sep or not key:
            raise APIError(422, "invalid_request", f"label filter {selector!r} must look like key=value")
        labels[key] = value
    return labels


@router.get("", response_model=WorkflowList, responses=_ERRORS, summary="List workflows, newest first")
async def list_workflows(
    conn: Conn,
    principal: Reader,
    status: Annotated[list[Literal["pending", "running", "succeeded", "failed", "cancelled"]] | None, Query()] = None,
    label: Annotated[
        list[Annotated[str, Query(pattern=r"^[^=]+=.*$", max_length=400)]] | None,
        Query(description="key=value; repeat to require several"),
    ] = None,
    name: Annotated[str | None, Query(max_length=253)] = None,
    namespace: Annotated[str | None, Query(max_length=63)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=500, pattern=r"^[A-Za-z0-9_=-]+$")] = None,
) -> WorkflowList:
    try:
        rows, next_cursor = await queries.list_workflows(
            conn,
            namespaces=_visible(principal, namespace),
            status=list(status) if status else None,
            labels=_labels(label or []),
            name=name,
            limit=limit,
            cursor=cursor,
        )
    except ValueError as exc:
        raise APIError(422, "invalid_request", str(exc)) from exc
    return WorkflowList(items=[Workflow(**queries.workflow_summary(r)) for r in rows], next_cursor=next_cursor)


@router.get("/{workflow_id}", response_model=Workflow, responses=_ERRORS, summary="A workflow's status and progress")
async def get_workflow(workflow_id: str, state: State, conn: Conn, principal: Reader) -> Workflow:
    row = await queries.get_workflow(conn, queries.parse_id(workflow_id), principal.namespace_filter)
    waiting: list[str] = []
    if row.status in ("pending", "running") and row.n_queued:
        # As GET /v1/executors judges liveness.
        waiting = await queries.unserved_types(conn, row.id, state.settings.heartbeat_interval * 3)
    return Workflow(**queries.workflow_summary(row), waiting_for=waiting)


@router.get("/{workflow_id}/tasks", response_model=TaskList, responses=_ERRORS, summary="A workflow's tasks")
async def list_tasks(
    workflow_id: str,
    conn: Conn,
    principal: Reader,
    status: Annotated[
        list[Literal["pending", "queued", "running", "succeeded", "failed", "skipped", "cancelled"]] | None,
        Query(),
    ] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> TaskList:
    wid = queries.parse_id(workflow_id)
    await queries.get_workflow(conn, wid, principal.namespace_filter)
    rows, next_after = await queries.list_tasks(
        conn, wid, status=list(status) if status else None, after=after, limit=limit
    )
    return TaskList(items=[queries.task_json(r) for r in rows], next_after=next_after)


@router.get(
    "/{workflow_id}/result",
    response_model=Result,
    responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "The workflow has not finished yet."}},
    summary="The workflow's output once it has finished",
)
async def get_result(workflow_id: str, conn: Conn, principal: Reader) -> Result:
    row = await queries.get_workflow(conn, queries.parse_id(workflow_id), principal.namespace_filter)
    if row.status not in queries.TERMINAL:
        done = row.n_total - row.n_pending - row.n_queued - row.n_running
        raise APIError(
            409,
            "not_finished",
            f"workflow {row.id} is {row.status} ({done}/{row.n_total} tasks done)",
            {"status": row.status},
        )
    return Result(id=str(row.id), status=row.status, output=row.output, error=row.error, total_reward=row.total_reward)


@router.get(
    "/{workflow_id}/dag",
    response_model=Dag,
    responses={**_ERRORS, 200: {"content": {"text/plain": {}}, "description": "JSON, or Mermaid/DOT text"}},
    summary="The DAG with each node's status and reward (json, mermaid or dot), now or at a past revision",
)
async def get_dag(
    workflow_id: str,
    conn: Conn,
    principal: Reader,
    format: Literal["json", "mermaid", "dot"] = "json",
    revision: Annotated[
        int | None, Query(ge=0, le=100_000, description="Show this revision (default: current)")
    ] = None,
) -> Any:
    row = await queries.get_workflow(conn, queries.parse_id(workflow_id), principal.namespace_filter)
    if revision is None or revision == row.dag_revision:
        graph = nodes_and_edges(await queries.dag_rows(conn, row.id))
        shown = row.dag_revision
    elif revision > row.dag_revision:
        raise APIError(404, "not_found", f"workflow {row.id} has no revision {revision} (latest: {row.dag_revision})")
    else:
        diffs = [r.diff for r in await revisions.history(conn, row.id) if r.revision <= revision]
        graph = structure_at(row.spec["spec"]["tasks"], diffs)
        shown = revision
    if format == "mermaid":
        return PlainTextResponse(to_mermaid(graph))
    if format == "dot":
        return PlainTextResponse(to_dot(graph, row.name))
    return Dag(workflow_id=str(row.id), revision=shown, **graph)


@router.get(
    "/{workflow_id}/revisions",
    response_model=list[Revision],
    responses=_ERRORS,
    summary="The DAG's history: every surgery, by whom, why, and what it changed",
)
async def list_revisions(workflow_id: str, conn: Conn, principal: Reader) -> list[Revision]:
    row = await queries.get_workflow(conn, queries.parse_id(workflow_id), principal.namespace_filter)
    return [
        Revision(
            revision=r.revision,
            parent_revision=r.parent_revision,
            actor=r.actor,
            operation=r.operation,
            task=r.task_name,
            reason=r.reason,
            diff=r.diff,
            created_at=r.created_at,
        )
        for r in await revisions.history(conn, row.id)
    ]


@router.post(
    "/{workflow_id}/surgery",
    status_code=201,
    response_model=Surgery,
    responses={
        **_ERRORS,
        409: {"model": ErrorResponse, "description": "Not possible in the task's state (e.g. it is running)."},
    },
    summary="Change a workflow's DAG: retry a task (with edited params), replace its type, insert a task, skip",
)
async def surgery(workflow_id: str, body: SurgeryRequest, state: State, principal: Writer) -> Surgery:
    wid = queries.parse_id(workflow_id)
    try:
        delay = parse_duration(body.delay) if body.delay else 0.0
    except ValueError as exc:
        raise APIError(422, "invalid_request", f"delay: {exc}") from exc
    problems = params_problems(body.params, state.settings.limits()) if body.params is not None else []
    if problems:
        first = problems[0]
        raise APIError(422, "invalid_request", f"{first['path']}: {first['message']}", {"problems": problems})
    async with state.db.begin() as tx:
        applied = await revisions.manual(
            tx,
            wid,
            operation=body.op,
            task_name=body.task,
            actor=principal.actor,
            namespaces=principal.namespace_filter,
            now=time.time(),
            params=body.params,
            new_type=body.type,
            name=body.name,
            delay=delay,
            message=body.reason,
            max_tasks=state.settings.max_tasks,
            alive_window=state.settings.heartbeat_interval * 3,  # as GET /v1/executors judges it
            may_move_secrets="admin" in principal.scopes,
        )
    warnings = []
    if body.type is not None:
        async with state.db.connect() as conn:
            known = await _known_types(state, conn)
            if body.type not in known:
                warnings.append(unknown_type(body.type, known))
    return Surgery(
        workflow_id=str(wid),
        revision=applied.revision,
        operation=applied.plan.operation.value,
        task=body.task,
        inserted_task_id=applied.inserted_id,
        diff=applied.plan.diff,
        warnings=warnings,
    )


@router.get(
    "/{workflow_id}/events",
    responses={
        **_ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
        503: {"model": ErrorResponse, "description": "This API serves as many streams as it may."},
    },
    summary="Task transitions as Server-Sent Events: live until the workflow ends, or (follow=false) so far",
)
async def stream_events(
    workflow_id: str,
    request: Request,
    state: State,
    principal: Reader,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    after: Annotated[int, Query(ge=0, le=2**62, description="Only events with a larger id")] = 0,
    follow: Annotated[
        bool, Query(description="Keep streaming until the workflow finishes (false: end after the history so far)")
    ] = True,
    last_event_id: Annotated[
        str | None, Header(description="The id of the last event received (a reconnecting client)")
    ] = None,
) -> EventSourceResponse:
    wid = queries.parse_id(workflow_id)
    # A connection of its own, returned at once: a stream lasts as long as its workflow, and a
    # request-scoped one would be held (idle in a transaction) all that time.
    async with state.db.connect() as conn:
        await queries.get_workflow(conn, wid, principal.namespace_filter)
    if state.hub.streams >= state.settings.max_sse_connections:
        raise _too_many_streams(state)
    # Only an id this API could have sent counts (at most 18 digits, all below 2**62, the largest
    # an event id can be); anything else is ignored, as a header the client got wrong.
    if last_event_id and re.fullmatch(r"[0-9]{1,18}", last_event_id):
        after = max(after, int(last_event_id))

    async def still_allowed() -> bool:
        try:
            await authenticate(state, credentials)
        except APIError:
            return False
        return True

    return EventSourceResponse(_events(request, state, wid, after, still_allowed, follow), ping=15)


def _too_many_streams(state: AppState) -> APIError:
    limit = state.settings.max_sse_connections
    message = f"this API serves at most {limit} event streams (DAGSMITH_MAX_SSE_CONNECTIONS)"
    return APIError(503, "too_many_streams", message)


async def _events(
    request: Request,
    state: AppState,
    wid: Any,
    after: int,
    still_allowed: Callable[[], Awaitable[bool]],
    follow: bool = True,
) -> AsyncIterator[dict[str, Any]]:
    wake = state.hub.watch(str(wid))
    checked = time.monotonic()
    try:
        if state.hub.streams > state.settings.max_sse_connections:
            # Requests that came together all passed the route's check before any was counted:
            # counted now (nothing yields in between), those beyond the limit end here.
            refused = _too_many_streams(state)
            yield {"event": "error", "data": orjson.dumps(error_body(refused.code, refused.message)).decode()}
            return
        while True:
            # A stream may last as long as its workflow (days): the token that opened it is
            # checked again now and then, so revoking it (or its expiry) ends the stream too.
            if time.monotonic() - checked >= STREAM_REAUTH_SECONDS:
                checked = time.monotonic()
                if not await still_allowed():
                    message = "the API token was revoked or has expired; the stream ends"
                    yield {"event": "error", "data": orjson.dumps(error_body("unauthorized", message)).decode()}
                    return
            wake.clear()
            async with state.db.connect() as conn:
                rows = await queries.events_after(conn, wid, after)
                try:
                    status = (await queries.get_workflow(conn, wid, None)).status  # access checked before streaming
                except NotFound:  # deleted while watched: the stream ends as for a finished workflow
                    yield {"event": "end", "data": orjson.dumps({"status": "deleted"}).decode()}
                    return
            for row in rows:
                after = row.id
                yield {
                    "id": str(row.id),
                    "event": "transition",
                    "data": orjson.dumps(queries.event_json(row)).decode(),
                }
            if len(rows) == 1000:
                continue
            if status in queries.TERMINAL or not follow:
                yield {"event": "end", "data": orjson.dumps({"status": status}).decode()}
                return
            if await request.is_disconnected():
                return
            # At most until the next token check is due, so it comes on time.
            until_check = STREAM_REAUTH_SECONDS - (time.monotonic() - checked)
            try:
                await asyncio.wait_for(wake.wait(), timeout=max(min(15.0, until_check), 0.0))
            except TimeoutError:
                pass
    finally:
        state.hub.unwatch(str(wid), wake)


@router.delete(
    "/{workflow_id}",
    status_code=204,
    response_class=Response,
    responses={
        **_ERRORS,
        409: {"model": ErrorResponse, "description": "Not finished yet, or owned by a Kubernetes Workflow resource."},
    },
    summary="Delete a finished workflow with its tasks, events and revisions (its correction decisions stay)",
)
async def delete_workflow(workflow_id: str, state: State, principal: Writer) -> Response:
    wid = queries.parse_id(workflow_id)
    async with state.db.begin() as tx:
        await retention.delete_workflow(tx, wid, principal.namespace_filter)
    return Response(status_code=204)


@router.post(
    "/{workflow_id}/cancel",
    status_code=202,
    response_model=Cancelled,
    responses={**_ERRORS, 409: {"model": ErrorResponse, "description": "Already finished."}},
    summary="Cancel a workflow: running tasks are told to stop, queued ones are dropped",
)
async def cancel_workflow(workflow_id: str, state: State, principal: Writer) -> Cancelled:
    wid = queries.parse_id(workflow_id)
    async with state.db.begin() as tx:
        await queries.request_cancel(tx, wid, principal.namespace_filter)
    return Cancelled(id=str(wid), status="cancelling")
