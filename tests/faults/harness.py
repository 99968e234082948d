"""The fault-test harness: a Dagsmith installation on private servers, a workload, and clocks.

:class:`Infra` is one private Postgres cluster and one private RabbitMQ node for the whole fault
session (see :mod:`tests.faults.infra`). :class:`Installation` is one test's Dagsmith on them: a
fresh database and queue prefix, and the services started as processes with
:class:`dagsmith.local.LocalStack`, as users start them. It submits a batch from
:mod:`tests.faults.workload` over HTTP, lets a test wait for the moment to strike, measures how
long recovery takes, and hands the database to :func:`tests.faults.checks.check`.

Timings are short so that faults resolve in seconds: leases of ``LEASE_TTL`` seconds renewed by
heartbeats every ``HEARTBEAT`` seconds, a resync every second, three deliveries before a task
message is dead-lettered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import psycopg
from prometheus_client.parser import text_string_to_metric_families

from dagsmith.local import LocalStack, free_port, wait_until
from dagsmith.settings import Settings
from tests.faults import checks
from tests.faults.infra import PrivatePostgres, PrivateRabbit
from tests.faults.workload import Planned

T = TypeVar("T")

LEASE_TTL = 3.0
HEARTBEAT = 0.5
RESYNC = 1.0
MAX_DELIVERIES = 4  # the default
CONCURRENCY = 24
TYPES = "sleep,noop,chaos.flaky,chaos.fail"
FINISH_TIMEOUT = 150.0  # for a whole batch to finish once a fault is over


@dataclass
class Infra:
    """The private servers of a fault session, in ``root`` (removed at the end unless
    ``DAGSMITH_FAULTS_KEEP`` is set; the test logs are there too)."""

    root: Path
    pg: PrivatePostgres
    rabbit: PrivateRabbit

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[Infra]:
        root = Path(tempfile.mkdtemp(prefix="dagsmith-faults-"))
        infra = cls(root, PrivatePostgres(root), PrivateRabbit(root))
        try:
            infra.pg.init()
            infra.pg.start()
            infra.rabbit.init()
            infra.rabbit.start()
            yield infra
        finally:
            infra.rabbit.teardown()
            infra.pg.teardown()
            if os.environ.get("DAGSMITH_FAULTS_KEEP"):
                print(f"fault-test servers' data and logs kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)


@dataclass
class Fault:
    """One injected fault and what it cost: how long it lasted, and how long until progress resumed."""

    name: str
    downtime_s: float = 0.0  # from the fault until the broken piece is back (restarted, resumed)
    recover_s: float | None = None  # from then until the next task result was applied
    notes: dict[str, Any] = field(default_factory=dict)


class Installation:
    """One test's Dagsmith: its own database and queue prefix on the private servers, as processes."""

    def __init__(self, infra: Infra, logdir: Path, **overrides: Any) -> None:
        from controller.migrate import upgrade

        self.infra = infra
        self.run = uuid.uuid4().hex[:8]
        self.database = f"faults_{self.run}"
        infra.pg.create_database(self.database)
        upgrade(infra.pg.url(self.database))
        values: dict[str, Any] = {
            "database_url": infra.pg.url(self.database),
            "amqp_url": infra.rabbit.url,
            "amqp_prefix": f"faults{self.run}",
            "metrics_port": -1,
            "resync_interval": RESYNC,
            "lease_ttl": LEASE_TTL,
            "lease_grace": 1.0,
            "heartbeat_interval": HEARTBEAT,
            "max_deliveries": MAX_DELIVERIES,
            "executor_concurrency": CONCURRENCY,
            "shutdown_grace": 1.0,
            "log_format": "json",
            # The workload's expected outcomes are what the rules do; an explored action (a retune of
            # a poison task, say) would be a legitimate outcome these checks do not expect.
            "correction_exploration": 0.0,
        }
        values.update(overrides)
        self.settings = Settings(**values)
        self.stack = LocalStack(self.settings, logdir)
        self.planned: dict[str, Planned] = {}
        self.faults: list[Fault] = []
        self._conn: psycopg.Connection[Any] | None = None
        self.metrics_ports: dict[str, int] = {}

    # --- processes -----------------------------------------------------------------------------

    def start(self, executors: int = 2, controllers: int = 1) -> None:
        self.stack.start_api()
        for i in range(controllers):
            self.start_controller(self.controller_name(i))
        self.stack.start("evaluator", "evaluator")
        for i in range(executors):
            self.start_executor(f"executor-{i + 1}")
        self.stack.wait_executors(executors)

    def start_controller(self, name: str) -> None:
        """A controller serving /metrics on a free port (the tests read what it ignored)."""
        port = free_port()
        self.metrics_ports[name] = port
        self.stack.start(name, "controller", env={"DAGSMITH_METRICS_PORT": str(port)})

    def controller_metric(self, metric: str, **labels: str) -> float:
        """The sum of one counter's samples (matching ``labels``) over the live controllers."""
        total = 0.0
        for proc, port in self.metrics_ports.items():
            if not self.stack.procs[proc].alive():
                continue
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                        total += sample.value
        return total

    @staticmethod
    def controller_name(i: int) -> str:
        return "controller" if i == 0 else f"controller-{i + 1}"

    def start_executor(self, name: str) -> None:
        self.stack.start_executor(name, TYPES)

    def kill(self, name: str) -> None:
        """SIGKILL a service and reap it."""
        self.stack.kill(name)

    def stop(self) -> None:
        self.stack.stop_all()
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()

    def tails(self, lines: int = 15) -> str:
        """What a timed-out wait reports: where the tasks stand, and each process's last lines
        and last warnings (info lines alone hide why progress stopped)."""
        try:
            states = dict(self.query("SELECT status, count(*) FROM tasks GROUP BY status"))
        except psycopg.Error as exc:
            states = {"unreadable": str(exc)[:200]}
        parts = [f"--- task states: {states}"]
        for name, proc in self.stack.procs.items():
            log = proc.tail(100_000).splitlines()
            warnings = [line for line in log if '"level": "warning"' in line or '"level": "error"' in line]
            parts.append(f"--- {name} (alive: {proc.alive()})\n" + "\n".join(log[-lines:]))
            if warnings:
                parts.append(f"--- {name}: last warnings\n" + "\n".join(w[:600] for w in warnings[-5:]))
        return "\n".join(parts)

    # --- the database ------------------------------------------------------------------------

    def db(self) -> psycopg.Connection[Any]:
        """An autocommit connection to this installation's database; reopened after a Postgres restart."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(f"{self.infra.pg.dsn}/{self.database}", autocommit=True, connect_timeout=5)
        return self._conn

    def query(self, sql: str, params: Any = None) -> list[Any]:
        for attempt in range(2):
            try:
                return self.db().execute(sql, params).fetchall()
            except psycopg.OperationalError:
                if attempt:
                    raise
                self._conn = None
        raise AssertionError("unreachable")

    def succeeded(self) -> int:
        return int(self.query("SELECT coalesce(sum(n_succeeded), 0) FROM workflows")[0][0])

    # --- the workload ------------------------------------------------------------------------

    def submit(self, batch: list[Planned]) -> list[str]:
        """Submit over HTTP; every workflow must be accepted with a 2xx."""
        ids = []
        with self.stack.client() as client:
            for plan in batch:
                response = client.http.post(
                    "/v1/workflows",
                    content=orjson.dumps(plan.document()),
                    headers={"Content-Type": "application/json", "Idempotency-Key": f"{self.run}-{plan.name}"},
                )
                assert 200 <= response.status_code < 300, (plan.name, response.status_code, response.text[:500])
                wid = str(response.json()["id"])
                self.planned[wid] = plan
                ids.append(wid)
        return ids

    def planned_tasks(self) -> int:
        return sum(len(p.tasks) for p in self.planned.values())

    def wait_succeeded(self, fraction: float, timeout: float = 60.0) -> int:
        """Wait until ``fraction`` of the planned tasks succeeded: the moment to strike mid-run."""
        goal = int(self.planned_tasks() * fraction)
        return self.wait(lambda: (n := self.succeeded()) >= goal and n, timeout, f"{goal} tasks to succeed")

    def wait(self, condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
        try:
            return wait_until(condition, timeout=timeout, what=what, interval=interval)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None

    def wait_finished(self, timeout: float = FINISH_TIMEOUT) -> float:
        """Wait until every submitted workflow is terminal; returns how long that took."""
        started = time.monotonic()
        ids = list(self.planned)
        self.wait(
            lambda: checks.terminal_count(self.db(), ids) == len(ids),
            timeout,
            f"{len(ids)} workflows to finish",
            interval=0.2,
        )
        return time.monotonic() - started

    def check(self) -> checks.Verdict:
        return checks.check(self.db(), self.planned)

    # --- clocks --------------------------------------------------------------------------------

    def progress_after(self, since: float, baseline: int, timeout: float = 60.0) -> float:
        """Seconds from ``since`` (monotonic) until more than ``baseline`` tasks have succeeded."""
        self.wait(lambda: self._succeeded_or_none() > baseline, timeout, "progress to resume")
        return time.monotonic() - since

    def _succeeded_or_none(self) -> int:
        try:
            return self.succeeded()
        except psycopg.OperationalError:
            return -1

    # --- executors -----------------------------------------------------------------------------

    def executor_id(self, name: str) -> str:
        pid = self.stack.procs[name].pid
        rows = self.wait(
            lambda: self.query("SELECT id FROM executors WHERE pid = %s ORDER BY last_heartbeat DESC", (pid,)),
            30,
            f"{name} to register",
        )
        return str(rows[0][0])

    def running_on(self, executor_id: str) -> list[tuple[int, int]]:
        """(task_id, attempt) of the tasks the controller believes run on that executor."""
        rows = self.query(
            "SELECT id, attempt FROM tasks WHERE executor_id = %s AND status = 'running' ORDER BY id", (executor_id,)
        )
        return [(int(r[0]), int(r[1])) for r in rows]

    def moved_on(self, held: list[tuple[int, int]], executor_id: str) -> bool:
        """True once none of ``held`` is still running as that attempt on that executor."""
        ids = [t for t, _ in held]
        rows = self.query("SELECT id, status, attempt, executor_id FROM tasks WHERE id = ANY(%s)", (ids,))
        attempt_of = dict(held)
        return all(
            status in checks.TERMINAL or attempt > attempt_of[tid] or owner != executor_id
            for tid, status, attempt, owner in rows
        )

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.stack.procs[name].pid, sig)
