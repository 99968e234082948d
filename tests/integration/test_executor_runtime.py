"""The executor runtime against the real broker: task in, result out, ack after publish."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue

from dagsmith.amqp import Names, Topology
from dagsmith.errors import ErrorClass
from dagsmith.messages import BUNDLE, CancelMessage, ResultBatch, ResultMessage, TaskError, TaskMessage, encode_bundle
from dagsmith.settings import Settings
from executors.registry import Executor, ExecutorOptions, Registry, TaskContext, TaskFailed, executor
from executors.runtime import ExecutorRuntime, execute

local = Registry()


@executor("test.echo", into=local)
async def _echo(params: dict[str, object], ctx: TaskContext) -> dict[str, object]:
    return {"params": params, "key": ctx.idempotency_key}


@executor("test.sync", into=local)
def _sync(params: dict[str, object], ctx: TaskContext) -> int:
    return 41 + 1


@executor("test.raise", into=local)
async def _raise(params: dict[str, object], ctx: TaskContext) -> None:
    raise TaskFailed("rate_limited", "slow down", {"retry_after": 3})


@executor("test.bug", into=local)
async def _bug(params: dict[str, object], ctx: TaskContext) -> None:
    raise KeyError("oops")


@executor("test.slow", into=local)
async def _slow(params: dict[str, object], ctx: TaskContext) -> None:
    await asyncio.sleep(10)


@executor("test.quote", into=local)
async def _quote(params: dict[str, object], ctx: TaskContext) -> None:
    raise TaskFailed("unavailable", f"GET {params['url']} failed", {"url": params["url"], "tries": [params["url"]]})


@executor("test.nap", into=local)
async def _nap(params: dict[str, float], ctx: TaskContext) -> None:
    await asyncio.sleep(params["s"])


@executor("test.context", into=local)
async def _context(params: dict[str, object], ctx: TaskContext) -> dict[str, object]:
    import structlog

    return {k: v for k, v in structlog.contextvars.get_contextvars().items() if k != "service"}


@executor("test.big", into=local)
async def _big(params: dict[str, object], ctx: TaskContext) -> str:
    return "x" * 2000


@executor("test.session", into=local)
class _Session(Executor):
    """Keeps a connection-like object open from start to stop."""

    def __init__(self) -> None:
        self.session: dict[str, int] | None = None
        self.closed = False

    async def start(self) -> None:
        self.session = {"uses": 0}

    async def stop(self) -> None:
        self.closed = True

    async def run(self, params: dict[str, object], ctx: TaskContext) -> dict[str, int]:
        assert self.session is not None, "run before start"
        self.session["uses"] += 1
        return dict(self.session)


def msg(task_type: str, timeout: float | None = None, **params: object) -> TaskMessage:
    return TaskMessage(task_id=7, attempt=2, workflow_id="w", name="t", type=task_type, params=params, timeout=timeout)


async def run(task_type: str, timeout: float | None = None, **params: object) -> tuple[bool, object, object]:
    spec = local.get(task_type)
    assert spec is not None
    return await execute(spec, msg(task_type, timeout, **params), ExecutorOptions(), max_output_bytes=1000)


async def test_execute_outcomes() -> None:
    assert await run("test.echo", a=1) == (True, {"params": {"a": 1}, "key": "7:2"}, None)
    assert await run("test.sync") == (True, 42, None)
    ok, _, error = await run("test.raise")
    assert not ok and error.error_class == ErrorClass.rate_limited and error.details == {"retry_after": 3}  # type: ignore[union-attr]
    ok, _, error = await run("test.bug")
    assert error.error_class == ErrorClass.unknown and "KeyError" in error.message  # type: ignore[union-attr]
    ok, _, error = await run("test.slow", timeout=0.1)
    assert error.error_class == ErrorClass.timeout  # type: ignore[union-attr]
    ok, _, error = await run("test.big")
    assert error.error_class == ErrorClass.resource_exhausted  # type: ignore[union-attr]
    # A task whose spec sets no timeout gets the executor's default (DAGSMITH_DEFAULT_TASK_TIMEOUT).
    slow = local.get("test.slow")
    assert slow is not None
    ok, _, error = await execute(slow, msg("test.slow"), ExecutorOptions(), max_output_bytes=1000, default_timeout=0.1)
    assert error is not None and error.error_class == ErrorClass.timeout and "0.1s" in error.message


async def test_an_error_never_repeats_a_secret_params_value() -> None:
    spec = local.get("test.quote")
    assert spec is not None
    url = "https://api.example.com/v1?token=tok-123456"
    message = msg("test.quote", url=url, token="tok-123456").model_copy(update={"secrets": ["token"]})
    ok, _, error = await execute(spec, message, ExecutorOptions(), max_output_bytes=1000)
    assert not ok and error is not None
    assert error.message == "GET https://api.example.com/v1?token=*** failed"
    assert error.details == {
        "url": "https://api.example.com/v1?token=***",
        "tries": ["https://api.example.com/v1?token=***"],
    }
    # without secrets the message is left as it is
    _, _, plain = await execute(spec, msg("test.quote", url=url), ExecutorOptions(), max_output_bytes=1000)
    assert plain is not None and plain.message == f"GET {url} failed"


async def test_a_structured_secret_is_masked_leaf_by_leaf_in_the_error_but_the_output_is_left_whole() -> None:
    """HTTP headers are a dict: each of its values is masked where the error (a 401 body echoing
    the request) repeats it. The output is not touched: downstream tasks read it as it is."""
    headers = {"Authorization": "Bearer HDRSECRET42", "X-Keys": ["k-9876543", "ok"]}
    quoting = local.get("test.quote")
    assert quoting is not None
    message = msg("test.quote", url="https://x.example/?h=Bearer HDRSECRET42&k=k-9876543", headers=headers)
    _, _, error = await execute(
        quoting, message.model_copy(update={"secrets": ["headers"]}), ExecutorOptions(), max_output_bytes=1000
    )
    assert error is not None and error.message == "GET https://x.example/?h=***&k=*** failed", error.message
    echo = local.get("test.echo")
    assert echo is not None
    echoed = msg("test.echo", headers=headers).model_copy(update={"secrets": ["headers"]})
    ok, output, _ = await execute(echo, echoed, ExecutorOptions(), max_output_bytes=10_000)
    assert ok and output["params"] == {"headers": headers}  # type: ignore[index]


async def test_huge_errors_are_cut_to_a_storable_size() -> None:
    from executors.runtime import MAX_ERROR_DETAILS, MAX_ERROR_MESSAGE, bound_error

    huge = TaskError(error_class=ErrorClass.unavailable, message="x" * 50_000, details={"body": "y" * 50_000})
    bounded = bound_error(huge)
    assert len(bounded.message) < MAX_ERROR_MESSAGE + 50 and bounded.message.endswith("[46000 more characters]")
    assert bounded.details == {"truncated": True, "size": 50_011, "keys": ["body"]}
    assert len(bounded.model_dump_json()) < MAX_ERROR_MESSAGE + MAX_ERROR_DETAILS
    small = TaskError(error_class=ErrorClass.unavailable, message="short", details={"a": 1})
    assert bound_error(small) is small


async def test_builtin_params_are_validated() -> None:
    import executors.builtins  # noqa: F401
    from executors.registry import registry

    spec = registry.get("text.upper")
    assert spec is not None
    ok, _, error = await execute(spec, msg("text.upper", nope=1), ExecutorOptions(), 1000)
    assert not ok and error is not None
    assert error.error_class == ErrorClass.invalid_input
    assert error.details["problems"][0]["path"] == "params.text"
    assert error.message.startswith("invalid params for text.upper: params.text: ")  # the reason, not only the fact


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[tuple[aio_pika.abc.AbstractChannel, Names, Settings]]:
    prefix = settings.amqp_prefix + "rt"
    s = settings.model_copy(update={"amqp_prefix": prefix})
    connection = await aio_pika.connect(s.amqp_url.get_secret_value())
    channel = await connection.channel()
    yield channel, Names(prefix), s
    for queue in (
        Names(prefix).results,
        Names(prefix).events,
        Names(prefix).task_queue("test.echo"),
        Names(prefix).task_queue("test.nap"),
        Names(prefix).task_queue("test.context"),
        Names(prefix).task_queue("test.session"),
        Names(prefix).dead_queue,
    ):
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
    await connection.close()


async def test_runtime_consumes_runs_and_reports(broker: tuple[aio_pika.abc.AbstractChannel, Names, Settings]) -> None:
    channel, names, s = broker
    topology = Topology(channel, names)
    results = await topology.queue(names.results)
    async with running_executor(s, "test.echo", concurrency=2) as runtime:
        await send(topology, msg("test.echo", x=1))
        result = await first_result(results)
        assert result.ok
        assert result.output == {"params": {"x": 1}, "key": "7:2"}
        assert result.task.task_id == 7 and result.task.attempt == 2
        assert result.executor_id == runtime.id
        queue = await channel.declare_queue(names.task_queue("test.echo"), passive=True)
        assert queue.declaration_result.message_count == 0  # acked after the result went out


async def send(topology: Topology, *messages: TaskMessage) -> None:
    """Publish task messages as the controller does, each to its type's queue (declared first)."""
    exchange = await topology.tasks_exchange()
    for message in messages:
        await topology.task_queue(message.type)
        await exchange.publish(aio_pika.Message(message.model_dump_json().encode()), routing_key=message.type)


async def collect_task_ids(results: AbstractQueue, n: int) -> list[int]:
    """Task ids of the first ``n`` results, in the order they arrive."""
    seen: list[int] = []
    async with asyncio.timeout(30):
        async with results.iterator() as it:
            async for incoming in it:
                seen += [r.task.task_id for r in ResultBatch.model_validate_json(incoming.body).results]
                await incoming.ack()
                if len(seen) >= n:
                    return seen
    return seen


@contextlib.asynccontextmanager
async def running_executor(settings: Settings, task_type: str, concurrency: int) -> AsyncIterator[ExecutorRuntime]:
    """An executor of one test type, stopped (connection closed) on the way out."""
    runtime = ExecutorRuntime(settings, [local.get(task_type)], concurrency=concurrency)  # type: ignore[list-item]
    stop = asyncio.Event()
    running = asyncio.create_task(runtime.run(stop))
    try:
        yield runtime
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)


async def first_result(results: AbstractQueue) -> ResultMessage:
    async with asyncio.timeout(20):
        async with results.iterator() as it:
            async for incoming in it:
                (result,) = ResultBatch.model_validate_json(incoming.body).results
                await incoming.ack()
                return result
    raise AssertionError("no result")


async def test_every_task_message_is_acked_once_whatever_order_tasks_finish_in(
    broker: tuple[aio_pika.abc.AbstractChannel, Names, Settings],
) -> None:
    """Acks go out in runs: slow tasks between fast ones must neither hold back nor lose an ack.
    Stopping the executor closes its connection, which would put any unacked message back."""
    channel, names, s = broker
    topology = Topology(channel, names)
    results = await topology.queue(names.results)
    naps = [0.4 if i in (0, 9) else 0.2 if i == 15 else 0.0 for i in range(30)]
    async with running_executor(s, "test.nap", concurrency=8) as runtime:
        await send(
            topology,
            *(
                TaskMessage(task_id=i, attempt=1, workflow_id="w", name=f"t{i}", type="test.nap", params={"s": nap})
                for i, nap in enumerate(naps)
            ),
        )
        seen = await collect_task_ids(results, len(naps))
        assert sorted(seen) == list(range(len(naps)))
        assert seen[-1] in (0, 9)  # the slow ones finished last, after the fast ones were acked
    queue = await channel.declare_queue(names.task_queue("test.nap"), passive=True)
    assert queue.declaration_result.message_count == 0
    assert runtime.completed == len(naps)


async def test_a_bundle_runs_every_member_and_is_acked_once_all_are_confirmed(
    broker: tuple[aio_pika.abc.AbstractChannel, Names, Settings],
) -> None:
    channel, names, s = broker
    topology = Topology(channel, names)
    results = await topology.queue(names.results)
    members = [
        TaskMessage(task_id=i, attempt=1, workflow_id="w", name=f"t{i}", type="test.nap", params={"s": 0.05})
        for i in range(5)
    ]
    async with running_executor(s, "test.nap", concurrency=2) as runtime:
        exchange = await topology.tasks_exchange()
        await topology.task_queue("test.nap")
        body = encode_bundle([m.model_dump_json().encode() for m in members])
        await exchange.publish(aio_pika.Message(body, type=BUNDLE), routing_key="test.nap")
        assert sorted(await collect_task_ids(results, len(members))) == [0, 1, 2, 3, 4]
    queue = await channel.declare_queue(names.task_queue("test.nap"), passive=True)
    assert queue.declaration_result.message_count == 0  # acked (a closed connection would requeue it)
    assert runtime.completed == len(members)


async def test_messages_of_a_cancelled_workflow_are_dropped_unrun(
    broker: tuple[aio_pika.abc.AbstractChannel, Names, Settings],
) -> None:
    """After the controller's cancel broadcast, a queued task of that workflow dispatched before
    the cancellation is acked without running (no result); one dispatched after it (the workflow
    was brought back by a surgery) runs, and so does the next task, of another workflow."""
    channel, names, s = broker
    topology = Topology(channel, names)
    results = await topology.queue(names.results)
    at = time.time()
    async with running_executor(s, "test.echo", concurrency=1) as runtime:
        control = await topology.control_exchange()
        cancel = aio_pika.Message(CancelMessage(workflow_ids=["w-gone"], at=[at]).model_dump_json().encode())
        async with asyncio.timeout(20):
            while "w-gone" not in runtime.cancelled:  # sent again until the executor's queue is bound
                await control.publish(cancel, routing_key="")
                await asyncio.sleep(0.1)
        gone = msg("test.echo").model_copy(update={"workflow_id": "w-gone", "task_id": 8, "dispatched_at": at - 1})
        revived = msg("test.echo").model_copy(update={"workflow_id": "w-gone", "task_id": 9, "dispatched_at": at + 1})
        await send(topology, gone, revived, msg("test.echo"))
        assert sorted(await collect_task_ids(results, 2)) == [7, 9]
        queue = await channel.declare_queue(names.task_queue("test.echo"), passive=True)
        assert queue.declaration_result.message_count == 0  # the cancelled one was acked, not requeued
        results_left = await channel.declare_queue(names.results, passive=True)
        assert results_left.declaration_result.message_count == 0  # and it reported nothing


async def test_what_a_handler_logs_carries_the_tasks_ids(
    broker: tuple[aio_pika.abc.AbstractChannel, Names, Settings],
) -> None:
    channel, names, s = broker
    topology = Topology(channel, names)
    results = await topology.queue(names.results)
    async with running_executor(s, "test.context", concurrency=1):
        await send(topology, msg("test.context"))
        result = await first_result(results)
        assert result.output == {"workflow_id": "w", "task_id": 7, "attempt": 2, "task": "t"}


async def test_an_executor_asks_for_the_cancellations_it_missed_and_drops_their_old_messages(
    broker: tuple[aio_pika.abc.AbstractChannel, Names, Settings],
) -> None:
    """A message of a workflow cancelled before this executor connected waits for the snapshot the
    controller sends on the executor's first heartbeat (this test plays the controller), then is
    dropped unrun; messages dispatched after the executor started do not wait."""
    from dagsmith.messages import EventEnvelope, HeartbeatMessage

    channel, names, s = broker
    topology = Topology(channel, names)
    results = await topology.queue(names.results)
    events = await topology.queue(names.events)
    old = msg("test.echo").model_copy(update={"workflow_id": "w-gone", "task_id": 8, "dispatched_at": time.time()})
    await send(topology, old)
    async with running_executor(s, "test.echo", concurrency=1) as runtime:
        async with asyncio.timeout(20):
            async with events.iterator() as it:
                async for incoming in it:
                    event = EventEnvelope.model_validate_json(incoming.body).event
                    await incoming.ack()
                    if isinstance(event, HeartbeatMessage) and event.wants_cancellations:
                        break
        assert event.control_queue and not runtime.caught_up.is_set()
        snapshot = CancelMessage(workflow_ids=["w-gone"], snapshot=True).model_dump_json().encode()
        await channel.default_exchange.publish(aio_pika.Message(snapshot), routing_key=event.control_queue)
        await send(topology, msg("test.echo").model_copy(update={"dispatched_at": time.time()}))
        assert await collect_task_ids(results, 1) == [7]
        assert "w-gone" in runtime.cancelled and runtime.caught_up.is_set()
        assert not runtime.heartbeat().wants_cancellations
        queue = await channel.declare_queue(names.task_queue("test.echo"), passive=True)
        assert queue.declaration_result.message_count == 0
        left = await channel.declare_queue(names.results, passive=True)
        assert left.declaration_result.message_count == 0  # nothing was reported for the cancelled one


async def test_a_class_based_type_is_started_before_its_tasks_and_stopped_after(
    broker: tuple[aio_pika.abc.AbstractChannel, Names, Settings],
) -> None:
    channel, names, s = broker
    topology = Topology(channel, names)
    results = await topology.queue(names.results)
    spec = local.get("test.session")
    assert spec is not None and isinstance(spec.instance, _Session)
    async with running_executor(s, "test.session", concurrency=1):
        await send(topology, *(msg("test.session").model_copy(update={"task_id": t}) for t in (1, 2)))
        outputs = sorted(str(r.output) for r in [await first_result(results), await first_result(results)])
        assert outputs == [str({"uses": 1}), str({"uses": 2})]  # one session, shared by both tasks
        assert not spec.instance.closed
    assert spec.instance.closed
