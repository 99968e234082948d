"""Service commands: migrate, api, controller, executor, evaluator, dev, config."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from dagsmith.settings import effective, get_settings, masked, settings_table


def run_service(name: str, make: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run an async service until SIGINT/SIGTERM, on uvloop when it is installed."""
    from dagsmith.logs import configure

    settings = get_settings()
    configure(name, settings.log_level, settings.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await make(stop)

    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    from dagsmith.amqp import BrokerUnreachable, StoppedWaiting
    from dagsmith.errors import DagsmithError

    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main())
        except StoppedWaiting:
            logging.getLogger("dagsmith").info("stopped while waiting for RabbitMQ")
        except BrokerUnreachable as exc:
            logging.getLogger("dagsmith").error("%s", exc)
            raise typer.Exit(1) from None
        except DagsmithError as exc:
            # Imported only now: the executor and evaluator never load SQLAlchemy otherwise.
            from controller.migrate import SchemaOutdated

            if not isinstance(exc, SchemaOutdated):
                raise
            # Something to fix (run migrate), not a crash: one line, exit 2.
            logging.getLogger("dagsmith").error("%s", exc)
            raise typer.Exit(2) from None


def migrate(
    revision: Annotated[
        str | None, typer.Argument(help="Target revision: head (the default), or an id; with --down, an id or base")
    ] = None,
    down: Annotated[bool, typer.Option("--down", help="Downgrade to REVISION instead (it must be given)")] = False,
) -> None:
    """Create or upgrade the database schema."""
    from controller.migrate import current, downgrade, upgrade

    if down and revision is None:
        typer.echo(
            "error: --down needs the revision to go down to (an id such as 0004, or base: drop everything)", err=True
        )
        raise typer.Exit(2)
    revision = revision or "head"
    url = get_settings().database_url.get_secret_value()
    from alembic.util import CommandError
    from sqlalchemy.engine import make_url

    try:
        if down:
            downgrade(url, revision)
        elif upgrade(url, revision):
            # Said, not silent: a mistyped database name would otherwise give an empty database.
            typer.echo(f"created the database {make_url(url).database!r}, which did not exist", err=True)
    except CommandError as exc:  # no such revision: the argument is wrong, not the database
        typer.echo(f"error: {exc} (revisions are ids such as 0004, head, or base with --down)", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:
        typer.echo(f"error: migration failed: {exc}", err=True)
        raise typer.Exit(3) from exc
    typer.echo(f"database at revision {current(url) or 'base (no schema)'}")


def api(
    host: Annotated[str | None, typer.Option(help="Bind address [DAGSMITH_API_HOST]")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port [DAGSMITH_API_PORT]")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
) -> None:
    """Serve the REST API."""
    import uvicorn

    from dagsmith.logs import configure

    settings = get_settings()
    configure("api", settings.log_level, settings.log_format)
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )


def controller() -> None:
    """Run the controller (reconciliation loop)."""
    from controller.service import Controller

    run_service("controller", lambda stop: Controller(get_settings()).run(stop))


def evaluator() -> None:
    """Run an evaluator (stateless; run as many as you like)."""
    from evaluator.service import Evaluator

    run_service("evaluator", lambda stop: Evaluator(get_settings()).run(stop))


def executor(
    types: Annotated[
        str,
        typer.Option("--types", "-t", help="Comma-separated task types or globs, e.g. 'text.*,json.*'; '!x' excludes"),
    ] = "*",
    module: Annotated[
        list[str] | None, typer.Option("--module", "-m", help="Import this module for its task types")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Tasks run at once [DAGSMITH_EXECUTOR_CONCURRENCY]")
    ] = None,
    allow_shell: Annotated[bool, typer.Option("--allow-shell", help="Enable shell.run")] = False,
    python_module: Annotated[
        list[str] | None, typer.Option("--python-module", help="Allow python.call into this module")
    ] = None,
    allow_host: Annotated[
        list[str] | None, typer.Option("--allow-host", help="Limit http.request to these hosts")
    ] = None,
    allow_crash: Annotated[bool, typer.Option("--allow-crash", help="Enable chaos.crash (tests only)")] = False,
    no_entry_points: Annotated[bool, typer.Option("--no-entry-points", help="Skip installed plugins")] = False,
) -> None:
    """Run an executor agent for the given task types."""
    from executors.registry import ExecutorOptions, load_plugins
    from executors.runtime import ExecutorRuntime, PluginStartError

    settings = get_settings()
    # --module names a module of the working directory as often as an installed one (as with
    # `python -m`); the `dagsmith` script alone would not look there.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        registry = load_plugins(module or [], use_entry_points=not no_entry_points)
    except ImportError as exc:
        files = [m for m in module or [] if m.endswith(".py")]
        hint = f" (a module is named without .py: --module {files[0].removesuffix('.py')})" if files else ""
        typer.echo(f"error: cannot import executor module: {exc}{hint}", err=True)
        raise typer.Exit(2) from exc
    if no_entry_points:
        import executors.builtins  # noqa: F401  (the built-ins are always available)
    patterns = [t.strip() for t in types.split(",") if t.strip()]
    specs = registry.select(patterns)
    if not specs:
        typer.echo(
            f"error: no registered task type matches {types!r}; known: {', '.join(registry.types())}",
            err=True,
        )
        raise typer.Exit(2)
    options = ExecutorOptions(
        allow_shell=allow_shell or settings.executor_allow_shell,
        python_modules=tuple(python_module or settings.executor_python_modules),
        http_allow_hosts=tuple(allow_host or settings.executor_http_allow_hosts),
        allow_crash=allow_crash,
    )
    # A type named outright that needs a flag is a mistake worth stopping for; a glob (`*`) that
    # matches one simply leaves it out.
    for pattern in patterns:
        flag = options.needs(pattern)
        if flag:
            typer.echo(f"error: {pattern} runs only on an executor started with {flag}", err=True)
            raise typer.Exit(2)
    specs = [s for s in specs if not options.needs(s.type)]
    if not specs:
        typer.echo(f"error: every task type matching {types!r} needs a flag to be enabled", err=True)
        raise typer.Exit(2)
    try:
        run_service(
            "executor",
            lambda stop: ExecutorRuntime(settings, specs, options=options, concurrency=concurrency).run(stop),
        )
    except PluginStartError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def config(
    defaults: Annotated[
        bool, typer.Option("--defaults", help="Print each setting's default and meaning (markdown) instead")
    ] = False,
) -> None:
    """Print every setting and the value in effect here (secrets masked).

    Values come from DAGSMITH_* variables, DAGSMITH_*_FILE files and .env; a * marks those that
    differ from the default. --defaults prints the documented table.
    """
    if defaults:
        typer.echo(settings_table())
        return
    from rich.table import Column, Table

    from dagsmith.cli.client_cmds import out

    settings = get_settings()  # invalid settings: the CLI's entry point says which, and exits 2
    table = Table("VARIABLE", Column("VALUE", overflow="fold"), "", box=None)
    for env, value, changed in [*effective(settings), *_client_settings()]:
        table.add_row(env, value, "*" if changed else "")
    out.print(table, highlight=False)


def _client_settings() -> list[tuple[str, str, bool]]:
    """The client commands' own settings (DAGSMITH_API, DAGSMITH_TOKEN) as :func:`effective`
    gives the services': the ones a wrong address or token comes from. The token is masked."""
    from dagsmith.settings import ClientSettings

    client = ClientSettings()
    rows = []
    for name, info in ClientSettings.model_fields.items():
        value = getattr(client, name)
        shown = masked(value.get_secret_value()) if isinstance(value, SecretStr) else str(value)
        rows.append((f"DAGSMITH_{name.upper()}", shown, value != info.get_default(call_default_factory=True)))
    return rows


def dev(
    executors: Annotated[int, typer.Option(help="Executor processes")] = 1,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="API port")] = None,
    module: Annotated[
        list[str] | None,
        typer.Option("--module", "-m", help="Executors also import this module for its task types (repeatable)"),
    ] = None,
) -> None:
    """Run the whole system locally.

    Migrations first, then the API, controller, evaluator and executors, their logs interleaved.
    Postgres and RabbitMQ are DAGSMITH_DATABASE_URL and DAGSMITH_AMQP_URL (`dagsmith config`
    shows the values in effect); /metrics ports count up from DAGSMITH_METRICS_PORT (9101 when
    unset; -1: none).
    """
    settings = get_settings()
    typer.secho(
        "dagsmith dev: local development mode. THE API RUNS WITHOUT AUTHENTICATION: anyone who can reach "
        f"127.0.0.1:{port or settings.api_port} on this machine can submit and read workflows.",
        fg="yellow",
        bold=True,
        err=True,
    )
    api_port = port or settings.api_port
    with socket.socket() as probe:  # said now, not after every service has started and the API died
        try:
            probe.bind(("127.0.0.1", api_port))
        except OSError as exc:
            typer.echo(f"error: cannot serve the API on 127.0.0.1:{api_port}: {exc.strerror} (try --port)", err=True)
            raise typer.Exit(2) from None
    migrate_cmd = [sys.executable, "-m", "dagsmith", "migrate"]
    if subprocess.call(migrate_cmd) != 0:
        raise typer.Exit(3)
    env = {
        **os.environ,
        # The children's output comes through this process: colours only if it goes to a terminal.
        "DAGSMITH_LOG_FORMAT": os.environ.get("DAGSMITH_LOG_FORMAT", "console" if sys.stdout.isatty() else "json"),
        "DAGSMITH_AUTH": "false",
        "DAGSMITH_METRICS_HOST": "127.0.0.1",  # like the API: nothing beyond this machine
    }

    def metrics(offset: int) -> dict[str, str]:
        """Each service its own metrics port, counting up from DAGSMITH_METRICS_PORT (9101 when
        unset; negative: none at all)."""
        if settings.metrics_port < 0:
            return {"DAGSMITH_METRICS_PORT": "-1"}
        return {"DAGSMITH_METRICS_PORT": str((settings.metrics_port or 9101) + offset)}

    procs: list[tuple[str, list[str], dict[str, str]]] = [
        # Loopback only, whatever DAGSMITH_API_HOST says (the image sets 0.0.0.0): without
        # authentication, nothing beyond this machine may reach it.
        ("api", ["api", "--host", "127.0.0.1", "--port", str(api_port)], {}),
        ("controller", ["controller"], metrics(0)),
        ("evaluator", ["evaluator"], metrics(1)),
    ]
    for i in range(executors):
        modules = [arg for m in module or [] for arg in ("--module", m)]
        procs.append((f"executor-{i + 1}", ["executor", *modules], metrics(2 + i)))
    children: list[subprocess.Popen[bytes]] = []
    colors = ["cyan", "magenta", "green", "yellow", "blue"]
    for i, (label, args, extra) in enumerate(procs):
        child = subprocess.Popen(
            [sys.executable, "-m", "dagsmith", *args],
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        children.append(child)
        prefix = f"{label:>12} │ "
        if sys.stdout.isatty():  # colours for a person; a file or a pipe gets plain text
            prefix = typer.style(prefix, fg=colors[i % len(colors)])
        threading.Thread(target=_pump, args=(child, prefix), daemon=True).start()
    typer.echo(f"API on http://127.0.0.1:{api_port}  (Ctrl-C stops everything)", err=True)
    if api_port != 8000:  # the client commands' default
        typer.echo(f"client commands in another shell: export DAGSMITH_API=http://127.0.0.1:{api_port}", err=True)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
    failed = [label for (label, _, _), c in zip(procs, children, strict=True) if c.returncode not in (0, -15, None)]
    if failed:
        typer.echo(f"stopped; these exited with errors: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _pump(child: subprocess.Popen[bytes], prefix: str) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


def register(app: typer.Typer) -> None:
    for fn in (migrate, api, controller, executor, evaluator, dev, config):
        app.command(rich_help_panel="Services")(fn)
