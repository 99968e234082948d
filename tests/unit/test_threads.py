"""Synchronous handlers in daemon threads: results, errors, and threads left behind."""

from __future__ import annotations

import asyncio
import threading

import pytest

from executors.threads import Threads
from tests.support.wait import async_wait_until


async def test_a_result_and_an_error_come_back() -> None:
    threads = Threads()
    assert await threads.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ValueError, match="bad"):
        await threads.run(_raise, ValueError("bad"))
    assert threads.stuck == 0


async def test_a_handler_past_its_timeout_is_counted_until_it_ends() -> None:
    threads = Threads()
    release = threading.Event()
    seen: list[threading.Thread] = []

    def blocked() -> str:
        seen.append(threading.current_thread())
        release.wait(10)
        return "late"

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await threads.run(blocked)
    assert threads.stuck == 1
    assert seen[0].daemon  # not joined at exit: a stuck handler cannot hold up a shutdown
    # Others still run meanwhile, each in a thread of its own.
    assert await threads.run(lambda: "next") == "next"
    release.set()
    await async_wait_until(lambda: _zero(threads), timeout=5, what="the stuck thread to end")


async def _zero(threads: Threads) -> bool:
    return threads.stuck == 0


def _raise(exc: Exception) -> None:
    raise exc
