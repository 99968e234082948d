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
from pydantic import SecretStr

from dagsmith.amqp import delete_topology
from dagsmith.client import Client
from dagsmith.local import LocalStack, wait_until
from dagsmith.settings import Settings, masked

PG = os.environ.get("DAGSMITH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
AMQP = os.environ.get("DAGSMITH_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[1]

# Workflows that must start together each begin with a task of this type. The benchmark's
# executors do not take it, so those tasks wait in their queue until ``Bench.gate_open`` starts an
# executor that does: a barrier the engine itself holds, with no sleep standing in for it.
GATE_TYPE = "echo"
BENCH_TYPES = ["noop", "sleep"]

# Postgres settings without which a commit is not durable: the figures would flatter the engine.
DURABILITY = ("fsync", "synchronous_commit", "full_page_writes")


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


def build() -> dict[str, Any]:
    """The commit measured, and whether the work tree differed from it (then the figures are of
    that commit plus the changes listed)."""
    # --no-optional-locks: a reader must not rewrite the index another process may be using.
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=False).stdout
    changed = [line[3:] for line in status.splitlines()]
    return {"commit": commit or "unknown", "dirty": bool(changed), "changed": changed}


def postgres_durability() -> dict[str, str]:
    with psycopg.connect(f"{PG}/postgres") as conn:
        return {name: str(conn.execute(f"SHOW {name}").fetchone()[0]) for name in DURABILITY}  # type: ignore[index]


def durability_warnings(durability: dict[str, str]) -> list[str]:
    return [
        f"Postgres runs with {name} = {value}: commits are not durable, so these figures are faster than a "
        "real installation's"
        for name, value in durability.items()
        if value == "off"
    ]


def settings_record(settings: Settings) -> dict[str, Any]:
    """What the services of one installation ran with (secrets masked), and the default of each
    setting that differs from it."""
    values: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        default = info.get_default(call_default_factory=True)
        values[name] = _shown(value)
        if value != default:
            defaults[name] = _shown(default)
    return {"values": values, "defaults_of_changed": defaults}


def _shown(value: Any) -> Any:
    return masked(value.get_secret_value()) if isinstance(value, SecretStr) else value


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
        # Every figure's end comes from the database's timestamps, not from when this loop sees
        # it, so a slow poll costs no accuracy, and a fast one would load the Postgres measured.
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
                interval=0.2,
            )
            failed = conn.execute(
                "SELECT count(*) FROM workflows WHERE id = ANY(%s::uuid[]) AND status <> 'succeeded'", (ids,)
            ).fetchone()[0]  # type: ignore[index]
            if failed and require_success:
                raise RuntimeError(f"{failed} benchmark workflows did not succeed")

    def wait_gated(self, ids: list[str], timeout: float = 300) -> None:
        """Until the gate task of every workflow is in its queue: then all are accepted and
        dispatched, and none has run anything."""
        with self.pg() as conn:
            wait_until(
                lambda: (
                    conn.execute(
                        "SELECT count(*) FROM tasks WHERE workflow_id = ANY(%s::uuid[]) AND type = %s "
                        "AND status = 'queued'",
                        (ids, GATE_TYPE),
                    ).fetchone()[0]  # type: ignore[index]
                    == len(ids)
                ),
                timeout=timeout,
                what=f"{len(ids)} gate tasks queued",
                interval=0.2,
            )

    @contextmanager
    def gate_open(self) -> Iterator[None]:
        """An executor for the gate type, for the block's duration: every waiting gate task runs
        and releases its workflow. Stopped after, so the next run's gates wait again."""
        self.stack.start_executor("gate", GATE_TYPE)
        try:
            yield
        finally:
            self.stack.stop("gate")

    def rss_mib(self, name: str) -> float:
        return self._status_kib(name, "VmRSS") / 1024

    def peak_rss_mib(self, name: str) -> float:
        """The most memory the process has held since ``reset_peak_rss`` (or its start)."""
        return self._status_kib(name, "VmHWM") / 1024

    def reset_peak_rss(self, name: str) -> None:
        """Restart the process's peak-RSS count from its present size (Linux: 5 → clear_refs), so
        a repeat's peak is its own, not the highest of every run before it in the same process."""
        Path(f"/proc/{self.stack.procs[name].pid}/clear_refs").write_text("5")

    def _status_kib(self, name: str, field: str) -> int:
        status = Path(f"/proc/{self.stack.procs[name].pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))

    def cpu_seconds(self, name: str) -> float:
        return _cpu_seconds(self.stack.procs[name].pid)

    def cpu_snapshot(self) -> dict[str, dict[int, float]]:
        """CPU seconds used so far, per process, by component: our processes (executors together);
        the Postgres backends serving this installation's database; Postgres's background processes
        (checkpointer, WAL writer, autovacuum…: server-wide, shared with every other database); and
        RabbitMQ (the whole broker: server-wide too)."""
        pids: dict[str, list[int]] = {}
        for name, proc in self.stack.procs.items():
            if proc.alive():  # not the gate executor of an earlier burst
                pids.setdefault("executors" if name.startswith("executor") else name, []).append(proc.pid)
        backends, background = self._postgres_pids()
        pids["postgres_backends"] = backends
        pids["postgres_background"] = background
        broker = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True, check=False).stdout
        pids["rabbitmq"] = [int(pid) for pid in broker.split()]
        return {component: {pid: _cpu_seconds(pid) for pid in group} for component, group in pids.items()}

    def _postgres_pids(self) -> tuple[list[int], list[int]]:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pid, datname, backend_type FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            ).fetchall()
        backends = [pid for pid, db, kind in rows if kind == "client backend" and db == self.database]
        background = [pid for pid, _, kind in rows if kind != "client backend"]
        return backends, background


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds per component between two snapshots. A process new since ``before`` counts
    whole; one gone by ``after`` (a Postgres backend that disconnected) is missed."""
    return {
        component: sum(cpu - before.get(component, {}).get(pid, 0.0) for pid, cpu in procs.items())
        for component, procs in after.items()
    }


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process (0 if it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Not the defaults (16 and INFO), on purpose: two executor processes taking 16 no-op tasks each
# would be the bottleneck of a throughput benchmark rather than the scheduler, and INFO logs a line
# per task, whose cost is logging's, not scheduling's. The report says so next to the figures.
HARNESS_SETTINGS: dict[str, Any] = {"executor_concurrency": 64, "resync_interval": 5.0, "log_level": "WARNING"}


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
        stack.start_core(executors=executors, types=",".join(BENCH_TYPES))
        yield Bench(stack, stack.settings, database)
    finally:
        stack.stop_all()
        asyncio.run(delete_topology(AMQP, settings.amqp_prefix, [*BENCH_TYPES, GATE_TYPE]))
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
