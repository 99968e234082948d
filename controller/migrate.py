"""Run the Alembic migrations programmatically (``dagsmith migrate``), and tell the services
whether the database's schema is the one this build needs."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import create_engine, pool

from dagsmith.errors import DagsmithError

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import AsyncConnection

MIGRATIONS = Path(__file__).with_name("migrations")


# Alembic is imported where it is used: it takes a third of a second, which every service that
# only needs SchemaOutdated (and the CLI's other commands) would pay at start.
def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def ensure_database(database_url: str) -> bool:
    """Create the database named in the URL if it does not exist yet. Returns True if it created it."""
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(plain, connect_timeout=10):
            return False
    except psycopg.OperationalError as exc:
        if "does not exist" not in str(exc):
            raise
    maintenance = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(maintenance, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{url.database}"')
    return True


def upgrade(database_url: str, revision: str = "head") -> bool:
    """Bring the schema to ``revision``; True if the database itself had to be created first."""
    from alembic import command

    created = ensure_database(database_url)
    engine = create_engine(database_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        # One migrator at a time: several services may start together and all run migrations.
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7428113)")
        config = alembic_config(database_url)
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    return created


def downgrade(database_url: str, revision: str) -> None:
    from alembic import command

    engine = create_engine(database_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7428113)")
        config = alembic_config(database_url)
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(database_url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


class SchemaOutdated(DagsmithError):
    """The database's schema is older than this build's: the service must not start on it."""


@dataclass(frozen=True)
class SchemaState:
    """Where the database's schema is (``current``; None: no schema) against this build's ``head``."""

    current: str | None
    head: str
    known: bool  # whether this build has a migration named ``current``

    @property
    def behind(self) -> bool:
        """The schema lacks migrations this build needs (none at all counts)."""
        return self.current != self.head and (self.current is None or self.known)

    @property
    def ahead(self) -> bool:
        """A newer build migrated the database. Not refused: during a rolling upgrade the old
        build keeps running on the newer schema until it is replaced."""
        return self.current is not None and not self.known

    def problem(self) -> str:
        """What is wrong, in one line, with what to do."""
        if self.ahead:
            return (
                f"the database schema is at revision {self.current}, which this build does not know "
                f"(it knows up to {self.head}): a newer build migrated it"
            )
        return (
            f"the database schema is at revision {self.current or 'base (no schema)'}, "
            f"this build needs {self.head}: run dagsmith migrate"
        )


@functools.cache
def _revisions() -> tuple[str, frozenset[str]]:
    """This build's head revision and every revision it has (read once: the files do not change)."""
    # Alembic logs a line per plugin at INFO as it loads: noise in a service's log.
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)
    try:
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(alembic_config(""))
        head = script.get_current_head()
        known = frozenset(r.revision for r in script.walk_revisions())
    finally:
        alembic_log.setLevel(level)
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS}")
    return head, known


def state_of(current: str | None) -> SchemaState:
    head, known = _revisions()
    return SchemaState(current=current, head=head, known=current in known)


async def schema_state(conn: AsyncConnection) -> SchemaState:
    """The schema's state as seen on ``conn``: a database without alembic's version table has none."""
    exists = await conn.scalar(sa.text("SELECT to_regclass('alembic_version') IS NOT NULL"))
    current = await conn.scalar(sa.text("SELECT version_num FROM alembic_version")) if exists else None
    return state_of(current)
