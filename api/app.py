"""The FastAPI application: ``create_app()``; run with ``dagsmith api``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import Depends, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

import dagsmith
from api import errors
from api.deps import AppState
from api.events_hub import EventsHub
from api.middleware import MAX_TARGET_BYTES, Observe, RequestGuard
from api.models import ErrorResponse
from api.routes import policies, system, tokens, workflows
from controller.db import create_engine
from controller.migrate import schema_state
from dagsmith.settings import Settings, get_settings
from dagsmith.spec import WorkflowDocument

log = structlog.get_logger(__name__)


_QUERY_NAMES: dict[int, frozenset[str]] = {}


def _query_names(route: APIRoute) -> frozenset[str]:
    cached = _QUERY_NAMES.get(id(route))
    if cached is not None:
        return cached
    names: set[str] = set()
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        names.update(p.alias for p in dependant.query_params)
        pending.extend(dependant.dependencies)
    _QUERY_NAMES[id(route)] = frozenset(names)
    return _QUERY_NAMES[id(route)]


async def reject_unknown_query(request: Request) -> None:
    """A misspelt filter (``?stauts=failed``) must not silently return everything: 422."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    unknown = set(request.query_params) - _query_names(route)
    if unknown:
        raise errors.APIError(
            422,
            "invalid_request",
            f"unknown query parameter(s): {', '.join(sorted(unknown))}",
            {"allowed": sorted(_query_names(route))},
        )


# SQLSTATEs of a query naming a table or column the database lacks: the schema is older than the
# code (it was not migrated), which a user can fix, unlike a bug.
_MISSING_IN_SCHEMA = {"42P01", "42703"}


async def _log_schema(db: AsyncEngine) -> None:
    """Say at start if the schema is not this build's. The API serves on (readyz says 503 until a
    migration brings it to head, which needs no restart); the controller refuses to start."""
    try:
        async with db.connect() as conn:
            schema = await schema_state(conn)
    except Exception as exc:  # Postgres is down: readyz says so, and checks the schema once it is up
        log.warning("schema not checked: postgres unreachable", error=str(exc).splitlines()[0][:200])
        return
    if schema.behind:
        log.error(schema.problem())
    elif schema.ahead:
        log.warning(schema.problem())


async def _missing_schema(request: Request, exc: Exception) -> JSONResponse:
    """A query on a table or column the schema lacks: 503 with what to do, if the schema is
    behind; otherwise the bug it is (500, as any unexpected error)."""
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    if sqlstate in _MISSING_IN_SCHEMA:
        try:
            async with request.app.state.dagsmith.db.connect() as conn:
                schema = await schema_state(conn)
        except Exception:
            schema = None
        if schema is not None and schema.behind:
            return JSONResponse(errors.error_body("schema_outdated", schema.problem()), status_code=503)
    log.error("unhandled error", path=request.url.path, exc_info=exc)
    return JSONResponse(
        errors.error_body("internal", "internal error; the server log has the details"), status_code=500
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth:
            log.warning("API AUTHENTICATION IS OFF (DAGSMITH_AUTH=false): anyone who can reach it can do anything")
        elif settings.admin_token is None:
            log.info("no DAGSMITH_ADMIN_TOKEN set: only tokens stored in the database are accepted")
        db = create_engine(settings.database_url.get_secret_value(), settings.db_pool_size, name="dagsmith-api")
        hub = EventsHub(settings.psycopg_dsn())
        hub.start()
        app.state.dagsmith = AppState(settings=settings, db=db, hub=hub)
        await _log_schema(db)
        yield
        await hub.stop()
        await db.dispose()

    app = FastAPI(
        dependencies=[Depends(reject_unknown_query)],
        title="Dagsmith",
        version=dagsmith.__version__,
        description="Submit workflow DAGs, watch them run, fetch their results.",
        lifespan=lifespan,
        responses={414: {"model": ErrorResponse, "description": f"Path and query over {MAX_TARGET_BYTES} bytes."}},
    )
    errors.install(app)
    app.add_exception_handler(ProgrammingError, _missing_schema)
    app.include_router(workflows.router)
    app.include_router(system.router)
    app.include_router(tokens.router)
    app.include_router(policies.router)

    # Outermost first: metrics see every request, including those the guard refuses.
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(Observe)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec_schema = WorkflowDocument.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec_schema.pop("$defs", {}))
        components["WorkflowDocument"] = spec_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
