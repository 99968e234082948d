"""``dagsmith policy list|activate|rollback``: the correction-policy registry (admin token)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dagsmith.cli.client_cmds import ApiOption, TokenOption, ask, console, out

app = typer.Typer(help="List, activate and roll back correction-policy versions.", no_args_is_help=True)


@app.command("list")
def list_(api: ApiOption = None, token: TokenOption = None) -> None:
    """Policy versions with their gate results."""
    items = ask(api, token, lambda client: client.policies())
    if not items:
        console.print(
            "no policy versions yet: the rules decide (train one with `dagsmith trainer train`)", highlight=False
        )
        return
    table = Table("VERSION", "STATUS", "GATE", "RECORDS", "CREATED", "WHY")
    for p in items:
        gate = (p["evaluation"] or {}).get("gate", {})
        table.add_row(
            p["version"],
            p["status"],
            "passed" if gate.get("passed") else "failed",
            str((p["training"] or {}).get("records", "")),
            str(p["created_at"])[:19],
            escape(str(gate.get("reason", ""))[:70]),
        )
    out.print(table)


@app.command()
def activate(
    version: Annotated[str, typer.Argument(help="The version to make active")],
    force: Annotated[bool, typer.Option("--force", help="Even if its gate failed")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Make a version active.

    Controllers switch to it within moments, without a restart.
    """
    ask(api, token, lambda client: client.activate_policy(version, force))
    console.print(f"{version} is the active policy", highlight=False)


@app.command()
def rollback(api: ApiOption = None, token: TokenOption = None) -> None:
    """Undo the latest activation.

    The version active before it (or, with none, the rules) decides again; repeat to go further back.
    """
    previous = ask(api, token, lambda client: client.rollback_policy())
    console.print(f"active policy: {previous['version'] if previous else 'none (the rules decide)'}", highlight=False)
