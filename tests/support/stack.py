"""Start Dagsmith's services as real processes, as a user would, and stop them by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from dagsmith.client import Client
from dagsmith.settings import Settings
from tests.support.wait import wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        self.handle.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Stack:
    """Processes of one Dagsmith installation (one database, one queue prefix)."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.procs: dict[str, Proc] = {}
        self.api_port = 0

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
        env.update(
            {
                "DAGSMITH_DATABASE_URL": s.database_url.get_secret_value(),
                "DAGSMITH_AMQP_URL": s.amqp_url.get_secret_value(),
                "DAGSMITH_AMQP_PREFIX": s.amqp_prefix,
                "DAGSMITH_METRICS_PORT": "-1",
                "DAGSMITH_RESYNC_INTERVAL": str(s.resync_interval),
                "DAGSMITH_LEASE_TTL": str(s.lease_ttl),
                "DAGSMITH_LEASE_GRACE": str(s.lease_grace),
                "DAGSMITH_HEARTBEAT_INTERVAL": str(s.heartbeat_interval),
                "DAGSMITH_SHUTDOWN_GRACE": str(s.shutdown_grace),
                "DAGSMITH_LOG_FORMAT": "json",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra or {})
        return env

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        if name in self.procs and self.procs[name].alive():
            raise RuntimeError(f"{name} is already running")
        log = self.logdir / f"{name}.log"
        handle = open(log, "ab")  # noqa: SIM115  (closed in stop())
        popen = subprocess.Popen(
            [sys.executable, "-m", "dagsmith", *args],
            cwd=ROOT,
            env=self.env(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        proc = Proc(name, popen, log, handle)
        self.procs[name] = proc
        return proc

    def start_api(self) -> Proc:
        self.api_port = self.api_port or free_port()
        proc = self.start("api", "api", "--port", str(self.api_port))
        wait_until(self._api_ready, timeout=30, what=f"the API to answer /readyz\n{proc.tail()}")
        return proc

    def _api_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def client(self) -> Client:
        return Client(self.url)

    def start_core(self) -> None:
        """API, controller, evaluator and one executor with every built-in type but chaos.crash."""
        self.start_api()
        self.start("controller", "controller")
        self.start("evaluator", "evaluator")
        self.start_executor()
        self.wait_executors(1)

    def start_executor(self, name: str = "executor") -> Proc:
        return self.start(name, "executor", "--types", "*,!chaos.crash")

    def wait_executors(self, n: int, timeout: float = 30) -> None:
        with self.client() as client:
            wait_until(
                lambda: len([e for e in client.executors() if e["alive"]]) >= n,
                timeout=timeout,
                what=f"{n} executor(s) to register",
            )

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def stop(self, name: str, timeout: float = 20) -> int:
        proc = self.procs[name]
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
        proc.handle.close()
        return int(proc.popen.returncode)

    def stop_all(self) -> None:
        for name in list(self.procs):
            if self.procs[name].alive():
                self.procs[name].popen.send_signal(signal.SIGCONT)
            self.stop(name)
