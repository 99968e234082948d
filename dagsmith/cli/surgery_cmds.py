"""``dagsmith surgery`` and ``dagsmith history``: change a running (or failed) workflow's DAG."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from dagsmith.cli.client_cmds import ApiOption, TokenOption, ask, console, fail, out, print_json, short
from dagsmith.spec import SURGERY_OPTIONS

# The CLI's name for each option of a surgery request.
FLAGS = {
    "params": "--param/--params",
    "type": "--type",
    "name": "--name",
    "delay": "--delay",
    "reason": "--reason",
    "task": "the task argument",
    "op": "the operation argument",
}


def _params(pairs: list[str], raw: str | None) -> dict[str, Any] | None:
    params: dict[str, Any] = {}
    if raw:
        try:
            loaded = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            fail(f"--params is not JSON: {exc}", 2)
        if not isinstance(loaded, dict):
            fail("--params must be a JSON object", 2)
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        typed = key.endswith(":")
        key = key.removesuffix(":")
        if not sep or not key:
            fail(f"--param {pair!r} must look like key=value (text) or key:=value (JSON)", 2)
        if typed:  # key:=3, key:=true, key:='{"a": [1]}' (the convention of HTTPie)
            try:
                params[key] = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                fail(f"--param {key}:= takes a JSON value: {exc} (for text, write {key}=...)", 2)
        else:  # text, as written: templates, colons and brackets stay as they are
            params[key] = value
    return params or None


def surgery(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id")],
    operation: Annotated[str, typer.Argument(help="retry | replace | insert | skip")],
    task: Annotated[str, typer.Argument(help="The task to operate on")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="key=text or key:=JSON, e.g. seconds:=2 (repeatable)"),
    ] = None,
    params: Annotated[str | None, typer.Option("--params", help="params as a JSON object")] = None,
    task_type: Annotated[str | None, typer.Option("--type", "-t", help="replace: new type; insert: its type")] = None,
    name: Annotated[str | None, typer.Option("--name", help="insert: the new task's name")] = None,
    delay: Annotated[str | None, typer.Option("--delay", help="retry: wait first, e.g. 30s")] = None,
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the history)")] = "",
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Change a workflow's DAG.

    Examples:

    Re-run a step with edited inputs: dagsmith surgery ID retry shout --param text='try again'

    Run a task on another capability (--param adjusts its params): dagsmith surgery ID replace parse --type json.repair

    Add a repair step before a task: dagsmith surgery ID insert parse --type text.clean

    Skip an optional task: dagsmith surgery ID skip enrich
    """
    if operation not in SURGERY_OPTIONS:
        fail(f"operation must be one of {', '.join(SURGERY_OPTIONS)}", 2)
    given = {"params": param or params, "type": task_type, "name": name, "delay": delay}
    wrong = [FLAGS[option] for option, value in given.items() if value and option not in SURGERY_OPTIONS[operation]]
    if wrong:
        takes = ", ".join(FLAGS[o] for o in SURGERY_OPTIONS[operation])
        fail(f"{operation} does not take {', '.join(wrong)} ({f'it takes {takes}' if takes else 'only --reason'})", 2)
    if operation in ("replace", "insert") and not task_type:
        fail(f"{operation} needs --type: the type of the task to run", 2)
    body: dict[str, Any] = {"op": operation, "task": task, "reason": reason}
    merged = _params(param or [], params)
    if merged is not None:
        body["params"] = merged
    if task_type:
        body["type"] = task_type
    if name:
        body["name"] = name
    if delay:
        body["delay"] = delay
    done = ask(api, token, lambda client: client.surgery(workflow_id, body), FLAGS)
    # Said with the word typed: a replace is recorded as the surgery it is, a reroute.
    recorded = "" if done["operation"] == operation else f" (recorded as {done['operation']})"
    console.print(f"revision {done['revision']}: {operation} {done['task']}{recorded}", highlight=False)
    for change in done["diff"]:
        console.print(f"  {escape(_describe(change))}", highlight=False)
    for warning in done.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(str(warning))}", highlight=False)


def _describe(change: dict[str, Any]) -> str:
    if change["op"] == "set":
        return f"{change['task']}.{change['field']}: {_js(change['old'])} → {_js(change['new'])}"
    if change["op"] == "add":
        t = change["task"]
        return f"+ {t['name']} ({t['type']}) before {change.get('before')}"
    if change["op"] == "status":
        return f"{change['task']} → {change['to']}"
    return _js(change)


def _js(value: Any) -> str:
    """Values as JSON, as users write them in specs (not as Python would print them)."""
    return orjson.dumps(value, default=str).decode()


def history(
    workflow_id: Annotated[str, typer.Argument(help="Workflow id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the revisions as JSON (in full)")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show a workflow's DAG revisions.

    Every surgery: by whom, why and what changed.
    """
    items = ask(api, token, lambda client: client.revisions(workflow_id))
    if as_json:
        print_json(items)
        return
    if not items:
        console.print("no surgery yet: the DAG is as submitted (revision 0)")
        return
    table = Table("REV", "WHEN", "ACTOR", "OPERATION", "TASK", "WHY", "CHANGES")
    for r in items:
        why = r["reason"].get("message") or r["reason"].get("error_class") or ""
        table.add_row(
            str(r["revision"]),
            str(r["created_at"])[:19],
            r["actor"],
            r["operation"],
            r["task"],
            escape(short(str(why), 60)),
            escape(short("; ".join(_describe(c) for c in r["diff"]), 120)),
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command(rich_help_panel="Client")(surgery)
    app.command(rich_help_panel="Client")(history)
