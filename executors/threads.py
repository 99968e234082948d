"""Synchronous handlers, each in a daemon thread of its own.

A thread cannot be stopped. A handler that outlives its timeout (or its workflow's cancel) keeps
running in its thread after the attempt has ended. In a pool, that thread would be missing for
later tasks, and at exit Python would wait for it for ever: a pool's threads are joined when the
interpreter exits, so an executor told to stop would say "executor stopped" and never end.
Daemon threads are not waited for: a stuck handler can neither starve later tasks nor keep a
stopping executor alive. How many are stuck is exported and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

STUCK = Gauge(
    "dagsmith_executor_stuck_threads",
    "Synchronous handlers still running in their thread after their attempt ended (timeout or cancel).",
)

T = TypeVar("T")


@dataclass
class _Call:
    finished: bool = False
    abandoned: bool = False


class Threads:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self.stuck = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a new daemon thread, in a copy of the caller's context (its log
        bindings), and wait for it. Cancelling the wait abandons the thread, which runs on."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        call = _Call()
        context = contextvars.copy_context()

        def work() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = context.run(fn, *args)
            except BaseException as exc:  # handed to the waiting task, which decides
                error = exc
            with self._lock:
                call.finished = True
                if call.abandoned:
                    self.stuck -= 1
                    STUCK.set(self.stuck)
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody waits
                loop.call_soon_threadsafe(_settle, done, result, error)

        threading.Thread(target=work, name=f"dagsmith-task-{next(self._numbers)}", daemon=True).start()
        try:
            return await done
        except asyncio.CancelledError:
            with self._lock:
                if not call.finished:
                    call.abandoned = True
                    self.stuck += 1
                    STUCK.set(self.stuck)
                    stuck = self.stuck
                else:
                    stuck = 0
            if stuck:
                log.warning(
                    "a synchronous handler is still running after its attempt ended; its thread is left to "
                    "finish on its own (it does not hold up other tasks or a shutdown)",
                    handler=getattr(fn, "__qualname__", repr(fn)),
                    stuck_threads=stuck,
                )
            raise


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():  # cancelled meanwhile
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)


THREADS = Threads()
