"""Run a whole installation as local processes: used by the tests, the benchmarks and by hand.

Every process is started the way a user starts it (``python -m dagsmith <service>``), logs to its
own file, and is stopped by its PID.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import httpx
from pydantic import SecretStr

from dagsmith.client import Client
from dagsmith.settings import Settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


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


def settings_env(settings: Settings) -> dict[str, str]:
    """Settings as the environment variables that recreate them in another process."""
    env = {}
    for name, info in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        env[info.alias or f"DAGSMITH_{name.upper()}"] = str(value)
    return env


def wait_until(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; fail loudly after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


class LocalStack:
    """Processes of one Dagsmith installation (one database, one queue prefix)."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        if settings.auth and settings.admin_token is None:
            settings = settings.model_copy(update={"admin_token": SecretStr("dgs_local_" + secrets.token_urlsafe(24))})
        self.settings = settings
        self.logdir = logdir
        self.procs: dict[str, Proc] = {}
        self.ended: set[str] = set()  # stopped or killed on purpose (not restarted since)
        self.api_port = 0
        self.extra_env: dict[str, str] = {}

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a child process: every setting of this stack as DAGSMITH_* variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSMITH_")}
        env.update(settings_env(self.settings))
        env.update({"DAGSMITH_METRICS_PORT": "-1", "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
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
        self.ended.discard(name)
        return proc

    def start_api(self) -> Proc:
        self.api_port = self.api_port or free_port()
        proc = self.start("api", "api", "--port", str(self.api_port))
        try:
            wait_until(self._api_ready, timeout=30, what="the API to answer /readyz")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{proc.tail()}") from None
        return proc

    def _api_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def token(self) -> str | None:
        """The admin token the stack's API accepts (None when authentication is off)."""
        if not self.settings.auth or self.settings.admin_token is None:
            return None
        return self.settings.admin_token.get_secret_value()

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token=token or self.token)

    def start_core(self, executors: int = 1, types: str = "*,!chaos.crash") -> None:
        """API, controller, evaluator and executors with every built-in type but chaos.crash."""
        self.start_api()
        self.start("controller", "controller")
        self.start("evaluator", "evaluator")
        for i in range(executors):
            self.start_executor("executor" if i == 0 else f"executor-{i + 1}", types)
        self.wait_executors(executors)

    def start_executor(self, name: str = "executor", types: str = "*,!chaos.crash", *args: str) -> Proc:
        return self.start(name, "executor", "--types", types, *args)

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
        self.ended.add(name)
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def stop(self, name: str, timeout: float = 20) -> int:
        proc = self.procs[name]
        self.ended.add(name)
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
        proc.handle.close()
        return int(proc.popen.returncode)

    def died(self) -> list[str]:
        """Processes that ended without being stopped or killed on purpose."""
        return [name for name, proc in self.procs.items() if name not in self.ended and not proc.alive()]

    def stop_all(self) -> None:
        for name in list(self.procs):
            if self.procs[name].alive():
                self.procs[name].popen.send_signal(signal.SIGCONT)
            self.stop(name)
