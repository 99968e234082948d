"""Test isolation: every session gets a fresh database and its own RabbitMQ name prefix.

Nothing is mocked: integration and end-to-end tests talk to the real Postgres and RabbitMQ named
by ``DAGSMITH_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432``) and
``DAGSMITH_TEST_AMQP`` (default ``amqp://guest:guest@127.0.0.1:5672/``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from dagsmith.settings import Settings

PG = os.environ.get("DAGSMITH_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("DAGSMITH_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def _admin() -> psycopg.Connection:
    return psycopg.connect(f"{PG}/postgres", autocommit=True)


def create_database(name: str) -> str:
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{PG.split('://', 1)[1]}/{name}"


def drop_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(database_url: str, prefix: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "amqp_url": AMQP,
        "amqp_prefix": prefix,
        "metrics_port": -1,
        "resync_interval": 1.0,
        "lease_ttl": 6.0,
        "lease_grace": 1.0,
        "heartbeat_interval": 1.0,
        "log_format": "json",
        "shutdown_grace": 2.0,
        # Tests assert what the rules do; exploration is switched on where it is the subject.
        "correction_exploration": 0.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def database(run_id: str) -> Iterator[str]:
    """A migrated database for this session, dropped at the end."""
    from controller.migrate import upgrade

    name = f"dagsmith_test_{run_id}"
    url = create_database(name)
    upgrade(url)
    yield url
    drop_database(name)


@pytest.fixture(scope="session")
def settings(database: str, run_id: str) -> Iterator[Settings]:
    prefix = f"t{run_id}"
    yield make_settings(database, prefix)
    from tests.support.amqp_cleanup import delete_prefix

    delete_prefix(AMQP, prefix)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[object]:
    from controller.db import create_engine

    engine = create_engine(settings.database_url.get_secret_value(), pool_size=2, name="tests")
    yield engine
    await engine.dispose()
