"""The executor process: consume task messages for the declared types, run them, report.

For every message: run the handler under its timeout, publish the result (with a publisher
confirm), *then* ack the task message — a crash in between redelivers the task rather than losing
it. Acks go out in runs (``executors.acks``). A bundle's tasks run side by side and the bundle is
acked when all their results are confirmed. Tasks that run longer than ``start_report_after``
report their start, and every heartbeat lists the running attempts so the controller extends
their leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import time
import traceback
import uuid
from collections import OrderedDict
from typing import Any

import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError

import dagsmith
from dagsmith.amqp import BatchPublisher, Names, Topology, connect, persistent
from dagsmith.errors import DagsmithError, ErrorClass
from dagsmith.logs import redact, scrub, secret_values
from dagsmith.messages import (
    BUNDLE,
    CancelMessage,
    EventEnvelope,
    HeartbeatMessage,
    ResultBatch,
    ResultMessage,
    StartedMessage,
    TaskBundle,
    TaskError,
    TaskMessage,
    TaskRef,
)
from dagsmith.metrics_http import serve_metrics
from dagsmith.settings import Settings
from executors.acks import Acker
from executors.registry import ExecutorOptions, ExecutorSpec, TaskContext, TaskFailed
from executors.threads import THREADS

log = structlog.get_logger(__name__)

DEFAULT_METRICS_PORT = 9103
START_REPORT_TIMEOUT = 5.0  # seconds a start report waits for the broker's confirm
TASKS_RUN = Counter("dagsmith_executor_tasks_total", "Task attempts run by this executor.", ["type", "outcome"])
TASK_SECONDS = Histogram("dagsmith_executor_task_seconds", "Handler run time.", ["type"])
RUNNING = Gauge("dagsmith_executor_running", "Task attempts running now.")


class PluginStartError(DagsmithError):
    """A class-based task type's ``start()`` failed: the executor does not start."""


async def _call(method: Any) -> None:
    """Call a plugin's start or stop, which may be sync or async."""
    result = method()
    if inspect.isawaitable(result):
        await result


async def start_plugins(specs: list[ExecutorSpec]) -> list[ExecutorSpec]:
    """Start the class-based types, in order. If one fails, those already started are stopped
    and :class:`PluginStartError` names the type and the error."""
    started: list[ExecutorSpec] = []
    for spec in specs:
        if spec.instance is None:
            continue
        try:
            await _call(spec.instance.start)
        except Exception as exc:
            await stop_plugins(started)
            raise PluginStartError(f"task type {spec.type!r} failed to start: {type(exc).__name__}: {exc}") from exc
        started.append(spec)
    return started


async def stop_plugins(specs: list[ExecutorSpec]) -> None:
    """Stop class-based types in the reverse order of their start; a failure is logged, not raised."""
    for spec in reversed(specs):
        if spec.instance is None:
            continue
        try:
            await _call(spec.instance.stop)
        except Exception:
            log.exception("task type failed to stop cleanly", type=spec.type)


async def execute(
    spec: ExecutorSpec,
    message: TaskMessage,
    options: ExecutorOptions,
    max_output_bytes: int,
    default_timeout: float | None = None,
) -> tuple[bool, Any, TaskError | None]:
    """Run one attempt of a task. Never raises (except CancelledError): failures become TaskErrors,
    with the values of the task's secret params masked wherever the error repeats them. A task
    whose spec sets no timeout gets ``default_timeout``."""
    timeout = message.timeout if message.timeout is not None else (default_timeout or None)
    ok, output, error = await _execute(spec, message, options, max_output_bytes, limit=timeout)
    if error is not None and message.secrets:
        # Not the output: downstream tasks and `expect` read it as it is (a connection string a
        # template built from a secret, say), and a substring match would corrupt unrelated text.
        error = scrub_error(error, secret_values(message.params, message.secrets))
    if error is not None:
        error = bound_error(error)
    return ok, output, error


MAX_ERROR_MESSAGE = 4_000  # characters of an error's message that are kept
MAX_ERROR_DETAILS = 16_000  # bytes of its details (as JSON); larger details are replaced


def bound_error(error: TaskError) -> TaskError:
    """An error small enough to store, log and show: a handler may put a whole response body or
    a huge exception text in it, and every error is kept with its attempt."""
    message, details = error.message, error.details
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + f"… [{len(error.message) - MAX_ERROR_MESSAGE} more characters]"
    size = len(orjson.dumps(details, default=str))
    if size > MAX_ERROR_DETAILS:
        details = {"truncated": True, "size": size, "keys": sorted(str(k) for k in details)[:50]}
    if message is error.message and details is error.details:
        return error
    return error.model_copy(update={"message": message, "details": details})


def scrub_error(error: TaskError, secrets: list[str]) -> TaskError:
    """``error`` with the secret texts masked: a handler's message may quote what it was given (a
    URL with a token in it, a response echoing the request's headers), and errors are stored,
    shown by the API and logged."""
    if not secrets:
        return error
    return error.model_copy(update={"message": scrub(error.message, secrets), "details": scrub(error.details, secrets)})


async def _execute(
    spec: ExecutorSpec, message: TaskMessage, options: ExecutorOptions, max_output_bytes: int, *, limit: float | None
) -> tuple[bool, Any, TaskError | None]:
    ctx = TaskContext(
        task_id=message.task_id,
        attempt=message.attempt,
        workflow_id=message.workflow_id,
        name=message.name,
        type=message.type,
        timeout=limit,
        options=options,
    )
    try:
        params: Any = message.params
        if spec.params_model is not None:
            params = spec.params_model.model_validate(message.params)
        if spec.is_async:
            call = spec.handler(params, ctx)
        else:
            call = THREADS.run(spec.handler, params, ctx)
        # asyncio.timeout runs the handler in this task; wait_for would wrap it in a new one, a
        # cost every no-op task paid once each has a timeout (the default applies to all).
        async with asyncio.timeout(limit):
            output = await call
        encoded = orjson.dumps(output)
        size = len(encoded)
        if b"\\u0000" in encoded:
            return (
                False,
                None,
                TaskError(
                    error_class=ErrorClass.permanent,
                    message="the output contains NUL characters (\\u0000), which cannot be stored",
                ),
            )
        if size > max_output_bytes:
            return (
                False,
                None,
                TaskError(
                    error_class=ErrorClass.resource_exhausted,
                    message=f"output is {size} bytes, over the limit of {max_output_bytes} (DAGSMITH_MAX_OUTPUT_BYTES)",
                    details={"size": size, "limit": max_output_bytes},
                ),
            )
        return True, output, None
    except TaskFailed as exc:
        return False, None, TaskError(error_class=exc.error_class, message=exc.message, details=exc.details)
    except ValidationError as exc:
        problems = [
            {"path": "params." + ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
            for e in exc.errors(include_url=False)
        ]
        return (
            False,
            None,
            TaskError(
                error_class=ErrorClass.invalid_input,
                message=f"invalid params for {message.type}: {problems[0]['path']}: {problems[0]['message']}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                details={"problems": problems},
            ),
        )
    except TimeoutError:
        return (
            False,
            None,
            TaskError(
                error_class=ErrorClass.timeout,
                message=f"the task did not finish within its timeout of {limit}s",
            ),
        )
    except TypeError as exc:
        if "JSON" in str(exc) or "serializable" in str(exc):
            return (
                False,
                None,
                TaskError(error_class=ErrorClass.permanent, message=f"output is not JSON: {exc}"),
            )
        return False, None, _unexpected(exc)
    except Exception as exc:
        return False, None, _unexpected(exc)


def _unexpected(exc: Exception) -> TaskError:
    tail = traceback.format_exception(exc)[-3:]
    return TaskError(
        error_class=ErrorClass.unknown,
        message=f"{type(exc).__name__}: {exc}",
        details={"traceback": "".join(tail)[-2000:]},
    )


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """The broker's count of earlier deliveries (quorum queues set it; 0 when absent or odd)."""
    try:
        return max(int(str((message.headers or {}).get("x-delivery-count") or 0)), 0)
    except ValueError:
        return 0


class ExecutorRuntime:
    def __init__(
        self,
        settings: Settings,
        specs: list[ExecutorSpec],
        *,
        options: ExecutorOptions | None = None,
        concurrency: int | None = None,
        executor_id: str | None = None,
    ) -> None:
        self.options = options or ExecutorOptions()
        gated = [s.type for s in specs if self.options.needs(s.type)]
        if gated:
            log.info("task types not enabled on this executor are not declared", types=gated)
        specs = [s for s in specs if s.type not in gated]
        if not specs:
            raise ValueError("an executor needs at least one task type")
        self.settings = settings
        self.specs = {s.type: s for s in specs}
        self.concurrency = concurrency or settings.executor_concurrency
        self.id = executor_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.names = Names(settings.amqp_prefix)
        self.slots = asyncio.Semaphore(self.concurrency)
        self.running: dict[tuple[int, int], tuple[TaskMessage, asyncio.Task[Any]]] = {}  # -> (task, runner)
        # Recently cancelled (or failed) workflows, with when: their tasks dispatched until then stop.
        self.cancelled: OrderedDict[str, float] = OrderedDict()
        # Attempts that reported their start (the controller gave them a lease), and those whose
        # result the broker has since confirmed, with when: heartbeats list the latter for one
        # lease lifetime, so a lease set again by a late start report is ended again.
        self.reported: set[tuple[int, int]] = set()
        self.late_reports: set[asyncio.Future[None]] = set()  # held so they are not collected mid-flight
        self.handed_off: dict[tuple[int, int], float] = {}
        self.acks = Acker()
        self.stopping = False
        self.completed = 0
        # Cancellations broadcast before this executor connected are not in ``cancelled``: messages
        # dispatched before it started wait (briefly) for the snapshot a controller sends it.
        self.started_at = time.time()
        self.caught_up = asyncio.Event()
        self.control_queue: str | None = None

    async def _publish(self, channel: AbstractChannel, queue: str, body: bytes) -> None:
        # Heartbeats and start reports are sent again soon or are only an early word: one that no
        # queue takes (no controller declared it yet) is dropped, not an error. Results are not
        # sent this way (BatchPublisher: mandatory, declared again when they come back).
        await channel.default_exchange.publish(persistent(body), routing_key=queue, mandatory=False)

    async def _on_task(self, message: AbstractIncomingMessage) -> None:
        self.acks.delivered(message)
        try:
            if message.type == BUNDLE:
                tasks = TaskBundle.model_validate_json(message.body).tasks
            else:
                tasks = [TaskMessage.model_validate_json(message.body)]
        except ValidationError as exc:
            log.error("rejecting unreadable task message; it is dead-lettered", error=str(exc)[:300])
            await self.acks.reject(message, requeue=False)
            return
        specs = [self.specs.get(task.type) for task in tasks]
        if None in specs:  # a queue we consume carries a type we do not run: give it back
            await self.acks.reject(message, requeue=True)
            return
        if not self.caught_up.is_set() and any(0 < t.dispatched_at < self.started_at for t in tasks):
            await self._catch_up()
        delivery = _delivery_count(message)
        try:
            # A bundle's members run side by side, each in its own slot; the message is acked
            # once every member's result is confirmed.
            await asyncio.gather(
                *(
                    self._run(task, spec, delivery)
                    for task, spec in zip(tasks, specs, strict=True)
                    if spec is not None and not self._is_cancelled(task)
                )
            )
        except Exception:
            # A bug in handling the message (results wait out broker outages in BatchPublisher): give it
            # back rather than hold it unacked for ever; the delivery limit ends a repeat.
            log.exception("could not handle a task message; it goes back to its queue")
            await self.acks.reject(message, requeue=True)
        else:
            self.acks.finished(message)

    def _is_cancelled(self, task: TaskMessage) -> bool:
        """Whether ``task`` was dispatched before its workflow was cancelled (a later dispatch is a
        surgery's, on the workflow brought back)."""
        at = self.cancelled.get(task.workflow_id)
        return at is not None and task.dispatched_at <= at

    async def _run(self, task: TaskMessage, spec: ExecutorSpec, delivery: int) -> None:
        async with self.slots:
            await self._attempt(task, spec, delivery)

    async def _attempt(self, task: TaskMessage, spec: ExecutorSpec, delivery: int) -> None:
        started_at = time.time()
        key = (task.task_id, task.attempt)
        if delivery > 0:
            # A redelivery is reported before it runs (and confirmed by the broker): if it then
            # crashes this process, the controller knows the message was started, and fails it as
            # poison at the delivery limit instead of taking the returns for dropped connections.
            self.reported.add(key)
            await self._report_started(task, started_at, delivery)
            reporter = None
        else:
            # First deliveries report only if they run a while: most tasks finish sooner, and the
            # result then says when they started.
            def report_late() -> None:
                # Marked now, not when the report's coroutine first runs: the attempt may end in
                # between, and its result must then be handed off as that of a reported attempt.
                self.reported.add(key)
                report = asyncio.ensure_future(self._report_started(task, started_at, delivery))
                self.late_reports.add(report)
                report.add_done_callback(self.late_reports.discard)

            reporter = asyncio.get_running_loop().call_later(self.settings.start_report_after, report_late)
        runner = asyncio.ensure_future(self._execute(spec, task))
        self.running[key] = (task, runner)
        if self._is_cancelled(task):  # cancelled while its start report was on its way
            runner.cancel()
        RUNNING.inc()
        try:
            ok, output, error = await runner
        except asyncio.CancelledError:
            if not self._is_cancelled(task):
                # Not a cancelled workflow: shutting down, or the broker connection dropped. Leave the
                # message unacked so the attempt runs again (here or elsewhere) instead of reporting
                # a non-retryable "cancelled" for a task nobody cancelled.
                raise
            ok, output, error = False, None, TaskError(error_class=ErrorClass.cancelled, message="cancelled")
        finally:
            if reporter is not None:
                reporter.cancel()
            self.running.pop(key, None)
            RUNNING.dec()
            has_lease = key in self.reported
            self.reported.discard(key)
        finished_at = time.time()
        TASK_SECONDS.labels(task.type).observe(finished_at - started_at)
        TASKS_RUN.labels(task.type, "ok" if ok else str(error.error_class if error else "error")).inc()
        if not ok:
            log.info(
                "task failed",
                workflow_id=task.workflow_id,
                task_id=task.task_id,
                attempt=task.attempt,
                task=task.name,
                error_class=str(error.error_class) if error else None,
                error=error.message if error else None,
                params=redact(task.params, task.secrets),
            )
        result = ResultMessage(
            task=TaskRef.model_construct(**{f: getattr(task, f) for f in TaskRef.model_fields}),
            executor_id=self.id,
            ok=ok,
            output=output,
            error=error,
            started_at=started_at,
            finished_at=finished_at,
        )
        await self.results.publish([result])  # waits out a broker reconnect; the message stays unacked
        if has_lease:
            self.handed_off[key] = time.monotonic()
        self.completed += 1

    async def _report_started(self, task: TaskMessage, started_at: float, delivery: int) -> None:
        """Tell the controller the attempt started (the caller has marked it in ``reported``)."""
        event = StartedMessage(
            task_id=task.task_id,
            attempt=task.attempt,
            workflow_id=task.workflow_id,
            type=task.type,
            executor_id=self.id,
            started_at=started_at,
            dispatched_at=task.dispatched_at,
            delivery=delivery,
            series=task.series,
        )
        # Bounded: a broker that blocks publishers (a resource alarm) must not hold the task back.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(START_REPORT_TIMEOUT):
                await self._publish(
                    self.channel, self.names.events, EventEnvelope(event=event).model_dump_json().encode()
                )

    async def _execute(self, spec: ExecutorSpec, task: TaskMessage) -> tuple[bool, Any, TaskError | None]:
        # Runs as a task of its own, in its own copy of the context: the ids bound here are on every
        # line the handler logs (or a plugin's own structlog logger), and nowhere else.
        structlog.contextvars.bind_contextvars(
            workflow_id=task.workflow_id, task_id=task.task_id, attempt=task.attempt, task=task.name
        )
        return await execute(
            spec, task, self.options, self.settings.max_output_bytes, self.settings.default_task_timeout
        )

    async def _reconnected(self, _connection: object) -> None:
        """Back from a lost connection: cancellations may have been broadcast meanwhile. Messages
        dispatched before now wait for them again, and a heartbeat asks for them at once."""
        self.started_at = time.time()
        self.caught_up.clear()
        with contextlib.suppress(Exception):
            body = EventEnvelope(event=self.heartbeat()).model_dump_json().encode()
            await self._publish(self.channel, self.names.events, body)

    async def _catch_up(self) -> None:
        """Wait for the cancellations sent before this executor connected (a controller answers
        its first heartbeat with them), for two heartbeat intervals at most: with no controller
        running, nothing is being cancelled either."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.caught_up.wait(), timeout=2 * self.settings.heartbeat_interval)
        if not self.caught_up.is_set():
            log.info("no cancellation snapshot came; running tasks queued before this executor started")
            self.caught_up.set()

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(ValidationError):
            cancel = CancelMessage.model_validate_json(message.body)
            if cancel.snapshot:
                self.caught_up.set()
            # A snapshot lists the newest first: the oldest go in first, so they are the first evicted.
            for wid, at in reversed(cancel.times(time.time()).items()):
                self.cancelled[wid] = max(at, self.cancelled.get(wid, at))
                self.cancelled.move_to_end(wid)
                while len(self.cancelled) > 10_000:
                    self.cancelled.popitem(last=False)
            for task, runner in list(self.running.values()):
                if self._is_cancelled(task) and not runner.done():
                    runner.cancel()
        await message.ack()

    def heartbeat(self) -> HeartbeatMessage:
        horizon = time.monotonic() - self.settings.lease_ttl
        for key in [k for k, at in self.handed_off.items() if at < horizon]:
            del self.handed_off[key]
        return HeartbeatMessage(
            executor_id=self.id,
            version=dagsmith.__version__,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            concurrency=self.concurrency,
            capabilities=[s.capability() for s in self.specs.values()],
            running=list(self.running),
            handed_off=list(self.handed_off),
            stopping=self.stopping,
            control_queue=self.control_queue,
            wants_cancellations=not self.caught_up.is_set(),
        )

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(Exception):
                body = EventEnvelope(event=self.heartbeat()).model_dump_json().encode()
                await self._publish(self.channel, self.names.events, body)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.heartbeat_interval)
            if stop.is_set():
                return

    async def run(self, stop: asyncio.Event) -> None:
        started = await start_plugins(list(self.specs.values()))
        try:
            await self._serve(stop)
        finally:
            await stop_plugins(started)

    async def _serve(self, stop: asyncio.Event) -> None:
        serve_metrics(self.settings.metrics_port, DEFAULT_METRICS_PORT, "executor", self.settings.metrics_host)
        connection = await connect(
            self.settings.amqp_url.get_secret_value(),
            name=f"dagsmith-executor-{self.id}",
            heartbeat=self.settings.amqp_heartbeat,
            stop=stop,
        )
        self.channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self.results: BatchPublisher[ResultMessage] = BatchPublisher(
            self.channel,
            self.names.results,
            lambda items: ResultBatch(results=items).model_dump_json(by_alias=True).encode(),
        )
        self.results.start()
        consume = await connection.channel()
        await consume.set_qos(prefetch_count=self.concurrency)
        topology = Topology(consume, self.names, self.settings.max_deliveries)
        await topology.queue(self.names.results)
        await topology.queue(self.names.events)
        consumers: list[tuple[AbstractQueue, str]] = []
        # Control messages get their own channel: task messages are acked in runs (``multiple``),
        # which must never cover a delivery that is not a task's. The control queue comes first,
        # and the first heartbeat (which names it) goes out before any task is taken.
        control = await connection.channel()
        control_queue = await control.declare_queue(
            f"{self.names.control_exchange}.{self.id}", exclusive=True, auto_delete=True
        )
        await control_queue.bind(await topology.control_exchange())
        consumers.append((control_queue, await control_queue.consume(self._on_control)))
        self.control_queue = control_queue.name
        connection.reconnect_callbacks.add(self._reconnected)
        heartbeats = asyncio.create_task(self._heartbeats(stop))
        for task_type in self.specs:
            queue = await topology.task_queue(task_type)
            consumers.append((queue, await queue.consume(self._on_task)))
        log.info("executor started", executor_id=self.id, types=sorted(self.specs), concurrency=self.concurrency)
        await stop.wait()
        # Graceful stop: take no new work, let running tasks finish for a while, then leave the
        # rest unacked so the broker redelivers them to another executor.
        self.stopping = True
        for queue, tag in consumers:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        if self.running:
            log.info("waiting for running tasks", running=len(self.running))
            await asyncio.wait([r for _, r in self.running.values()], timeout=self.settings.shutdown_grace)
        heartbeats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeats
        with contextlib.suppress(Exception):
            await self._publish(
                self.channel,
                self.names.events,
                EventEnvelope(event=self.heartbeat()).model_dump_json().encode(),
            )
        await self.results.stop()
        await connection.close()
        log.info("executor stopped", executor_id=self.id, completed=self.completed)
