"""A fresh installation per benchmark run: its own database, queue prefix and processes."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg

from dagsmith.amqp import delete_topology
from dagsmith.client import Client
from dagsmith.local import LocalStack, wait_until
from dagsmith.settings import Settings

PG = os.environ.get("DAGSMITH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("DAGSMITH_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    pg_version = ""
    try:
        with psycopg.connect(f"{PG}/postgres") as conn:
            pg_version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    except psycopg.Error:
        pass
    rabbit = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_mib": mem,
        "python": platform.python_version(),
        "postgres": pg_version,
        "rabbitmq": rabbit or "unknown",
        "kernel": platform.release(),
    }


@dataclass
class Bench:
    stack: LocalStack
    settings: Settings
    database: str
    _client: Client | None = None

    def client(self) -> Client:
        """One shared client (its connection pool is thread-safe): creating an HTTP client per
        request costs more than the request, and would be measured as the system's time."""
        if self._client is None:
            self._client = self.stack.client()
        return self._client

    def pg(self) -> psycopg.Connection[Any]:
        return psycopg.connect(f"{PG}/{self.database}", autocommit=True)

    def submit(self, doc: dict[str, Any]) -> str:
        return str(self.client().submit(orjson.dumps(doc), content_type="application/json")["id"])

    def wait_all(self, ids: list[str], timeout: float, require_success: bool = True) -> None:
        with self.pg() as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM workflows WHERE id = ANY(%s::uuid[]) AND status IN "
                        "('succeeded', 'failed', 'cancelled')",
                        (ids,),
                    ).fetchone()[0]  # type: ignore[index]
                    == len(ids)
                ),
                timeout=timeout,
                what=f"{len(ids)} workflows to finish",
                interval=0.02,
            )
            failed = conn.execute(
                "SELECT count(*) FROM workflows WHERE id = ANY(%s::uuid[]) AND status <> 'succeeded'", (ids,)
            ).fetchone()[0]  # type: ignore[index]
            if failed and require_success:
                raise RuntimeError(f"{failed} benchmark workflows did not succeed")

    def rss_mib(self, name: str) -> float:
        status = Path(f"/proc/{self.stack.procs[name].pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        return kib / 1024

    def cpu_seconds(self, name: str) -> float:
        return _cpu_seconds(self.stack.procs[name].pid)

    def cpu_by_component(self) -> dict[str, float]:
        """CPU seconds used so far by each part: our processes (executors summed), and the
        machine's RabbitMQ and Postgres servers (all their processes)."""
        used: dict[str, float] = {}
        for name, proc in self.stack.procs.items():
            component = "executors" if name.startswith("executor") else name
            used[component] = used.get(component, 0.0) + _cpu_seconds(proc.pid)
        for component, command in (("rabbitmq", "beam.smp"), ("postgres", "postgres")):
            pids = subprocess.run(["pgrep", "-x", command], capture_output=True, text=True, check=False).stdout
            used[component] = sum(_cpu_seconds(int(pid)) for pid in pids.split())
        return used


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process (0 if it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HARNESS_SETTINGS: dict[str, Any] = {"executor_concurrency": 64, "resync_interval": 5.0, "log_level": "WARNING"}


def bench_settings() -> dict[str, Any]:
    """The settings the benchmarked services run with, secrets and connection strings left out."""
    values = Settings(**HARNESS_SETTINGS).model_dump()
    return {k: v for k, v in values.items() if not k.endswith(("_url", "_token")) and not k.startswith("amqp_prefix")}


@contextmanager
def installation(executors: int = 2, concurrency: int = 64, **overrides: Any) -> Iterator[Bench]:
    """Create a database, start API, controller, evaluator and executors; tear all down after."""
    from controller.migrate import upgrade

    run = uuid.uuid4().hex[:8]
    database = f"dagsmith_bench_{run}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    url = f"postgresql+psycopg://{PG.split('://', 1)[1]}/{database}"
    upgrade(url)
    values: dict[str, Any] = {
        "database_url": url,
        "amqp_url": AMQP,
        "amqp_prefix": f"bench{run}",
        "metrics_port": -1,
        **HARNESS_SETTINGS,
        "executor_concurrency": concurrency,
    }
    values.update(overrides)
    settings = Settings(**values)
    logdir = Path(tempfile.mkdtemp(prefix="dagsmith-bench-"))
    stack = LocalStack(settings, logdir)
    try:
        stack.start_core(executors=executors, types="noop,sleep")
        yield Bench(stack, settings, database)
    finally:
        stack.stop_all()
        asyncio.run(delete_topology(AMQP, settings.amqp_prefix, ["noop", "sleep"]))
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
