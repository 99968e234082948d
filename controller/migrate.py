"""Run the Alembic migrations programmatically (``dagsmith migrate``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, pool

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
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
