from __future__ import annotations

from typing import Any

import pytest

from dagsmith.errors import ErrorClass
from dagsmith.messages import ResultMessage, TaskError, TaskRef
from evaluator.reward import REWARD_VERSION, evaluate, reward_for


def result(
    ok: bool = True,
    output: Any = None,
    expect: dict[str, Any] | None = None,
    timeout: float | None = None,
    attempt: int = 1,
    duration: float = 1.0,
    error: TaskError | None = None,
) -> ResultMessage:
    ref = TaskRef(
        task_id=1,
        attempt=attempt,
        workflow_id="w",
        name="t",
        type="x",
        timeout=timeout,
        expect=expect,
        dispatched_at=99.0,
    )
    return ResultMessage(
        task=ref,
        executor_id="e",
        ok=ok,
        output=output,
        error=error,
        started_at=100.0,
        finished_at=100.0 + duration,
    )


def test_reward_formula() -> None:
    assert reward_for(True, None, 1.0, None, 1) == 1.0
    assert reward_for(True, None, 5.0, 10.0, 1) == pytest.approx(0.875)
    assert reward_for(True, None, 50.0, 10.0, 3) == pytest.approx(0.55)
    assert reward_for(True, None, 1.0, None, 20) == 0.1
    assert reward_for(False, ErrorClass.transient, 1, None, 1) == -1.0
    assert reward_for(False, ErrorClass.invalid_output, 1, None, 1) == -0.75
    assert reward_for(False, ErrorClass.cancelled, 1, None, 1) == 0.0


def test_pass_with_feedback() -> None:
    ev = evaluate(result(output={"text": "x"}, expect={"type": "object", "required": ["text"]}, timeout=10))
    assert ev.verdict == "pass"
    assert ev.feedback["reward_version"] == REWARD_VERSION
    assert [c["name"] for c in ev.feedback["checks"]] == ["executor", "expect", "within_timeout"]
    assert ev.feedback["timings"]["queue_wait"] == 1.0


def test_output_failing_expect_is_invalid_output() -> None:
    ev = evaluate(result(output={"txt": 1}, expect={"type": "object", "required": ["text"]}))
    assert ev.verdict == "fail"
    assert ev.error is not None and ev.error.error_class == ErrorClass.invalid_output
    assert "'text' is a required property" in ev.error.message
    assert ev.reward == -0.75


def test_executor_failure_keeps_its_class() -> None:
    ev = evaluate(result(ok=False, error=TaskError(error_class=ErrorClass.rate_limited, message="slow down")))
    assert ev.verdict == "fail" and ev.error is not None
    assert ev.error.error_class == ErrorClass.rate_limited
    assert ev.feedback["error_class"] == "rate_limited"


def test_an_output_over_the_size_limit_fails_whatever_the_executor_allowed() -> None:
    big = result(output={"text": "x" * 2000}, expect={"type": "object"})
    ev = evaluate(big, max_output_bytes=1000)
    assert ev.verdict == "fail" and ev.error is not None
    assert ev.error.error_class == ErrorClass.resource_exhausted
    assert ev.error.message == "output is 2011 bytes, over the limit of 1000 (DAGSMITH_MAX_OUTPUT_BYTES)"
    assert evaluate(big, max_output_bytes=4000).verdict == "pass"


def test_a_schema_that_cannot_be_checked_fails_the_attempt_and_scores_the_rest() -> None:
    """A schema stored before submission vetted its references: the evaluator says so as a
    permanent failure instead of raising (which stalled its whole batch)."""
    bad = evaluate(result(output={"a": 1}, expect={"$ref": "#/$defs/missing"}))
    assert bad.verdict == "fail" and bad.error is not None
    assert bad.error.error_class == ErrorClass.permanent and "expect could not be checked" in bad.error.message
    assert (
        evaluate(result(output="x", expect={"$ref": "#/$defs/s", "$defs": {"s": {"type": "string"}}})).verdict == "pass"
    )


def test_a_remote_reference_is_never_fetched() -> None:
    """With a listener on the referenced port, a fetch would be seen; the evaluator makes none."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        ev = evaluate(result(output=1, expect={"$ref": f"http://127.0.0.1:{port}/s.json"}))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    assert ev.verdict == "fail" and ev.error is not None and ev.error.error_class == ErrorClass.permanent


def test_the_evaluator_scores_a_result_it_cannot_evaluate_as_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from evaluator import service

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "evaluate", broken)
    ev = service._scored(result(output=1), None)
    assert (
        ev.verdict == "fail"
        and ev.error is not None
        and "could not score this result: RuntimeError: boom" in ev.error.message
    )


def test_an_expect_that_backtracks_for_ever_is_stopped_at_its_time_limit() -> None:
    """`(a+)+$` against forty a's and a '!' would take longer than the age of the machine; the
    evaluator scores its results one after another, so it must not wait (inside the event loop,
    on uvloop, as the service runs it)."""
    import asyncio
    import time

    import uvloop

    schema = {"type": "string", "pattern": "^(a+)+$"}

    async def score() -> tuple[float, str | None]:
        started = time.monotonic()
        ev = evaluate(result(output="a" * 40 + "!", expect=schema), expect_seconds=0.2)
        return time.monotonic() - started, ev.error.message if ev.error else None

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        took, message = runner.run(score())
    assert took < 5 and message is not None and "expect took longer than 0.2s" in message
    # A quick check is untouched by the limit, and the timer is gone afterwards.
    assert evaluate(result(output="aaa", expect=schema), expect_seconds=0.2).verdict == "pass"
    time.sleep(0.3)  # (nothing may fire: the test would error here if a timer were left armed)
