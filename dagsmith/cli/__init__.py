"""The ``dagsmith`` command: run the services, and talk to the API.

Exit codes: 0 success; 1 the workflow failed or was cancelled; 2 bad input (invalid spec,
bad arguments); 3 the API could not be reached or answered with an error; 4 not found;
5 not allowed (no token, wrong token, missing scope).
"""

from __future__ import annotations

from typing import Any

import typer

from dagsmith.cli import (
    client_cmds,
    operator_cmds,
    policy_cmds,
    prune_cmds,
    services,
    surgery_cmds,
    token_cmds,
    trainer_cmds,
)

app = typer.Typer(
    name="dagsmith",
    help="Dagsmith: a workflow engine that keeps DAGs in Postgres, runs them over RabbitMQ, and learns to recover.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
services.register(app)
client_cmds.register(app)
operator_cmds.register(app)
token_cmds.register(app)
surgery_cmds.register(app)
prune_cmds.register(app)
app.add_typer(trainer_cmds.app, name="trainer", rich_help_panel="Learning")
app.add_typer(policy_cmds.app, name="policy", rich_help_panel="Learning")


def main() -> None:
    from pydantic import ValidationError

    try:
        app()
    except ValidationError as exc:
        if exc.title not in ("Settings", "ClientSettings"):
            raise
        # Settings are read by whichever command needs them: one place says what is wrong.
        problems = "; ".join(
            f"DAGSMITH_{'_'.join(str(p) for p in e['loc']).upper()}: {_msg(e)}" if e["loc"] else _msg(e)
            for e in exc.errors()
        )
        typer.echo(f"error: the settings are not valid: {problems}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()


def _msg(error: Any) -> str:
    return str(error["msg"]).removeprefix("Value error, ")
