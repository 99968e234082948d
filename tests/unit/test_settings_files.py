"""DAGSMITH_<NAME>_FILE: secrets read from files (Docker and Kubernetes secrets)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from dagsmith.settings import Settings


def test_secrets_come_from_the_files_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DAGSMITH_ADMIN_TOKEN", "DAGSMITH_DATABASE_URL", "DAGSMITH_AMQP_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "token").write_text("dgs_from-a-file\n")
    (tmp_path / "db").write_text("postgresql+psycopg://u:p@db:5432/x")
    monkeypatch.setenv("DAGSMITH_ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    monkeypatch.setenv("DAGSMITH_DATABASE_URL_FILE", str(tmp_path / "db"))
    settings = Settings()
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "dgs_from-a-file"
    assert settings.database_url.get_secret_value() == "postgresql+psycopg://u:p@db:5432/x"
    monkeypatch.setenv("DAGSMITH_ADMIN_TOKEN", "dgs_from-the-env")  # a value set directly wins
    assert Settings().admin_token.get_secret_value() == "dgs_from-the-env"  # type: ignore[union-attr]


def test_a_missing_secret_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAGSMITH_AMQP_URL_FILE", str(tmp_path / "nope"))
    with pytest.raises(ValidationError, match=r"DAGSMITH_AMQP_URL_FILE=.*nope"):
        Settings()


def test_config_shows_values_in_effect_with_secrets_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    from dagsmith.settings import effective

    monkeypatch.setenv("DAGSMITH_AMQP_URL", "amqp://bob:hunter2@rabbit:5672/")
    monkeypatch.setenv("DAGSMITH_ADMIN_TOKEN", "dgs_secret")
    monkeypatch.setenv("DAGSMITH_API_PORT", "9999")
    rows = {env: (value, changed) for env, value, changed in effective(Settings())}
    assert rows["DAGSMITH_AMQP_URL"] == ("amqp://bob:***@rabbit:5672/", True)
    assert rows["DAGSMITH_ADMIN_TOKEN"] == ("***", True)
    assert rows["DAGSMITH_API_PORT"] == ("9999", True)
    assert rows["DAGSMITH_LEASE_TTL"][1] is False
    assert not any("hunter2" in value or "dgs_secret" in value for value, _ in rows.values())


@pytest.mark.parametrize(
    ("secret", "shown"),
    [
        ("postgresql+psycopg://app@db/dagsmith?password=s3cret", "postgresql+psycopg://app@db/dagsmith?password=***"),
        (
            "postgresql+psycopg://app:pw@db:5432/d?sslpassword=k",
            "postgresql+psycopg://app:***@db:5432/d?sslpassword=***",
        ),
        ("postgresql+psycopg://db/d?user=app@corp&password=s3cret", "postgresql+psycopg://db/d?user=***&password=***"),
        ("dgs_a-token", "***"),
        ("http://[::1:80", "***"),
    ],
)
def test_secrets_are_masked_wherever_they_sit_in_a_url(secret: str, shown: str) -> None:
    from dagsmith.settings import masked

    assert masked(secret) == shown


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"DAGSMITH_LOG_LEVEL": "verbose"}, "DAGSMITH_LOG_LEVEL: 'verbose' is not a log level"),
        ({"DAGSMITH_LOG_FORMAT": "yaml"}, "DAGSMITH_LOG_FORMAT: Input should be 'json', 'console' or 'auto'"),
        ({"DAGSMITH_EXECUTOR_CONCURRENCY": "0"}, "DAGSMITH_EXECUTOR_CONCURRENCY: Input should be greater than"),
        ({"DAGSMITH_RETENTION": "10m"}, "DAGSMITH_RETENTION: '10m' is shorter than the minimum of 1h"),
    ],
)
def test_a_service_with_invalid_settings_says_which_in_one_line_and_exits_2(env: dict[str, str], says: str) -> None:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
    done = subprocess.run(
        [sys.executable, "-m", "dagsmith", "executor", "--types", "noop"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: the settings are not valid: ")
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def optional_settings() -> list[str]:
    """The settings whose type allows None (unset)."""
    return [name for name, info in Settings.model_fields.items() if type(None) in get_args(info.annotation)]


def test_the_optional_settings_are_found() -> None:
    assert {"admin_token", "retention", "trainer_timesteps"} <= set(optional_settings())


@pytest.mark.parametrize("name", optional_settings())
def test_an_optional_setting_left_empty_is_unset(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`DAGSMITH_TRAINER_TIMESTEPS=` in .env (the example's line, uncommented) reaches every
    Compose service as "": that must mean the default, not a value that fails to parse."""
    monkeypatch.delenv(f"DAGSMITH_{name.upper()}_FILE", raising=False)
    monkeypatch.setenv(f"DAGSMITH_{name.upper()}", "")
    assert getattr(Settings(_env_file=None), name) is None
