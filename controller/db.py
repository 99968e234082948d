"""Database engine, transactions that retry on transient errors, and notification channels."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import orjson
import structlog
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = structlog.get_logger(__name__)

T = TypeVar("T")

# NOTIFY channels. Payloads are workflow ids.
CHANNEL_WORKFLOWS = "dagsmith_workflows"  # a workflow needs the controller (new, cancel, surgery)
CHANNEL_EVENTS = "dagsmith_events"  # a workflow's tasks changed (for event streams)

# SQLSTATEs worth retrying the whole transaction for.
_RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03", "08000", "08003", "08006"}


def _use_orjson() -> None:
    """psycopg parses and writes JSON with orjson: several times faster than the json module."""
    from psycopg.types.json import set_json_dumps, set_json_loads

    set_json_loads(orjson.loads)
    set_json_dumps(lambda obj: orjson.dumps(obj, default=str))


def create_engine(url: str, pool_size: int = 10, name: str = "dagsmith", pre_ping: bool = True) -> AsyncEngine:
    """``pre_ping`` tests each pooled connection before use (one round trip). Callers whose work
    all goes through :func:`in_transaction` can turn it off: a dropped connection fails the
    transaction, which is retried whole on a fresh one."""
    _use_orjson()
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        # The rounds rely on it: each statement of a round sees what committed before it began.
        isolation_level="READ COMMITTED",
        pool_recycle=1800,
        connect_args={"application_name": name},
    )


def is_transient(exc: BaseException) -> bool:
    """Deadlocks, serialization failures and lost connections: retrying the transaction helps."""
    if isinstance(exc, OperationalError | DBAPIError) and getattr(exc, "connection_invalidated", False):
        return True
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    return isinstance(exc, OperationalError | ConnectionError | OSError)


async def in_transaction(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    what: str,
    attempts: int | None = None,
) -> T:
    """Run ``work`` in a transaction, retrying it whole on transient errors (forever if attempts is None).

    ``work`` must be safe to repeat: it is only ever partly done if the transaction rolled back.
    """
    delay = 0.05
    attempt = 0
    while True:
        attempt += 1
        try:
            async with engine.begin() as conn:
                return await work(conn)
        except Exception as exc:
            if not is_transient(exc) or (attempts is not None and attempt >= attempts):
                raise
            log.warning("transaction failed; retrying", what=what, attempt=attempt, error=str(exc)[:300])
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def wait_for_database(engine: AsyncEngine, stop: asyncio.Event, *, service: str) -> bool:
    """Wait until Postgres answers, saying so while it does not (a service started before its
    database, or while it restarts, waits for it as it waits for RabbitMQ). False if ``stop``
    came first."""
    delay = 0.5
    while not stop.is_set():
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
            return True
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("postgres not reachable; retrying", service=service, error=str(exc)[:200], retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)
    return False
