"""`dagsmith trainer`: a bad --params, --records or --policy file is one line naming it, exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dagsmith.cli import app

pytest.importorskip("torch")


def run_trainer(*args: str) -> Any:
    return CliRunner().invoke(app, ["trainer", *args])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{bad", "not JSON: Expecting property name enclosed in double quotes: line 1 column 2"),
        ('{"mix_typo": {}}', "unknown key mix_typo (known: mix, "),
        ("[1, 2]", "must be a JSON object of simulator parameters, not an array"),
        ('{"mix": {"transient": 1}}', "mix needs exactly the modes"),
    ],
)
def test_a_bad_params_file(tmp_path: Path, content: str, message: str) -> None:
    params = tmp_path / "params.json"
    params.write_text(content)
    for command in ("train", "evaluate"):
        done = run_trainer(command, "--params", str(params))
        assert done.exit_code == 2, done.output
        assert f"error: --params {params}: {message}" in done.output
        assert "Traceback" not in done.output


def record(**changes: Any) -> str:
    from controller.correction.features import FailureContext

    base = {"features": FailureContext(error_class="transient", task_type="echo").to_dict(), "action": "retry_now"}
    return json.dumps({**base, **changes})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{oops", "not JSON: Expecting property name enclosed in double quotes (column 2)"),
        ("[]", "a record is a JSON object, not an array"),
        ('{"action": "retry_now"}', "the record has no 'features'"),
        (record(action="pray"), "'action' 'pray' is not one of retry_now, "),
        (record(features={"colour": "red"}), "'features': unknown failure-context fields: ['colour']"),
        (record(task_seconds="long"), "'task_seconds' is a number, not a string"),
    ],
)
def test_a_bad_record_is_named_by_its_line_in_the_file(tmp_path: Path, bad: str, message: str) -> None:
    records = tmp_path / "records.jsonl"
    # Blank lines and a form feed inside a line: the number is still the file's line, as an editor shows it.
    records.write_text(record() + "\n\n" + record(note="a\x0cb") + "\n" + bad + "\n" + record() + "\n")
    done = run_trainer("evaluate", "--records", str(records), "--episodes", "10")
    assert done.exit_code == 2, done.output
    assert f"error: --records {records} line 4: {message}" in done.output, done.output


def test_a_file_that_is_not_a_checkpoint_is_refused_before_the_costly_tuning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.baselines

    def tuning(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the policy must be checked before the baselines are tuned")

    monkeypatch.setattr(trainer.baselines, "tune_table", tuning)
    import io

    import torch

    saved = io.BytesIO()
    torch.save({"weights": [1.0]}, saved)  # loads, but holds no policy
    for content in (b"hello\n", b'{"state_dict": {}}', saved.getvalue()):
        policy = tmp_path / "policy.pt"
        policy.write_bytes(content)
        done = run_trainer("evaluate", "--policy", str(policy))
        assert done.exit_code == 2, done.output
        assert f"error: --policy {policy} is not a policy checkpoint: " in done.output
        assert "weights_only" not in done.output  # torch's advice to load it unsafely is cut


@pytest.mark.parametrize("command", ["train", "benchmark", "serve"])
def test_timesteps_is_at_least_one(command: str) -> None:
    done = run_trainer(command, "--timesteps", "0")
    assert done.exit_code == 2 and "--timesteps" in done.output, done.output
