"""``dagsmith tokens create|list|revoke`` (needs an admin token)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from dagsmith.cli.client_cmds import ApiOption, TokenOption, ask, console, out

app = typer.Typer(help="Create, list and revoke API tokens (with an admin token).", no_args_is_help=True)


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="A unique name, e.g. ci-bot")],
    scope: Annotated[
        list[str] | None, typer.Option("--scope", "-s", help="read, write or admin (default: read)")
    ] = None,
    namespace: Annotated[
        list[str] | None, typer.Option("--namespace", "-n", help="Namespace it sees ('*': all; default: default)")
    ] = None,
    expires_in: Annotated[str | None, typer.Option("--expires-in", help="e.g. 30d")] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Create a token and print it.

    It is shown once: only its hash is stored.
    """
    created = ask(
        api,
        token,
        lambda client: client.create_token(name, scope or ["read"], namespace or ["default"], expires_in),
        {"name": "the name argument", "scopes": "--scope", "namespaces": "--namespace", "expires_in": "--expires-in"},
    )
    console.print(
        f"created token [bold]{created['name']}[/bold] (scopes {', '.join(created['scopes'])}; "
        f"namespaces {', '.join(created['namespaces'])}). Store it now; it cannot be shown again.",
        highlight=False,
    )
    out.print(created["token"], highlight=False)


@app.command("list")
def list_(api: ApiOption = None, token: TokenOption = None) -> None:
    """List tokens (names, scopes, namespaces — never the secrets)."""
    items = ask(api, token, lambda client: client.tokens())
    if not items:
        console.print(
            "no tokens (the bootstrap DAGSMITH_ADMIN_TOKEN is never listed); create one with `dagsmith tokens create`",
            highlight=False,
        )
        return
    table = Table("NAME", "PREFIX", "SCOPES", "NAMESPACES", "CREATED", "LAST USED", "EXPIRES", "STATE")
    now = datetime.now(UTC)
    for t in items:
        expires = datetime.fromisoformat(t["expires_at"]) if t.get("expires_at") else None
        if t["revoked_at"]:
            state = "revoked"
        elif expires is not None and expires <= now:
            state = "expired"
        else:
            state = "live"
        table.add_row(
            t["name"],
            t["prefix"] + "…",
            ",".join(t["scopes"]),
            ",".join(t["namespaces"]),
            str(t["created_at"])[:19],
            str(t["last_used_at"] or "")[:19],
            str(t.get("expires_at") or "never")[:19],
            state,
        )
    out.print(table)


@app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="Token name or id")],
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Revoke a token; requests with it get 401 from now on."""
    ask(api, token, lambda client: client.revoke_token(name))
    console.print(f"revoked {name}", highlight=False)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="tokens", rich_help_panel="Client")
