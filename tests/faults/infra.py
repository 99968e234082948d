"""Private Postgres and RabbitMQ for fault tests: started here, owned here, broken here.

The machine's shared Postgres and RabbitMQ serve other test runs, so faults that restart a
server never touch them: each fault session starts its own Postgres cluster (``initdb`` into a
temporary directory, a free port) and its own RabbitMQ node (its own node name, ports, data and
log directories, and Erlang cookie). Every start and stop is bounded in time, and everything is
stopped by its PID or node name at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psycopg

from dagsmith.local import free_port

PG_BIN = Path(os.environ.get("DAGSMITH_FAULTS_PG_BIN", "/usr/lib/postgresql/15/bin"))
RABBIT_BIN = Path(os.environ.get("DAGSMITH_FAULTS_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))


class InfraError(RuntimeError):
    """A private server did not start or stop in time."""


def missing_binaries() -> str | None:
    """Why the private servers cannot run here, or None."""
    for binary in (PG_BIN / "initdb", PG_BIN / "pg_ctl", RABBIT_BIN / "rabbitmq-server", RABBIT_BIN / "rabbitmqctl"):
        if not os.access(binary, os.X_OK):
            return f"{binary} not found (install postgresql-15 and rabbitmq-server, or set DAGSMITH_FAULTS_*_BIN)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs runuser to start Postgres as the postgres user"
    return None


def _run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"{' '.join(cmd)} did not finish within {timeout}s") from exc
    if done.returncode != 0:
        raise InfraError(f"{' '.join(cmd)} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}")
    return done.stdout


class PrivatePostgres:
    """A Postgres cluster in ``root``, on a free port of 127.0.0.1, run as the postgres user if we are root."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "postgres"
        self.data = self.dir / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _ctl(self, *args: str, timeout: float = 60) -> None:
        _run([*self._as, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args], timeout=timeout)

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        if self._as:
            for parent in (self.dir.parent, *self.dir.parent.parents):  # the postgres user must reach it
                if parent.stat().st_mode & 0o005 != 0o005:
                    parent.chmod(parent.stat().st_mode | 0o055)
            shutil.chown(self.dir, "postgres")
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]
        _run([*self._as, *initdb, "--no-sync"], timeout=120)

    def start(self) -> None:
        # fsync off: these tests kill processes, not the machine; the kernel keeps what was written.
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._ctl("-o", options, "-l", str(self.dir / "postgres.log"), "-w", "-t", "60", "start", timeout=90)

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster. ``immediate`` is a crash: no checkpoint, recovery from WAL at the next start."""
        self._ctl("-m", mode, "-w", "-t", "60", "stop", timeout=90)

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and _alive(pid)

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        with psycopg.connect(f"{self.dsn}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def teardown(self) -> None:
        if self.running():
            try:
                self.stop("immediate")
            except InfraError:
                pid = self.pid()
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


class PrivateRabbit:
    """A RabbitMQ node named ``dagsmith-faults-<id>@localhost`` with its own ports, data, logs and cookie."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "rabbitmq"
        self.node = f"dagsmith-faults-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.pid_file = self.dir / "rabbitmq.pid"

    def env(self) -> dict[str, str]:
        d = self.dir
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            {
                "HOME": str(d),  # the Erlang cookie lives here, shared by the node and rabbitmqctl
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),  # not the machine's one
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            }
        )
        return env

    def init(self) -> None:
        self.dir.mkdir(parents=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        assert self.node.startswith("dagsmith-faults-")  # never address the machine's own node
        return _run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args], timeout=timeout, env=self.env())

    def start(self, timeout: float = 90) -> None:
        """Start the node (on the same data directory as before, if any) and wait until it serves."""
        _run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], timeout=30, env=self.env(), cwd=self.dir)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                self.ctl("await_startup", "--timeout", "30", timeout=40)
                return
            except InfraError as exc:  # not registered with epmd yet
                last = str(exc)
                time.sleep(0.5)
        raise InfraError(f"RabbitMQ node {self.node} did not start within {timeout}s: {last[-500:]}")

    def stop(self) -> None:
        """Stop the whole node (the Erlang VM) and wait until its process is gone."""
        self.ctl("stop", str(self.pid_file), timeout=90)

    def stop_app(self) -> None:
        self.ctl("stop_app", timeout=60)

    def start_app(self) -> None:
        self.ctl("start_app", timeout=60)

    def close_all_connections(self, reason: str = "fault test") -> None:
        self.ctl("close_all_connections", reason, timeout=60)

    def queue_messages(self) -> dict[str, int]:
        """Messages (ready + unacknowledged) per queue."""
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages", timeout=60)
        counts = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
        return counts

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def teardown(self) -> None:
        pid = self.pid()
        if pid is None or not _alive(pid):
            return
        try:
            self.stop()
        except InfraError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
