"""Every setting, from environment variables prefixed ``DAGSMITH_`` (or a ``.env`` file).

The README's configuration table is generated from this class (``dagsmith config``), so the
description next to each field is the documentation.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from dagsmith.durations import parse_duration
from dagsmith.validation import Limits

SECRET_FIELDS = ("database_url", "amqp_url", "admin_token")
DEFAULT_MAX_DELIVERIES = 4  # see the setting's description
# Retention bounds. Shorter than an hour would delete workflows users are still looking at (and
# that executors may still hold stale messages of); ten years is "for ever" with a typo guard.
MIN_RETENTION = 3600.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MAX_RETENTION = 3650 * 86400.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DAGSMITH_",
        env_file=".env",
        extra="ignore",
        secrets_dir=None,
        # A bad value must not print the others: they include URLs with passwords and the token.
        hide_input_in_errors=True,
    )

    # Connections
    database_url: SecretStr = Field(
        SecretStr("postgresql+psycopg://postgres@127.0.0.1:5432/dagsmith"),
        description="SQLAlchemy URL of the Postgres database (driver psycopg).",
    )
    amqp_url: SecretStr = Field(
        SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="RabbitMQ URL. The vhost is part of the URL.",
    )
    amqp_prefix: str = Field(
        "dagsmith", description="Prefix of every exchange and queue name (isolates installations)."
    )
    amqp_heartbeat: int = Field(
        15,
        ge=1,
        le=600,
        description="Seconds between AMQP heartbeats. RabbitMQ closes a connection that stays silent for "
        "two or three of them, which gives the tasks a hung executor had received but not started back "
        "to their queue; lower finds such hangs sooner.",
    )
    db_pool_size: int = Field(10, ge=1, description="Postgres connections per process.")

    # Security
    auth: bool = Field(
        True, description="Require API tokens (Authorization: Bearer). Only `dagsmith dev` turns this off."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bootstrap admin token (all scopes, all namespaces) for first start; also read from "
        "DAGSMITH_ADMIN_TOKEN_FILE.",
    )

    # API
    api_host: str = Field("127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    max_body_bytes: int = Field(32 * 1024 * 1024, description="Largest request body the API accepts (413 above).")
    max_tasks: int = Field(50_000, ge=1, description="Most tasks in one workflow.")
    max_params_bytes: int = Field(65_536, description="Largest params object of one task, as JSON.")
    max_output_bytes: int = Field(
        1024 * 1024,
        description="Largest task output stored; larger outputs fail the attempt (resource_exhausted).",
    )
    expect_time_limit: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds the evaluator may spend checking one output against its expect; past it the "
        "attempt fails (permanent).",
    )
    max_template_bytes: int = Field(
        1024 * 1024,
        description="Largest total the templates of one task's params (or of a workflow's output) may render to.",
    )
    max_sse_connections: int = Field(200, description="Concurrent event streams the API serves.")

    # Controller
    controller_batch_size: int = Field(500, ge=1, description="Most results applied in one transaction.")
    resync_interval: float = Field(
        5.0, gt=0, description="Seconds between checks for expired leases and due retries (besides wake-ups)."
    )
    lease_ttl: float = Field(
        30.0, gt=0, description="Seconds a running task's lease lasts without a heartbeat from its executor."
    )
    lease_grace: float = Field(5.0, ge=0, description="Slack added to a task's timeout before its lease expires.")
    max_deliveries: int = Field(
        DEFAULT_MAX_DELIVERIES,
        ge=1,
        description="Deliveries of one task message: a message that crashes (or is rejected by) executors this "
        "many times is dead-lettered and its task failed as poison. Connection drops count too; a message "
        "whose last delivery no executor started is sent again instead (at most twice). Fixed per queue "
        "when the queue is made (an existing queue keeps its own, with a warning).",
    )
    bundle_max: int = Field(
        32,
        ge=1,
        le=256,
        description="Most tasks of a fast task type sent in one message when many are ready at once "
        "(1: one task per message always).",
    )
    bundle_fast_below: float = Field(
        0.02,
        ge=0,
        description="A task type counts as fast, and may be bundled, while its recent attempts run "
        "shorter than this many seconds on average.",
    )

    retention: float | None = Field(
        None,
        description="Delete finished workflows (with their tasks and events; correction decisions stay) "
        "this long after they finish, e.g. '30d'. The controller checks every few minutes. Unset: keep "
        "them until `dagsmith prune` or DELETE /v1/workflows/{id}. At least 1h, at most 3650d.",
    )

    # Executors
    executor_concurrency: int = Field(16, ge=1, description="Tasks one executor process runs at once.")
    default_task_timeout: float = Field(
        86400.0,
        ge=0,
        description="Timeout in seconds for tasks whose spec sets none, so a hung handler cannot hold its "
        "task for ever (0: no limit).",
    )
    heartbeat_interval: float = Field(5.0, gt=0, description="Seconds between executor heartbeats.")
    start_report_after: float = Field(
        0.05,
        ge=0,
        description="An executor reports 'running' for tasks that take longer than this many seconds "
        "(faster tasks report start and finish in one message).",
    )
    shutdown_grace: float = Field(
        20.0,
        ge=0,
        description="Seconds a stopping executor lets running tasks finish before handing them back.",
    )
    executor_allow_shell: bool = Field(False, description="Allow the shell.run task type.")
    executor_python_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Modules python.call may import functions from (comma-separated)."
    )
    executor_http_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts http.request may reach, comma-separated (empty: any host)."
    )

    correction_exploration: float = Field(
        0.05,
        ge=0,
        le=0.5,
        description="Share of corrective decisions that try another recovery action at random (never skip "
        "or abort), so the policy gate can estimate new policies from real decisions; 0 makes them "
        "deterministic and the gate's real-data check impossible.",
    )

    # Trainer service
    trainer_interval: float = Field(3600.0, gt=0, description="Seconds between the trainer's checks for new decisions.")
    trainer_min_new: int = Field(
        50, ge=1, description="New decisions with outcomes needed before the trainer retrains."
    )
    trainer_seeds: int = Field(3, ge=1, description="PPO seeds per training run (the best one is kept).")
    trainer_timesteps: int | None = Field(None, ge=1000, description="Decisions per seed (default: the trainer's).")

    # Observability
    metrics_port: int = Field(
        0,
        ge=-1,
        le=65535,
        description="Port for /metrics of the controller, evaluator, executors and trainer (0: the service "
        "default 9101/9102/9103/9104; -1: off).",
    )
    metrics_host: str = Field(
        "0.0.0.0",  # in a container, the scraper is on another host
        description="Address the /metrics ports listen on ('dagsmith dev' uses 127.0.0.1).",
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    log_format: Literal["json", "console", "auto"] = Field(
        "auto", description="'json', 'console' or 'auto' (JSON when not a TTY)."
    )

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, values: Any) -> Any:
        """DAGSMITH_<NAME>_FILE names a file holding the value (Docker and Kubernetes secrets)."""
        if not isinstance(values, dict):
            return values
        for name in SECRET_FIELDS:
            path = os.environ.get(f"DAGSMITH_{name.upper()}_FILE")
            if path and name not in values:
                try:
                    values[name] = Path(path).read_text().strip()
                except OSError as exc:
                    raise ValueError(f"DAGSMITH_{name.upper()}_FILE={path}: {exc.strerror}") from None
        return values

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, value: object) -> object:
        if value in ("", None):
            return None
        seconds = parse_duration(value, maximum=MAX_RETENTION)  # type: ignore[arg-type]
        if seconds < MIN_RETENTION:
            raise ValueError(f"{value!r} is shorter than the minimum of 1h")
        return seconds

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().upper() in LOG_LEVELS:
            return value.strip().upper()
        raise ValueError(f"{value!r} is not a log level: use one of {', '.join(LOG_LEVELS)}")

    @field_validator("admin_token", "trainer_timesteps", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        """An optional setting given as "" (``DAGSMITH_X=`` in .env) is unset, not an empty value."""
        return None if value in ("", None) else value

    @field_validator("executor_python_modules", "executor_http_allow_hosts", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str) and not value.startswith("["):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    def limits(self) -> Limits:
        return Limits(max_tasks=self.max_tasks, max_params_bytes=self.max_params_bytes)

    def sync_database_url(self) -> str:
        return self.database_url.get_secret_value()

    def psycopg_dsn(self) -> str:
        """The database URL in the form psycopg itself accepts (for LISTEN connections)."""
        return self.database_url.get_secret_value().replace("postgresql+psycopg://", "postgresql://")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


class ClientSettings(BaseSettings):
    """What the CLI's client commands read (``--api`` and ``--token`` override them): from the
    environment or ``.env``, like the services' settings, but apart from them, so a client needs
    none of the services' settings to be valid."""

    model_config = SettingsConfigDict(env_prefix="DAGSMITH_", env_file=".env", extra="ignore")

    api: str = Field("http://127.0.0.1:8000", description="Where the CLI finds the API.")
    token: SecretStr | None = Field(None, description="The CLI's API token.")


def effective(settings: Settings) -> list[tuple[str, str, bool]]:
    """Every setting as (variable, value in effect, whether it differs from the default), with
    secrets masked: a URL keeps all but its password, anything else shows as ***."""
    rows = []
    for name, info in Settings.model_fields.items():
        env = info.alias or f"DAGSMITH_{name.upper()}"
        value = getattr(settings, name)
        default = info.get_default(call_default_factory=True)
        changed = value != default
        if isinstance(value, SecretStr):
            shown = masked(value.get_secret_value())
        else:
            shown = str(value)
        rows.append((env, shown, changed))
    return rows


def masked(secret: str) -> str:
    """A URL shows its scheme, user, host, port and path, never a password or a query value
    (``?password=…``, ``sslpassword=…``); anything else is ***."""
    if not secret:
        return ""
    try:
        url = urlsplit(secret)
        host, port = url.hostname, url.port
    except ValueError:
        return "***"
    if not url.scheme or not url.netloc:
        return "***"
    user = f"{url.username}{':***' if url.password is not None else ''}@" if url.username else ""
    netloc = f"{user}{host or ''}{f':{port}' if port else ''}"
    query = "&".join(f"{key}=***" for key, _ in parse_qsl(url.query, keep_blank_values=True))
    return urlunsplit((url.scheme, netloc, url.path, query, ""))


def settings_table() -> str:
    """A markdown table of every setting, for the README."""
    rows = ["| Variable | Default | Description |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        env = info.alias or f"DAGSMITH_{name.upper()}"
        default = info.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        rows.append(f"| `{env}` | `{default}` | {info.description or ''} |")
    return "\n".join(rows)
