"""The ``dagsmith`` command: run the services, and talk to the API.

Exit codes: 0 success; 1 the workflow failed or was cancelled; 2 bad input (invalid spec,
bad arguments); 3 the API could not be reached or answered with an error; 4 not found;
5 not allowed (no token, wrong token, missing scope).
"""

from __future__ import annotations

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
    app()


if __name__ == "__main__":
    main()
