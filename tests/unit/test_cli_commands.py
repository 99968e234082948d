"""The CLI's own behaviour, without services: JSON output, error wording, options, config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from dagsmith.cli import app, client_cmds, prune_cmds
from dagsmith.client import ClientError


def test_plain_json_is_what_rich_printed_without_rich(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--json output (and any piped output) skips rich, which took 25 s on 3 MB, and keeps its text:
    two-space indents, UTF-8 as is, empty containers as [] and {}."""

    def no_rich(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("rich must not render --json output")

    monkeypatch.setattr(client_cmds.out, "print_json", no_rich)
    value = {"name": "grüße", "items": [1, 2.5, None, True], "empty": {}, "none": [], "nested": {"a": {"b": "c"}}}
    client_cmds.print_json(value, plain=True)
    written = capsysbinary.readouterr().out.decode()
    assert written == json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    client_cmds.print_json({"big": "x" * 3_000_000})  # captured: not a terminal, so plain too
    assert len(capsysbinary.readouterr().out) > 3_000_000


def test_the_apis_word_for_an_option_becomes_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    refused = ClientError(409, "conflict", "policy v3 did not pass the gate (worse); activate it anyway with force")
    with pytest.raises(typer.Exit) as raised:
        client_cmds.handle(refused)
    assert raised.value.exit_code == 6
    assert "activate it anyway with --force" in capsys.readouterr().err


def test_an_empty_workflow_id_exits_2_naming_it() -> None:
    done = CliRunner().invoke(app, ["status", "", "--api", "http://127.0.0.1:9"])
    assert done.exit_code == 2, done.output
    assert "error: workflow id is empty" in done.output


@pytest.mark.parametrize("command", ["dev", "api"])
@pytest.mark.parametrize("port", ["99999", "0"])
def test_a_port_out_of_range_is_refused_by_name(command: str, port: str) -> None:
    done = CliRunner().invoke(app, [command, "--port", port])
    assert done.exit_code == 2, done.output
    assert "--port" in done.output and "Traceback" not in done.output


def test_config_lists_the_client_settings_with_the_token_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    env = {"DAGSMITH_API": "http://api.example:8000", "DAGSMITH_TOKEN": "dgs_s3cr3t_value"}
    done = CliRunner().invoke(app, ["config"], env=env)
    assert done.exit_code == 0, done.output
    rows = {line.split()[0]: line.split()[1:] for line in done.output.splitlines() if line.strip()}
    assert rows["DAGSMITH_API"] == ["http://api.example:8000", "*"]
    assert rows["DAGSMITH_TOKEN"] == ["***", "*"]
    assert "dgs_s3cr3t_value" not in done.output


def test_prune_interrupted_at_its_question_deletes_nothing_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C at "Delete them?" (click turns it into Abort) is not an answer: 130, nothing deleted.
    A plain "n" returns False: tests/e2e/test_cli.py answers it on a terminal."""

    def interrupted(*args: Any, **kwargs: Any) -> bool:
        raise typer.Abort

    monkeypatch.setattr(typer, "confirm", interrupted)
    with pytest.raises(typer.Exit) as raised:
        prune_cmds._confirmed()
    assert raised.value.exit_code == 130
    assert "nothing deleted" in capsys.readouterr().err
    monkeypatch.setattr(typer, "confirm", lambda *args, **kwargs: False)
    assert prune_cmds._confirmed() is False
