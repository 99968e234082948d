"""``dagsmith prune``: delete finished workflows by age, straight in the database (like ``migrate``)."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

from dagsmith.settings import MAX_RETENTION, get_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection


def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Delete workflows that finished at least this long ago, e.g. 30d")
    ],
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Only this namespace (repeatable; default: all)")
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", "-s", help="Only this final status: succeeded, failed or cancelled (repeatable)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; delete nothing")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting")] = False,
) -> None:
    """Delete finished workflows, with their tasks, events and DAG revisions.

    Pending and running workflows are never touched; correction decisions stay (the trainer's data).

    Works on the database (DAGSMITH_DATABASE_URL) in batches while the system runs; if stopped, run it again.
    """
    from controller.queries import TERMINAL
    from dagsmith.durations import parse_duration

    try:
        age = parse_duration(older_than, maximum=MAX_RETENTION)
    except ValueError as exc:
        typer.echo(f"error: --older-than: {exc}", err=True)
        raise typer.Exit(2) from None
    statuses = tuple(status or TERMINAL)
    wrong = [s for s in statuses if s not in TERMINAL]
    if wrong:
        typer.echo(
            f"error: --status {wrong[0]!r}: only succeeded, failed or cancelled workflows can be deleted", err=True
        )
        raise typer.Exit(2)
    try:
        asyncio.run(_prune(age, namespace, statuses, dry_run=dry_run, yes=yes))
    except KeyboardInterrupt:  # while deleting: the batches that committed are gone
        typer.echo("stopped; what was deleted before stays deleted, the rest is untouched", err=True)
        raise typer.Exit(130) from None


async def _prune(
    age: float, namespaces: list[str] | None, statuses: tuple[str, ...], *, dry_run: bool, yes: bool
) -> None:
    from controller import retention
    from controller.db import create_engine, in_transaction
    from controller.queries import TERMINAL

    settings = get_settings()
    db = create_engine(settings.database_url.get_secret_value(), pool_size=1, name="dagsmith-prune")
    cutoff = retention.cutoff_for(age, datetime.now(UTC))
    where = f" in namespace{'s' if len(namespaces or []) > 1 else ''} {', '.join(namespaces)}" if namespaces else ""
    try:
        try:
            async with db.connect() as conn:
                found = await retention.count_prunable(conn, cutoff, namespaces=namespaces, statuses=statuses)
        except Exception as exc:
            typer.echo(f"error: cannot read the database: {str(exc).splitlines()[0]}", err=True)
            raise typer.Exit(3) from None
        kind = "" if set(statuses) == set(TERMINAL) else " or ".join(statuses) + " "
        typer.echo(
            f"{_count(found.workflows, kind + 'workflow')}{where} finished before {cutoff:%Y-%m-%d %H:%M:%S} UTC, "
            f"with {_count(found.tasks, 'task')}{' (dry run: nothing deleted)' if dry_run else ''}",
            err=True,
        )
        if dry_run or not found.workflows:
            return
        if not yes:
            if not sys.stdin.isatty():
                typer.echo("error: not deleting without a terminal to ask on; pass --yes", err=True)
                raise typer.Exit(2)
            if not _confirmed():
                typer.echo("nothing deleted", err=True)
                return

        async def batch(conn: AsyncConnection) -> retention.Pruned:
            return await retention.prune_batch(conn, cutoff, namespaces=namespaces, statuses=statuses)

        deleted = tasks = 0
        while True:
            pruned = await in_transaction(db, batch, what="prune", attempts=5)
            deleted += pruned.workflows
            tasks += pruned.tasks
            if pruned.workflows:
                typer.echo(
                    f"deleted {deleted}/{_count(found.workflows, 'workflow')}, {_count(tasks, 'task')}", err=True
                )
            if not pruned.more:
                break
    finally:
        await db.dispose()


def _confirmed() -> bool:
    """The answer to "Delete them?". No is an answer (exit 0); Ctrl-C or the end of input at the
    question is not, and exits 130, as an interrupt does, with nothing deleted either way."""
    try:
        return typer.confirm("Delete them?", err=True)
    except typer.Abort:
        typer.echo("\nnothing deleted", err=True)
        raise typer.Exit(130) from None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Maintenance")(prune)
