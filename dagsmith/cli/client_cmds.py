"""Client commands: submit, status, result, dag, cancel, list, tasks, executors."""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from controller.states import TaskStatus, WorkflowStatus
from dagsmith.client import Backoff, Client, ClientError, WaitTimeout
from dagsmith.durations import parse_duration

# Messages on stderr are never wrapped: an error is one line, whatever the terminal (or none).
console = Console(stderr=True, soft_wrap=True)
# Output piped to a file or another program keeps whole rows: rich would fit tables to 80 columns
# and cut IDs and names short. A terminal's width (or COLUMNS) applies when there is one.
PIPED_WIDTH = 400
out = Console() if sys.stdout.isatty() or "COLUMNS" in os.environ else Console(width=PIPED_WIDTH)

ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        # Not in [brackets]: the help is rich markup, which would drop them as a tag.
        help="API base URL (default: DAGSMITH_API from the environment or .env, else http://127.0.0.1:8000)",
    ),
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="API token (default: DAGSMITH_TOKEN from the environment or .env)")
]


def connect(api: str | None, token: str | None) -> Client:
    """A client for the API named by the options, else by DAGSMITH_API / DAGSMITH_TOKEN."""
    from dagsmith.settings import ClientSettings

    defaults = ClientSettings()
    fallback_token = defaults.token.get_secret_value() if defaults.token else None
    return Client(api or defaults.api, token=token or fallback_token)


T = TypeVar("T")


def ask(api: str | None, token: str | None, call: Callable[[Client], T], flags: Mapping[str, str] | None = None) -> T:
    """One request to the API: its answer, or the error as one line and its exit code.

    ``flags`` names the command's option for each field of the request body, so a refused value
    is reported as the option the user typed (``--name``), not as the API's field (``body.name``)."""
    with connect(api, token) as client:
        try:
            return call(client)
        except ClientError as exc:
            handle(exc, flags)


TERMINAL = ("succeeded", "failed", "cancelled")
ERROR_WIDTH = 100  # characters of a task's error in a table (--json shows it all)
TimeoutOption = Annotated[
    str | None,
    typer.Option(
        "--timeout", help="Stop waiting after this long, e.g. 10m (exit 7; the workflow goes on)", show_default=False
    ),
]


def _deadline(timeout: str | None) -> float | None:
    """--timeout as a ``time.monotonic()`` deadline; checked before anything is submitted."""
    if timeout is None:
        return None
    try:
        return time.monotonic() + parse_duration(timeout)
    except ValueError as exc:
        fail(f"--timeout: {exc}", 2)


def _gave_up(wid: str, timeout: str | None) -> NoReturn:
    fail(f"workflow {wid} did not finish within {timeout}; it goes on (dagsmith watch {wid} follows it)", 7)


def waiting(deadline: float | None) -> Backoff:
    """Retries for a command that waits on a workflow: an API that restarts, or a proxy's
    502/503/504 meanwhile, is waited out (said once per outage) until --timeout, as kubectl wait
    does, instead of ending the wait with "cannot reach the API"."""

    def notify(exc: ClientError) -> None:
        console.print(f"[yellow]API unreachable, retrying…[/yellow] ({escape(exc.message)})", highlight=False)

    return Backoff(deadline, notify=notify)


def fail(message: str, code: int) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


WORKFLOW_STATUSES = tuple(s.value for s in WorkflowStatus)
TASK_STATUSES = tuple(s.value for s in TaskStatus)


def check_choice(value: str | None, allowed: tuple[str, ...], flag: str) -> None:
    """Refuse a value the API would refuse, naming the option (the API can only name its query)."""
    if value is None or value in allowed:
        return
    close = difflib.get_close_matches(value, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    fail(f"{flag} {value!r} is not one of {', '.join(allowed)}{hint}", 2)


def handle(exc: ClientError, flags: Mapping[str, str] | None = None) -> NoReturn:
    if exc.status == 422 and exc.details.get("problems"):
        problems = exc.details["problems"]
        if flags:
            problems = [{**p, "path": _as_flag(p.get("path") or "", flags)} for p in problems]
        if len(problems) == 1 and flags:
            where = f"{problems[0]['path']}: " if problems[0]["path"] else ""
            console.print(f"[red]error:[/red] {escape(where + problems[0]['message'])}", highlight=False)
        elif len(problems) == 1:
            console.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False)
        else:  # the message names the first; list them all instead, in document order, under its head
            console.print(f"[red]error:[/red] {escape(exc.message.split(': ', 1)[0])}:", highlight=False)
            for p in sorted(problems, key=lambda p: _natural(p.get("path") or "")):
                where = escape(p.get("path") or "(document)")
                console.print(f"  [bold]{where}[/bold]: {escape(p['message'])}", highlight=False)
        raise typer.Exit(2)
    code = {0: 3, 404: 4, 422: 2, 413: 2, 415: 2, 401: 5, 403: 5, 409: 6}.get(exc.status, 3)
    # The API speaks of headers; on the command line a token comes from a flag or the environment.
    hint = " — give one with --token or DAGSMITH_TOKEN" if exc.status == 401 else ""
    message = _as_flags(exc.message)
    field, sep, rest = message.partition(": ")
    if flags and sep and field in flags:  # "delay: invalid duration ..." from a check after parsing
        message = f"{flags[field]}: {rest}"
    fail(message + hint, code)


# The API names its query parameters; on the command line they are flags.
_FLAG_SPELLINGS = (("activate it anyway with force", "activate it anyway with --force"),)


def _as_flags(message: str) -> str:
    for api_words, cli_words in _FLAG_SPELLINGS:
        message = message.replace(api_words, cli_words)
    return message


def _as_flag(path: str, flags: Mapping[str, str]) -> str:
    """``body.params.x`` as ``--params (x)``; the body as a whole as nothing (the message says
    what is wrong with it); a path outside the named fields stays as it is."""
    field, _, rest = path.removeprefix("body").removeprefix(".").partition(".")
    if not field:
        return ""
    if field not in flags:
        return path
    return f"{flags[field]} ({rest})" if rest else flags[field]


def _natural(path: str) -> list[Any]:
    """A sort key that puts tasks[2] before tasks[10]."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path)]


def print_json(value: Any, *, plain: bool = False) -> None:
    """``value`` as indented JSON on stdout: coloured for a person at a terminal, else (and with
    ``plain``, for --json) written straight as orjson makes it. The same text either way, but
    rich's highlighting takes seconds per megabyte (25 s for a 3 MB result)."""
    if plain or not out.is_terminal:
        write_bytes(orjson.dumps(value, default=str, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        out.print_json(orjson.dumps(value, default=str).decode())


def write_bytes(data: bytes) -> None:
    """UTF-8 bytes to stdout as they are, after what went through its text layer before."""
    sys.stdout.flush()
    binary = getattr(sys.stdout, "buffer", None)
    if binary is None:  # a text-only stream put in its place (by a caller embedding the CLI)
        sys.stdout.write(data.decode())
        return
    binary.write(data)
    binary.flush()


def short(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, the cut marked."""
    return text if len(text) <= width else text[: width - 1] + "…"


def submit(
    file: Annotated[Path, typer.Argument(help="Workflow file (YAML or JSON); '-' reads stdin", allow_dash=True)],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it finishes; print the result")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Show live progress until it finishes")] = False,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key", help="Same key → same workflow")] = None,
    timeout: TimeoutOption = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Submit a workflow; print its id.

    A YAML file may hold several workflows (documents separated by ---): each is submitted, in order.

    With --wait or --watch, print the result once it finishes (exit 1 unless it succeeded).
    """
    if timeout is not None and not (wait or watch):
        fail("--timeout goes with --wait or --watch", 2)
    deadline = _deadline(timeout)
    try:
        body = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}", 2)
    content_type = "application/json" if str(file).endswith(".json") else "application/yaml"
    documents: list[bytes] = [body]
    if content_type == "application/yaml":
        from dagsmith.validation import split_documents  # here: the other commands start faster without it

        parts = split_documents(body.decode("utf-8", errors="replace"))
        if len(parts) > 1:  # one document goes as it was read, byte for byte
            documents = [part.encode() for part in parts]
    if idempotency_key and len(documents) > 1:
        fail(f"--idempotency-key names one workflow, and {file} holds {len(documents)}", 2)
    ids: list[str] = []
    with connect(api, token) as client:
        for n, document in enumerate(documents, 1):
            try:
                submitted = client.submit(document, content_type=content_type, idempotency_key=idempotency_key)
            except ClientError as exc:
                if len(documents) > 1:
                    before = f" ({n - 1} before it submitted: {', '.join(ids)})" if ids else ""
                    console.print(f"in document {n} of {len(documents)}{before}:", highlight=False)
                handle(exc)
            for warning in submitted.get("warnings", []):
                console.print(
                    f"[yellow]warning:[/yellow] {escape(warning['path'])}: {escape(warning['message'])}",
                    highlight=False,
                )
            ids.append(submitted["id"])
            verb = "submitted" if submitted.get("created", True) else "already submitted"
            console.print(f"{verb} workflow [bold]{submitted['name']}[/bold] {submitted['id']}", highlight=False)
        if not (wait or watch):
            for wid in ids:
                out.print(wid)
            return
        finals = []
        retry = waiting(deadline)
        for wid in ids:
            try:
                finals.append(_watch(client, wid, retry) if watch else _wait(client, wid, retry))
                _print_result(client, wid, retry)
            except ClientError as exc:  # the token was revoked, or the workflow deleted, while waiting
                handle(exc)
            except WaitTimeout:
                _gave_up(wid, timeout)
        if any(status != "succeeded" for status in finals):
            raise typer.Exit(1)


def _wait(client: Client, wid: str, retry: Backoff) -> str:
    """The workflow's final status. Raises WaitTimeout past the deadline of ``retry``, which
    also waits out the API's absences."""
    deadline = retry.deadline
    try:
        for event, data in client.events(wid, deadline=deadline, retry=retry):
            if event == "end":
                return str(data["status"])
    except ClientError as exc:
        if exc.status in (401, 403):
            raise  # not allowed any more: polling would not be either
        # no stream to be had (too many streams): fall back to polling
    delay = 0.2
    while True:
        status = str(retry.call(lambda: client.workflow(wid))["status"])
        if status in TERMINAL:
            return status
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout
            delay = min(delay, left)
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


# One reading of a workflow's progress for every command: "done" is succeeded or skipped (what
# the workflow's output can use); every other state is named with its count, queued apart from
# running (a task nobody takes stays queued).
def _done(p: dict[str, int]) -> int:
    return p["succeeded"] + p["skipped"]


def _states(p: dict[str, int]) -> list[str]:
    return [f"{p[state]} {state}" for state in ("running", "queued", "pending", "failed", "cancelled") if p.get(state)]


def _watch(client: Client, wid: str, retry: Backoff) -> str:
    wf = retry.call(lambda: client.workflow(wid))
    total = wf["progress"]["total"]
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    # Without a terminal (CI logs, a pipe) a live bar would show only at the end: print a line
    # each time the counts change instead.
    live = console.is_terminal
    shown = ""
    with Progress(*columns, console=console, transient=False, disable=not live) as progress:
        bar = progress.add_task(wf["name"], total=total, detail="")
        last = 0.0
        status = wf["status"]

        warned: set[str] = set()

        def refresh() -> str:
            nonlocal shown
            w = retry.call(lambda: client.workflow(wid))
            for task_type in w.get("waiting_for", []):
                if task_type not in warned:  # once per type: it is news, not progress
                    warned.add(task_type)
                    message = f"no live executor runs task type {task_type!r}; its tasks wait in the queue"
                    progress.console.print(f"[yellow]…[/yellow] {escape(message)}", highlight=False)
            p = w["progress"]
            detail = " · ".join([*_states(p), f"reward {w['total_reward']:.2f}"])
            progress.update(bar, completed=_done(p), total=p["total"], detail=detail)
            line = f"{w['name']}: {_done(p)}/{p['total']} done · {detail}"
            if not live and line != shown:
                console.print(line, highlight=False)
                shown = line
            return str(w["status"])

        try:
            for event, data in client.events(wid, deadline=retry.deadline, retry=retry):
                if event == "transition" and data["to"] in ("failed",) and data.get("task"):
                    err = (data.get("data") or {}).get("error") or {}
                    where = f"{data['task']} (attempt {data['attempt']})"
                    progress.console.print(
                        f"[red]✗[/red] {where}: {err.get('class')}: {escape(str(err.get('message')))}", highlight=False
                    )
                if event == "transition" and data["to"] == "pending" and data.get("task") and data.get("reason"):
                    reason = escape(str(data["reason"]))
                    progress.console.print(f"[yellow]↻[/yellow] {data['task']}: {reason}", highlight=False)
                if time.monotonic() - last > 0.25 or event == "end":
                    status = refresh()
                    last = time.monotonic()
                if event == "end":
                    break
        except ClientError as exc:
            if exc.status in (401, 403):
                raise
            status = _wait(client, wid, retry)
        return refresh() if status not in TERMINAL else status


def _print_result(client: Client, wid: str, retry: Backoff) -> None:
    try:
        result = retry.call(lambda: client.result(wid))
    except ClientError as exc:
        handle(exc)
    except WaitTimeout:  # it finished, but the API went away before its result could be read
        fail(f"cannot read the result of workflow {wid} before the timeout; dagsmith result {wid} prints it", 3)
    color = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(result["status"], "white")
    console.print(f"[{color}]{result['status']}[/{color}] · reward {result['total_reward']:.3f}", highlight=False)
    if result.get("error"):
        console.print(f"[red]{escape(str(result['error'].get('message')))}[/red]", highlight=False)
    if result.get("output") is not None or result["status"] == "succeeded":
        print_json(result.get("output"))


def status(
    workflow_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Show a workflow's status, progress and reward."""
    wf = ask(api, token, lambda client: client.workflow(workflow_id))
    if as_json:
        print_json(wf, plain=True)
        return
    p = wf["progress"]
    table = Table(show_header=False, box=None)
    table.add_row("workflow", f"{wf['name']} ({wf['id']})")
    table.add_row("namespace", wf["namespace"])
    table.add_row("status", wf["status"])
    table.add_row(
        "progress",
        " · ".join([f"{_done(p)}/{p['total']} done", *_states(p)]),
    )
    table.add_row("reward", f"{wf['total_reward']:.3f}")
    table.add_row("created", str(wf["created_at"]))
    if wf.get("finished_at"):
        table.add_row("finished", str(wf["finished_at"]))
    if wf.get("error"):
        table.add_row("error", escape(wf["error"].get("message", "")))
    for task_type in wf.get("waiting_for", []):
        table.add_row(
            "waiting", escape(f"no live executor runs task type {task_type!r}; its tasks stay queued until one does")
        )
    out.print(table)


def watch(workflow_id: str, timeout: TimeoutOption = None, api: ApiOption = None, token: TokenOption = None) -> None:
    """Follow a workflow live, then print its result.

    Shows progress until it finishes; exits 1 unless it succeeded.
    """
    retry = waiting(_deadline(timeout))
    with connect(api, token) as client:
        try:
            final = _watch(client, workflow_id, retry)
            _print_result(client, workflow_id, retry)
        except ClientError as exc:
            handle(exc)
        except WaitTimeout:
            _gave_up(workflow_id, timeout)
    if final != "succeeded":
        raise typer.Exit(1)


def events(
    workflow_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the workflow finishes")] = False,
    after: Annotated[int, typer.Option(help="Only events after this event id (it is printed first)", min=0)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
    timeout: TimeoutOption = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Print a workflow's task transitions: when, which task and attempt, from and to, and why."""
    if timeout is not None and not follow:
        fail("--timeout goes with --follow", 2)
    deadline = _deadline(timeout)
    # Following waits out an API that is away; the history alone is one request, as `status` is.
    retry = waiting(deadline) if follow else None
    with connect(api, token) as client:
        try:
            for event, data in client.events(workflow_id, after=after, deadline=deadline, follow=follow, retry=retry):
                if event != "transition":
                    continue
                if as_json:
                    write_bytes(orjson.dumps(data) + b"\n")
                    continue
                who = f"{data['task']} #{data['attempt']}" if data.get("task") else "workflow"
                why = f"  {data['reason']}" if data.get("reason") else ""
                out.print(
                    f"{data['id']:>8}  {_when(data['at'])}  {who}  {data.get('from') or '-'} → {data['to']}{why}",
                    highlight=False,
                    markup=False,
                    soft_wrap=True,
                )
        except ClientError as exc:
            handle(exc)
        except WaitTimeout:
            _gave_up(workflow_id, timeout)


def _when(at: str) -> str:
    """An event's time to the millisecond, in UTC as the API gives it."""
    return datetime.fromisoformat(at).strftime("%Y-%m-%d %H:%M:%S.%f")[:23]


def result(workflow_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """Print a finished workflow's output (exit 1 if it failed)."""
    res = ask(api, token, lambda client: client.result(workflow_id))
    if res["status"] != "succeeded":
        message = escape((res.get("error") or {}).get("message", ""))
        console.print(f"[red]{res['status']}[/red]: {message}", highlight=False)
        raise typer.Exit(1)
    print_json(res["output"])


def dag(
    workflow_id: str,
    fmt: Annotated[str, typer.Option("--format", "-f", help="json, mermaid or dot")] = "mermaid",
    revision: Annotated[int | None, typer.Option("--revision", help="Show a past revision")] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Print a workflow's DAG with each task's status."""
    if fmt not in ("json", "mermaid", "dot"):
        fail("--format must be json, mermaid or dot", 2)
    graph = ask(api, token, lambda client: client.dag(workflow_id, fmt, revision))
    if fmt == "json":
        print_json(graph, plain=True)
    else:
        sys.stdout.write(graph)


def cancel(workflow_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """Cancel a workflow."""
    ask(api, token, lambda client: client.cancel(workflow_id))
    console.print(f"cancelling {workflow_id}", highlight=False)


def delete(workflow_id: str, api: ApiOption = None, token: TokenOption = None) -> None:
    """Delete a finished workflow with its tasks, events and revisions (cancel a running one first)."""
    ask(api, token, lambda client: client.delete(workflow_id))
    console.print(f"deleted {workflow_id}", highlight=False)


def list_(
    status_: Annotated[str | None, typer.Option("--status", help="Only this status")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Only workflows with this name")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="Only this namespace")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="key=value")] = None,
    limit: Annotated[int, typer.Option(help="How many", min=1, max=500)] = 20,
    cursor: Annotated[str | None, typer.Option(help="Where the previous page ended (it prints this)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List recent workflows, newest first."""
    check_choice(status_, WORKFLOW_STATUSES, "--status")
    for item in label or []:
        if "=" not in item:
            fail(f"--label {item!r}: write it as key=value", 2)
    with connect(api, token) as client:
        try:
            page = client.workflows(
                status=status_, name=name, namespace=namespace, label=label or None, limit=limit, cursor=cursor
            )
        except ClientError as exc:
            handle(exc)
    if as_json:
        print_json(page, plain=True)
        return
    if not page["items"]:
        console.print("no workflows" + (" match" if status_ or name or namespace or label else ""), highlight=False)
        return
    # Ids are what the other commands take: never shortened, whatever the width.
    table = Table(
        Column("ID", no_wrap=True, min_width=36), "NAME", "NAMESPACE", "STATUS", "PROGRESS", "REWARD", "CREATED"
    )
    for wf in page["items"]:
        p = wf["progress"]
        table.add_row(
            wf["id"],
            wf["name"],
            wf["namespace"],
            wf["status"],
            f"{_done(p)}/{p['total']}",
            f"{wf['total_reward']:.2f}",
            str(wf["created_at"])[:19],
        )
    out.print(table)
    if page.get("next_cursor"):
        # The whole command: a cursor alone, without the filters, would page through everything.
        again = ["dagsmith", "list"]
        for flag, value in (("--status", status_), ("--name", name), ("-n", namespace)):
            if value:
                again += [flag, value]
        for item in label or []:
            again += ["-l", item]
        if limit != 20:
            again += ["--limit", str(limit)]
        if api:  # the next page is on the same API (a token is never printed: it is a secret)
            again += ["--api", api]
        again += ["--cursor", page["next_cursor"]]
        console.print(f"more: {shlex.join(again)}", highlight=False, markup=False)


def tasks(
    workflow_id: str,
    status_: Annotated[str | None, typer.Option("--status", help="Only this status")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every task as JSON (errors in full)")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List a workflow's tasks (all of them, page after page)."""
    check_choice(status_, TASK_STATUSES, "--status")
    items: list[dict[str, Any]] = []
    after: int | None = None
    with connect(api, token) as client:
        try:
            while True:
                page = client.tasks(
                    workflow_id,
                    **({"status": status_} if status_ else {}),
                    **({"after": after} if after is not None else {}),
                )
                items += page["items"]
                after = page.get("next_after")
                if after is None:
                    break
        except ClientError as exc:
            handle(exc)
    if as_json:
        print_json({"items": items}, plain=True)
        return
    table = Table("NAME", "TYPE", "STATUS", "ATTEMPT", "REWARD", "ERROR")
    shortened = False
    for t in items:
        err = t.get("error") or {}
        text = f"{err.get('class')}: {err.get('message', '')}" if err else ""
        if text and t["status"] in ("pending", "queued", "running"):
            text = f"(an earlier attempt) {text}"  # the task is not finished: its error is from before
        if len(text) > ERROR_WIDTH:
            text, shortened = short(text, ERROR_WIDTH), True
        table.add_row(
            t["name"],
            t["type"],
            t["status"],
            str(t["attempt"]),
            "" if t["reward"] is None else f"{t['reward']:.2f}",
            escape(text),
        )
    out.print(table)
    if shortened:
        console.print("errors are shortened: --json shows them in full", highlight=False)


def executors(
    show_all: Annotated[bool, typer.Option("--all", help="Also executors that stopped more than an hour ago")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """List registered executors, their task types and liveness (live ones first)."""
    items = ask(api, token, lambda client: client.executors())
    if not show_all:
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        items = [e for e in items if e["alive"] or datetime.fromisoformat(e["last_heartbeat"]) > hour_ago]
    if as_json:
        print_json(items, plain=True)
        return
    if not items:
        console.print("no executors" + ("" if show_all else " heard from in the last hour (--all shows all)"))
        return
    table = Table("ID", "ALIVE", "RUNNING", "TYPES")
    for e in items:
        table.add_row(
            e["id"],
            "yes" if e["alive"] else "no",
            f"{e['running']}/{e['concurrency']}",
            ", ".join(e["types"]),
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    for fn in (submit, watch, status, events, result, dag, cancel, delete, tasks, executors):
        app.command(rich_help_panel="Client")(fn)
    app.command("list", rich_help_panel="Client")(list_)
