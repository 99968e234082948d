"""/v1/executors, /healthz, /readyz."""

from __future__ import annotations

import asyncio

import aio_pika
import sqlalchemy as sa
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.auth import Reader
from api.deps import AppState, Conn, State
from api.models import ErrorResponse, Executor, Health
from controller import queries
from controller.migrate import schema_state

router = APIRouter()


@router.get(
    "/v1/executors",
    response_model=list[Executor],
    responses={
        401: {"model": ErrorResponse, "description": "No token, or a bad one."},
        403: {"model": ErrorResponse, "description": "The token lacks the read scope."},
    },
    tags=["executors"],
    summary="Registered executors",
)
async def list_executors(conn: Conn, state: State, principal: Reader) -> list[Executor]:
    window = state.settings.heartbeat_interval * 3
    return [Executor(**e) for e in await queries.list_executors(conn, window)]


@router.get("/healthz", response_model=Health, tags=["system"], summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={
        503: {
            "model": Health,
            "description": "Postgres or RabbitMQ is not reachable, or the schema is not migrated to this build's.",
        }
    },
    tags=["system"],
    summary="Postgres and RabbitMQ are reachable and the schema is this build's",
)
async def readyz(state: State) -> JSONResponse:
    checks = await _postgres_checks(state)
    try:
        connection = await asyncio.wait_for(
            aio_pika.connect(state.settings.amqp_url.get_secret_value(), timeout=3), timeout=4
        )
        await connection.close()
        checks["rabbitmq"] = "ok"
    except Exception as exc:
        checks["rabbitmq"] = f"unreachable: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        Health(status="ok" if ok else "unavailable", checks=checks).model_dump(),
        status_code=200 if ok else 503,
    )


async def _postgres_checks(state: AppState) -> dict[str, str]:
    """Postgres answers, and its schema is the one this build needs.

    The schema is read on every probe (a few small queries): an API started before `dagsmith
    migrate` becomes ready once the migration has run, without a restart. A ``schema`` check is
    listed only when the schema is behind, naming both revisions; a ready API's checks stay
    postgres and rabbitmq."""
    try:
        async with state.db.connect() as conn:
            await asyncio.wait_for(conn.execute(sa.text("SELECT 1")), timeout=3)
            schema = await asyncio.wait_for(schema_state(conn), timeout=3)
    except Exception as exc:
        return {"postgres": f"unreachable: {type(exc).__name__}"}
    return {"postgres": "ok", "schema": schema.problem()} if schema.behind else {"postgres": "ok"}
