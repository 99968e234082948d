"""``dagsmith operator``: the Kubernetes operator (kopf) over Workflow custom resources."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from dagsmith.settings import get_settings


def operator(
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", "-A", help="Serve Workflows in every namespace")
    ] = False,
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Serve Workflows in this namespace (repeat for several)"),
    ] = None,
    liveness: Annotated[
        str | None,
        typer.Option(help="Serve a liveness probe here, e.g. http://0.0.0.0:8080/healthz"),
    ] = None,
    peering: Annotated[
        str, typer.Option(help="Name of the (Cluster)KopfPeering object replicas coordinate through")
    ] = "dagsmith",
    standalone: Annotated[bool, typer.Option("--standalone", help="No peering: assume a single replica")] = False,
    priority: Annotated[
        int | None, typer.Option(help="Peering priority (default: replicas started earlier win)")
    ] = None,
    status_interval: Annotated[
        float,
        typer.Option(envvar="DAGSMITH_OPERATOR_STATUS_INTERVAL", min=0.1, help="Seconds between .status refreshes"),
    ] = 2.0,
) -> None:
    """Run the Kubernetes operator.

    It submits Workflow resources to the store and mirrors their status back.
    """
    import asyncio

    from controller.operator import OperatorOptions, run_operator
    from dagsmith.logs import configure

    if all_namespaces == bool(namespace):
        typer.echo("error: pass either --all-namespaces or one or more --namespace", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    configure("operator", settings.log_level, settings.log_format)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # liveness probes, every few seconds
    options = OperatorOptions(
        namespaces=tuple(namespace or ()),
        peering=peering,
        standalone=standalone,
        priority=priority,
        liveness=liveness,
        status_interval=status_interval,
    )
    # kopf handles SIGINT/SIGTERM itself in the main thread: it stops watching, leaves the
    # peering, lets running handlers finish, then returns.
    asyncio.run(run_operator(settings, options))


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Services")(operator)
