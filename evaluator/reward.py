"""The reward formula — pure, versioned, documented.

``reward_version = "v1"``. For one task attempt:

- **pass** (the executor succeeded and the output satisfies ``expect``):
  ``r = 1 - 0.25 * min(1, duration / timeout) - 0.1 * (attempt - 1)``, floored at 0.1.
  Fast, first-try successes score near 1; every retry costs 0.1; using the whole timeout costs 0.25.
- **fail**: ``-1``, except ``invalid_output`` (the executor ran but its output failed the checks):
  ``-0.75``, and ``cancelled``: ``0`` (nobody's fault).

A workflow's ``total_reward`` is the sum over all its evaluated attempts.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import orjson

from dagsmith import expect
from dagsmith.errors import ErrorClass
from dagsmith.messages import Check, Evaluation, ResultMessage, TaskError

REWARD_VERSION = "v1"


@lru_cache(maxsize=1024)
def _validator(schema_json: str) -> Any:
    return expect.validator(orjson.loads(schema_json))


def check_expect(expect: dict[str, Any], output: Any, limit: int = 5) -> list[str]:
    """Problems of ``output`` against the JSON Schema ``expect``, each with its path."""
    validator = _validator(orjson.dumps(expect, option=orjson.OPT_SORT_KEYS).decode())
    problems = []
    for error in validator.iter_errors(output):
        path = "output" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        problems.append(f"{path}: {error.message}")
        if len(problems) >= limit:
            break
    return problems


class ExpectTooSlow(Exception):
    """Checking an output against its ``expect`` ran past the time limit."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt what runs inside after ``seconds`` (raising :class:`ExpectTooSlow`): a regular
    expression that backtracks catastrophically checks for signals as it goes, as Python code
    does. Only in the main thread, where signals are delivered and where the evaluator scores;
    elsewhere, and with no limit, nothing is interrupted."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ExpectTooSlow

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _unchecked(exc: Exception, seconds: float | None) -> str:
    """Why an output could not be checked against its expect."""
    if isinstance(exc, ExpectTooSlow):
        return (
            f"expect took longer than {seconds:g}s to check this output (DAGSMITH_EXPECT_TIME_LIMIT): "
            "a pattern that backtracks catastrophically, such as (a+)+$?"
        )
    # A schema submission could not vet (stored before it did).
    return f"expect could not be checked: {type(exc).__name__}: {str(exc)[:300]}"


def reward_for(
    passed: bool, error_class: ErrorClass | None, duration: float, timeout: float | None, attempt: int
) -> float:
    if passed:
        used = min(1.0, duration / timeout) if timeout else 0.0
        return round(max(0.1, 1.0 - 0.25 * used - 0.1 * max(attempt - 1, 0)), 4)
    if error_class == ErrorClass.cancelled:
        return 0.0
    if error_class == ErrorClass.invalid_output:
        return -0.75
    return -1.0


def evaluate(
    result: ResultMessage, max_output_bytes: int | None = None, expect_seconds: float | None = None
) -> Evaluation:
    """Score one result. ``max_output_bytes`` (``DAGSMITH_MAX_OUTPUT_BYTES``) is checked here too,
    not only by the executor that produced the output: an executor with a larger limit, or one
    that does not check, cannot get a larger output stored. ``expect_seconds``
    (``DAGSMITH_EXPECT_TIME_LIMIT``) bounds the ``expect`` check: one slow schema must not hold
    up every workflow's results."""
    task = result.task
    checks: list[Check] = [
        Check(
            name="executor",
            passed=result.ok,
            detail="" if result.ok else (result.error.message if result.error else "failed"),
        )
    ]
    error: TaskError | None = result.error
    if result.ok and max_output_bytes is not None and result.output is not None:
        size = len(orjson.dumps(result.output))
        if size > max_output_bytes:
            detail = f"output is {size} bytes, over the limit of {max_output_bytes} (DAGSMITH_MAX_OUTPUT_BYTES)"
            checks.append(Check(name="output_size", passed=False, detail=detail))
            error = TaskError(
                error_class=ErrorClass.resource_exhausted,
                message=detail,
                details={"size": size, "limit": max_output_bytes},
            )
    if result.ok and error is None and task.expect is not None:
        try:
            with time_limit(expect_seconds):
                problems = check_expect(task.expect, result.output)
        except Exception as exc:
            # The task's spec is at fault, not its output: no retry or repair can help.
            detail = _unchecked(exc, expect_seconds)
            checks.append(Check(name="expect", passed=False, detail=detail))
            error = TaskError(error_class=ErrorClass.permanent, message=detail)
        else:
            checks.append(Check(name="expect", passed=not problems, detail="; ".join(problems)))
            if problems:
                error = TaskError(
                    error_class=ErrorClass.invalid_output,
                    message="output does not match expect: " + "; ".join(problems),
                    details={"problems": problems},
                )
    duration = result.duration
    if task.timeout:
        checks.append(
            Check(
                name="within_timeout",
                passed=duration <= task.timeout,
                detail=f"{duration:.3f}s of {task.timeout:g}s",
            )
        )
    passed = all(c.passed for c in checks if c.name in ("executor", "expect", "output_size"))
    error_class = None if passed else (error.error_class if error else ErrorClass.unknown)
    reward = reward_for(passed, error_class, duration, task.timeout, task.attempt)
    feedback = {
        "verdict": "pass" if passed else "fail",
        "error_class": str(error_class) if error_class else None,
        "checks": [c.model_dump() for c in checks],
        "reward_version": REWARD_VERSION,
        "attempt": task.attempt,
        "timings": {
            "queue_wait": round(max(result.started_at - task.dispatched_at, 0.0), 6) if task.dispatched_at else None,
            "run": round(duration, 6),
            "timeout": task.timeout,
        },
    }
    return Evaluation(
        verdict="pass" if passed else "fail",
        reward=reward,
        feedback=feedback,
        error=None if passed else error,
    )
