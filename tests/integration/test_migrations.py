"""Migrations run up, down and up again on an empty database."""

from __future__ import annotations

import uuid

import psycopg

from controller.migrate import current, downgrade, upgrade
from tests.conftest import create_database, drop_database


def tables(url: str) -> set[str]:
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def test_up_down_up() -> None:
    name = f"dagsmith_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        assert upgrade(url) is False  # the database was there
        assert current(url) is not None
        assert {"workflows", "tasks", "task_events", "executors", "task_types"} <= tables(url)
        downgrade(url, "base")
        assert current(url) is None
        assert tables(url) <= {"alembic_version"}
        upgrade(url)
        assert {"workflows", "tasks"} <= tables(url)
    finally:
        drop_database(name)


def test_migrations_match_the_schema_module(database: str) -> None:
    """The tables the code queries (controller/schema.py) are exactly what the migrations create."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from controller.schema import metadata

    engine = create_engine(database)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


def test_migrate_creates_a_missing_database_and_says_so() -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import PG

    name = f"dagsmith_mig_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    env["DAGSMITH_DATABASE_URL"] = f"postgresql+psycopg://{PG.split('://', 1)[1]}/{name}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dagsmith", "migrate"], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert f"created the database '{name}', which did not exist" in done.stderr
        again = subprocess.run(
            [sys.executable, "-m", "dagsmith", "migrate"], capture_output=True, text=True, env=env, timeout=120
        )
        assert again.returncode == 0 and "created" not in again.stderr
    finally:
        drop_database(name)
