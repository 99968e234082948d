"""The controller process: consumes executor reports, wakes on NOTIFY and timers, runs rounds.

Woken, never polling: a round runs when a message arrives, when the API notifies a new or
cancelled workflow, or when the earliest backoff/lease timer is due. A slow resync
(``DAGSMITH_RESYNC_INTERVAL``) catches anything a crash may have dropped on the floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aio_pika
import psycopg
import sqlalchemy as sa
import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from controller import metrics, retention, store
from controller.correct import ACTIVE_VERSION, Corrector
from controller.db import CHANNEL_WORKFLOWS, create_engine, in_transaction, wait_for_database
from controller.dispatch import Publisher
from controller.engine import Engine, Inbound, RoundResult
from controller.held import HeldWorkflows
from controller.migrate import SchemaOutdated, schema_state
from controller.policies import CHANNEL_POLICIES, PolicyBox
from dagsmith.amqp import Names, Topology, connect, persistent
from dagsmith.messages import (
    BUNDLE,
    CancelMessage,
    EvaluatedBatch,
    EventEnvelope,
    HeartbeatMessage,
    TaskBundle,
    TaskMessage,
    TaskRef,
)
from dagsmith.metrics_http import serve_metrics
from dagsmith.settings import Settings

log = structlog.get_logger(__name__)

DEFAULT_METRICS_PORT = 9101
# Seconds of cancelled and failed workflows an executor is told about (retention keeps them that long).
CANCELLATION_MEMORY = retention.ENDED_MEMORY
RETENTION_INTERVAL = 300.0  # seconds between the controller's passes over workflows past retention
RETENTION_PAUSE = 0.5  # seconds between two of a pass's batches

# RabbitMQ is unreachable or the channel is gone; the robust connection restores both.
BROKER_ERRORS = (
    aio_pika.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPConnectionError,
    aio_pika.exceptions.AMQPChannelError,
    aio_pika.exceptions.DeliveryError,  # a task message came back unroutable (its queue was deleted)
)


async def _settle(message: AbstractIncomingMessage, *, requeue: bool = False) -> None:
    """Ack a message (or give it back). If the channel it came on has closed, the broker has already
    requeued it and will deliver it again; applying it twice changes nothing."""
    try:
        if requeue:
            await message.nack(requeue=True)
        else:
            await message.ack()
    except BROKER_ERRORS:
        log.info("message not settled: its channel closed, the broker delivers it again")


class Controller:
    def __init__(self, settings: Settings, engine_class: type[Engine] = Engine) -> None:
        self.settings = settings
        self.engine_class = engine_class
        self.names = Names(settings.amqp_prefix)
        self.inbox: list[tuple[str, Any, AbstractIncomingMessage | None]] = []
        self.dirty: set[uuid.UUID] = set()
        self.held = HeldWorkflows()  # workflows whose rounds failed, waiting to be tried again
        self.wake = asyncio.Event()
        # A timer per workflow waiting out a retry's backoff, so the retry goes when it is due
        # rather than at the next resync (several seconds later for a 100 ms backoff).
        self.timers: dict[uuid.UUID, tuple[float, asyncio.TimerHandle]] = {}
        self.resync_now = asyncio.Event()
        self.policy_changed = asyncio.Event()
        self.heartbeats: asyncio.Queue[tuple[HeartbeatMessage, AbstractIncomingMessage]] = asyncio.Queue()
        self.known_capabilities: dict[str, str] = {}
        self.rounds = 0

    # --- inbound ---------------------------------------------------------------------------

    async def _on_evaluated(self, message: AbstractIncomingMessage) -> None:
        try:
            parsed = EvaluatedBatch.model_validate_json(message.body)
        except ValidationError as exc:
            log.error("dropping unreadable evaluated batch", error=str(exc)[:500])
            await message.reject()
            return
        self.inbox.append(("evaluated", parsed.items, message))
        self.wake.set()

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        try:
            event = EventEnvelope.model_validate_json(message.body).event
        except ValidationError as exc:
            log.error("dropping unreadable executor event", error=str(exc)[:500])
            await message.reject()
            return
        if isinstance(event, HeartbeatMessage):
            await self.heartbeats.put((event, message))
        else:
            self.inbox.append(("started", event, message))
            self.wake.set()

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        if message.type == BUNDLE:
            await self._split(message)
            return
        try:
            parsed = TaskMessage.model_validate_json(message.body)
        except ValidationError:
            await message.reject()
            return
        headers = message.headers or {}
        deliveries = int(str(headers.get("x-delivery-count") or self.settings.max_deliveries))
        self.inbox.append(("dead", (parsed, deliveries), message))
        self.wake.set()

    async def _split(self, message: AbstractIncomingMessage) -> None:
        """A bundle reached the delivery limit: one of its tasks may be poison, or none (executors
        that died of something else). Its tasks go out again one per message, with their own
        delivery counts, so only a poison task is failed as poison."""
        try:
            bundle = TaskBundle.model_validate_json(message.body)
        except ValidationError:
            await message.reject()
            return
        # A new series each: the members' start reports in the bundle are not theirs alone.
        singles = [t.model_copy(update={"series": t.series + 1}) for t in bundle.tasks]

        async def requeue_and_send(conn: Any) -> None:
            # As a round's redrive does, and under the same workflow locks (so a member's start
            # report, which waits for them, comes after): the members are queued again with no
            # lease. Left running under the crashed executor's lease, a healthy member whose single
            # message waited longer than the lease would be failed as lost.
            await store.lock_workflows(conn, {uuid.UUID(t.workflow_id) for t in singles})
            await store.requeue_sent_again(conn, [(t.task_id, t.attempt) for t in singles], time.time())
            await self.publisher.publish_singles(singles)  # before the commit, as a round publishes

        try:
            await in_transaction(self.db, requeue_and_send, what="split bundle", attempts=5)
        except Exception as exc:  # the broker or the database: nothing was committed
            log.warning("could not split a dead-lettered bundle; it is retried", error=str(exc)[:200])
            await _settle(message, requeue=True)
            return
        metrics.BUNDLES_SPLIT.inc()
        log.warning("a bundle was dead-lettered; its tasks are sent one by one", tasks=len(bundle.tasks))
        await _settle(message)

    # --- the loop --------------------------------------------------------------------------

    async def _rounds(self, engine: Engine, stop: asyncio.Event) -> None:
        while not stop.is_set():
            now = time.time()
            retry = self.held.due(now)
            if retry:  # held workflows try again alone, so a failure does not drag a batch down
                self.dirty -= retry
                if not await self._isolate(engine, [], retry):
                    await self._pause(stop)
                continue
            dirty, waiting = self.held.split(self.dirty, now)
            if not self.inbox and not dirty:
                # Held workflows come back when their delay is over (they are due again then).
                self.dirty -= waiting
                next_due = self.held.next_due()
                self.wake.clear()
                waiter = asyncio.ensure_future(self.wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait(
                    {waiter, stopper},
                    timeout=None if next_due is None else max(next_due - now, 0.01),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                waiter.cancel()
                stopper.cancel()
                continue
            batch = self._take_batch()
            inbound = Inbound(dirty=dirty)
            self.dirty.clear()
            for kind, item, _ in batch:
                if kind == "evaluated":
                    inbound.evaluated.extend(item)
                elif kind == "started":
                    inbound.started.append(item)
                else:
                    inbound.dead.append(item)
            try:
                result = await engine.run_round(inbound)
            except BROKER_ERRORS as exc:
                # RabbitMQ went away while the round published: nothing was committed. The messages
                # go back to their queues (the broker already took back those whose channel closed)
                # and come again once the connection is restored; nothing is dropped.
                log.warning("RabbitMQ unavailable during a round; retrying it", error=str(exc)[:200])
                for _, _, message in batch:
                    if message is not None:
                        await _settle(message, requeue=True)
                self.dirty |= inbound.dirty
                await self._pause(stop)
                continue
            except Exception:
                log.exception("reconciliation round failed; retrying its messages and workflows one by one")
                if not await self._isolate(engine, batch, inbound.dirty):
                    await self._pause(stop)
                continue
            self.rounds += 1
            for _, _, message in batch:
                if message is not None:
                    await _settle(message)
            self.held.succeeded(inbound.dirty)
            await self._follow_up(result)

    @staticmethod
    async def _pause(stop: asyncio.Event) -> None:
        """RabbitMQ is away: give the robust connection a moment before the next round."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)

    async def _follow_up(self, result: RoundResult) -> None:
        """What a successful round leaves to do: workflows with more work, cancellations to announce."""
        self.dirty |= result.again
        for workflow_id, at in result.due.items():
            self._wake_at(workflow_id, at)
        if result.cancelled:
            try:
                await self._broadcast_cancel(result.cancelled, result.at)
            except BROKER_ERRORS as exc:  # executors' results for those workflows are ignored anyway
                log.warning("could not broadcast cancellations", error=str(exc)[:200])

    def _wake_at(self, workflow_id: uuid.UUID, at: float) -> None:
        """Run a round for this workflow at ``at`` (epoch seconds), unless one is already set sooner."""
        current = self.timers.get(workflow_id)
        if current is not None:
            if current[0] <= at:
                return
            current[1].cancel()

        def due() -> None:
            self.timers.pop(workflow_id, None)
            self.dirty.add(workflow_id)
            self.wake.set()

        handle = asyncio.get_running_loop().call_later(max(at - time.time(), 0.0), due)
        self.timers[workflow_id] = (at, handle)

    def _take_batch(self) -> list[tuple[str, Any, AbstractIncomingMessage | None]]:
        """Inbox entries up to about ``controller_batch_size`` items (an evaluated entry holds many)."""
        taken = 0
        size = 0
        for kind, item, _ in self.inbox:
            taken += 1
            size += len(item) if kind == "evaluated" else 1
            if size >= self.settings.controller_batch_size:
                break
        batch = self.inbox[:taken]
        del self.inbox[:taken]
        return batch

    async def _isolate(
        self,
        engine: Engine,
        batch: list[tuple[str, Any, AbstractIncomingMessage | None]],
        dirty: set[uuid.UUID],
    ) -> bool:
        """After a round failed (not for a lost connection), apply its messages one by one and run
        its workflows one by one, so one bad message or workflow cannot block the rest. A message
        that fails alone is dropped (the task's lease or a resync recovers the attempt); a workflow
        whose round fails alone is held back for a while (:mod:`controller.held`). Returns False
        if RabbitMQ went away meanwhile (what was left goes back, for later)."""
        singles: list[tuple[Inbound, AbstractIncomingMessage | None]] = []
        for kind, item, message in batch:
            if kind == "evaluated":
                # A batch of results, one at a time; the message is settled after its last.
                for index, evaluated in enumerate(item):
                    singles.append((Inbound(evaluated=[evaluated]), message if index == len(item) - 1 else None))
                if not item:  # nothing in it, but its message is still to be settled
                    singles.append((Inbound(), message))
                continue
            inbound = Inbound()
            if kind == "started":
                inbound.started.append(item)
            else:
                inbound.dead.append(item)
            singles.append((inbound, message))
        singles += [(Inbound(dirty={workflow_id}), None) for workflow_id in sorted(dirty)]
        for index, (inbound, message) in enumerate(singles):
            try:
                result = await engine.run_round(inbound)
            except BROKER_ERRORS as exc:
                # RabbitMQ went away: the rest waits for the connection, as after a failed round.
                log.warning("RabbitMQ unavailable during a round; retrying it", error=str(exc)[:200])
                for rest, rest_message in singles[index:]:
                    if rest_message is not None:
                        await _settle(rest_message, requeue=True)
                    self.dirty |= rest.dirty
                return False
            except Exception:
                metrics.ROUNDS_FAILED.inc()
                lost = [m.result.task for m in inbound.evaluated] + [m for m, _ in inbound.dead]
                if lost:
                    log.exception("a result could not be applied; dropping it, and its attempt is taken for lost")
                    await self._lose(engine, lost)
                for workflow_id in inbound.dirty:
                    delay = self.held.failed(workflow_id, time.time())
                    log.exception("workflow round failed; held back", workflow_id=str(workflow_id), retry_in=delay)
            else:
                self.held.succeeded(inbound.dirty)
                await self._follow_up(result)
            if message is not None:
                await _settle(message)
        return True

    async def _lose(self, engine: Engine, attempts: list[TaskRef]) -> None:
        """End the leases of attempts whose result was dropped, so that a round soon retries or
        fails them (:func:`store.expire_leases`). Should even that fail, the error is logged; a
        message naming no valid workflow is only dropped."""
        keys = []
        for a in attempts:
            try:
                keys.append((a.task_id, a.attempt, uuid.UUID(a.workflow_id)))
            except ValueError:
                log.error("dropped a result naming no valid workflow", workflow_id=a.workflow_id[:100])
        if not keys:
            return

        async def expire(conn: Any) -> None:
            # Workflow rows first, as every status change takes them: no deadlock with a round.
            await store.lock_workflows(conn, {workflow_id for _, _, workflow_id in keys})
            await store.expire_leases(conn, keys)

        try:
            await in_transaction(engine.db, expire, what="end leases of dropped results", attempts=5)
        except Exception:
            log.exception("could not end the leases of attempts whose result was dropped", attempts=keys[:20])
            return
        self.dirty |= {workflow_id for _, _, workflow_id in keys}

    async def _heartbeat_loop(self, db: Any) -> None:
        while True:
            hb, message = await self.heartbeats.get()
            caps_key = ",".join(sorted(c.model_dump_json() for c in hb.capabilities))
            new_types = self.known_capabilities.get(hb.executor_id) != caps_key
            if hb.wants_cancellations and hb.control_queue and not hb.stopping:
                await self._send_cancellations(db, hb.control_queue)
            elif hb.running and hb.control_queue:
                await self._cancel_leftovers(db, hb.running, hb.control_queue)

            async def record(conn: Any, hb: HeartbeatMessage = hb, new_types: bool = new_types) -> int:
                return await store.record_heartbeat(
                    conn, hb, self.settings.lease_ttl, self.settings.lease_grace, new_types
                )

            try:
                await in_transaction(db, record, what="heartbeat")
                self.known_capabilities[hb.executor_id] = caps_key
            except Exception:
                log.exception("could not record heartbeat", executor=hb.executor_id)
            await _settle(message)

    async def _listen(self, stop: asyncio.Event) -> None:
        """LISTEN for new and cancelled workflows; reconnects on failure."""
        while not stop.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(self.settings.psycopg_dsn(), autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL_WORKFLOWS}")
                    await conn.execute(f"LISTEN {CHANNEL_POLICIES}")
                    # Anything notified while we were not listening is found by a resync now.
                    self.resync_now.set()
                    async for note in conn.notifies():
                        if note.channel == CHANNEL_POLICIES:
                            self.policy_changed.set()
                            continue
                        with contextlib.suppress(ValueError):
                            self.dirty.add(uuid.UUID(note.payload))
                        self.wake.set()
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN connection lost; reconnecting", error=str(exc)[:200])
                await asyncio.sleep(1.0)

    async def _resync_loop(self, db: Any, stop: asyncio.Event, judged_from: float) -> None:
        while not stop.is_set():
            now = time.time()
            next_at: float | None = None

            async def scan(conn: Any, now: float = now) -> tuple[set[uuid.UUID], float | None]:
                return await store.workflows_needing_attention(conn, now), await store.next_timer(conn)

            try:
                found, next_at = await in_transaction(db, scan, what="resync", attempts=3)
                if found:
                    self.dirty |= found
                    self.wake.set()
            except Exception as exc:
                log.warning("resync failed", error=str(exc)[:200])
            wait = self.settings.resync_interval
            if next_at is not None:
                wait = min(wait, max(next_at - time.time(), 0.01))
            if time.time() < judged_from:  # expired leases wait for the heartbeats: do not spin on them
                wait = max(wait, min(judged_from - time.time(), 0.5))
            self.resync_now.clear()
            waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.resync_now.wait())}
            await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def _gauges_loop(self, db: Any, channel: Any, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with db.connect() as conn:
                    rows = await conn.execute(sa.text("SELECT status, count(*) FROM workflows GROUP BY status"))
                    counts = dict(rows.all())
                    for status in ("pending", "running", "succeeded", "failed", "cancelled"):
                        metrics.WORKFLOWS.labels(status).set(counts.get(status, 0))
                    alive = await conn.execute(
                        sa.text(
                            "SELECT c->>'type', count(*) FROM executors, jsonb_array_elements(capabilities) c "
                            "WHERE last_heartbeat > now() - make_interval(secs => :window) GROUP BY 1"
                        ),
                        {"window": self.settings.heartbeat_interval * 3},
                    )
                    metrics.EXECUTORS_SILENT.set(await store.silent_executors(conn, self.settings.heartbeat_interval))
                    metrics.EXECUTORS_ALIVE.clear()
                    types = [r[0] for r in (await conn.execute(sa.text("SELECT type FROM task_types"))).all()]
                    alive_counts = dict(alive.all())
                    for task_type in types:
                        metrics.EXECUTORS_ALIVE.labels(task_type).set(alive_counts.get(task_type, 0))
                for name in [
                    self.names.results,
                    self.names.evaluated,
                    self.names.events,
                    self.names.dead_queue,
                ]:
                    await self._queue_depth(channel, name)
                for task_type in types:
                    await self._queue_depth(channel, self.names.task_queue(task_type))
            except Exception as exc:
                log.debug("gauge refresh failed", error=str(exc)[:200])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=5.0)

    async def _queue_depth(self, connection: Any, name: str) -> None:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            metrics.QUEUE_DEPTH.labels(name).set(queue.declaration_result.message_count or 0)
        except aio_pika.exceptions.ChannelClosed:
            pass
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _policy_loop(self, db: Any, stop: asyncio.Event) -> None:
        """Hot reload: a newly activated policy is in use within moments (NOTIFY), or 30 s at worst."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.policy_changed.wait(), timeout=30.0)
            force = self.policy_changed.is_set()
            self.policy_changed.clear()
            try:
                await self.policies.refresh(db, force=force)
            except Exception as exc:
                log.warning("policy refresh failed", error=str(exc)[:200])
            ACTIVE_VERSION.clear()
            if self.policies.learned is not None and self.policies.version:
                ACTIVE_VERSION.labels(self.policies.version).set(1)

    async def _retention_loop(self, db: Any, stop: asyncio.Event, keep: float) -> None:
        """Delete workflows finished more than ``keep`` seconds ago: a batch per transaction, so
        rounds are never held up for long, then wait for the next pass."""
        while not stop.is_set():
            cutoff = retention.cutoff_for(keep, datetime.now(UTC))
            deleted = 0
            try:
                while not stop.is_set():

                    async def one(conn: Any, cutoff: datetime = cutoff) -> retention.Pruned:
                        return await retention.prune_batch(conn, cutoff)

                    pruned = await in_transaction(db, one, what="retention", attempts=3)
                    deleted += pruned.workflows
                    metrics.WORKFLOWS_PRUNED.inc(pruned.workflows)
                    if not pruned.more:
                        break
                    # A pause between batches: rounds share this pool and the database.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=RETENTION_PAUSE)
            except Exception as exc:
                log.warning("retention pass failed; trying again at the next", error=str(exc)[:200])
            if deleted:
                log.info(
                    "deleted finished workflows past retention", workflows=deleted, finished_before=cutoff.isoformat()
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RETENTION_INTERVAL)

    async def _send_cancellations(self, db: Any, control_queue: str) -> None:
        """The workflows cancelled or failed in the last day, to an executor that asks: it has just
        connected (or reconnected) and may hold their task messages, having missed the broadcasts."""
        try:
            async with db.connect() as conn:
                ended = await store.recently_ended(conn, CANCELLATION_MEMORY)
            await self._tell(control_queue, ended, snapshot=True)
        except Exception as exc:  # the executor runs its old messages after a short wait, as before
            log.warning("could not send the recent cancellations to an executor", error=str(exc)[:200])

    async def _cancel_leftovers(self, db: Any, running: list[tuple[int, int]], control_queue: str) -> None:
        """An executor runs attempts of workflows that have ended: the cancel broadcast did not
        reach it (a broker blip, a controller crash between the commit and the broadcast). Tell
        it again, to itself: the heartbeat is the safety net under the broadcast."""
        try:
            async with db.connect() as conn:
                ended = await store.ended_workflows_of(conn, [task_id for task_id, _ in running])
            if not ended:
                return
            await self._tell(control_queue, ended, snapshot=False)
            log.info("told an executor again to cancel attempts of ended workflows", workflows=len(ended))
        except Exception as exc:  # the next heartbeat tries again
            log.warning("could not check an executor's attempts against ended workflows", error=str(exc)[:200])

    async def _tell(self, control_queue: str, ended: list[tuple[uuid.UUID, float]], *, snapshot: bool) -> None:
        """Send one executor, on its own control queue, workflows that ended (id, when)."""
        ids, at = [str(w) for w, _ in ended], [when for _, when in ended]
        body = CancelMessage(workflow_ids=ids, at=at, snapshot=snapshot).model_dump_json().encode()
        # Not mandatory: an executor gone meanwhile has no queue, and needs telling no more.
        await self.topology.channel.default_exchange.publish(
            persistent(body), routing_key=control_queue, mandatory=False
        )

    async def _broadcast_cancel(self, workflow_ids: set[uuid.UUID], at: float) -> None:
        exchange = await self.topology.control_exchange()
        ids = [str(w) for w in workflow_ids]
        body = CancelMessage(workflow_ids=ids, at=[at] * len(ids)).model_dump_json().encode()
        # Not mandatory: with no executor connected, no queue is bound, and nobody needs telling.
        await exchange.publish(persistent(body), routing_key="", mandatory=False)

    # --- lifecycle -------------------------------------------------------------------------

    @staticmethod
    async def _check_schema(db: Any) -> None:
        """Refuse an older schema before the first query: without the migrations this build needs,
        that query would fail with a traceback about a missing table."""
        schema = await in_transaction(db, schema_state, what="the schema check")
        if schema.behind:
            await db.dispose()
            raise SchemaOutdated(schema.problem())
        if schema.ahead:
            log.warning(schema.problem())

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        port = serve_metrics(settings.metrics_port, DEFAULT_METRICS_PORT, "controller", settings.metrics_host)
        # No pre-ping (it would add a round trip to every reconciliation round): rounds,
        # heartbeats, resyncs and policy reloads are transactions retried on a lost connection,
        # and the metrics gauges try again at their next tick.
        db = create_engine(
            settings.database_url.get_secret_value(), pool_size=4, name="dagsmith-controller", pre_ping=False
        )
        if not await wait_for_database(db, stop, service="controller"):
            await db.dispose()
            return
        await self._check_schema(db)
        self.db = db
        connection = await connect(
            settings.amqp_url.get_secret_value(),
            name="dagsmith-controller",
            heartbeat=settings.amqp_heartbeat,
            stop=stop,
        )
        # Task messages are mandatory: one that no queue takes is returned, and raises.
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # (aio-pika publishes mandatory by default: control messages say mandatory=False.)
        self.topology = Topology(publish_channel, self.names, settings.max_deliveries)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=256)
        consume_topology = Topology(consume_channel, self.names, settings.max_deliveries)
        self.policies = PolicyBox(settings.correction_exploration)
        await self.policies.refresh(db, force=True)
        self.publisher = Publisher(publish_channel, self.topology, settings.bundle_max)
        engine = self.engine_class(db, self.publisher, settings, Corrector(self.policies))
        await self.topology.control_exchange()
        evaluated = await consume_topology.queue(self.names.evaluated)
        events = await consume_topology.queue(self.names.events)
        dead = await consume_topology.dead_queue()
        await consume_topology.queue(self.names.results)
        tags = [
            (evaluated, await evaluated.consume(self._on_evaluated)),
            (events, await events.consume(self._on_event)),
            (dead, await dead.consume(self._on_dead)),
        ]
        log.info("controller started", prefix=settings.amqp_prefix, metrics_port=port)
        background = [
            asyncio.create_task(self._listen(stop)),
            asyncio.create_task(self._resync_loop(db, stop, engine.leases_judged_from)),
            asyncio.create_task(self._heartbeat_loop(db)),
            asyncio.create_task(self._gauges_loop(db, connection, stop)),
            asyncio.create_task(self._policy_loop(db, stop)),
        ]
        if settings.retention is not None:
            background.append(asyncio.create_task(self._retention_loop(db, stop, settings.retention)))
        try:
            await self._rounds(engine, stop)
        finally:
            for queue, tag in tags:
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            for task in background:
                task.cancel()
            for _, handle in self.timers.values():
                handle.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await connection.close()
            await db.dispose()
            log.info("controller stopped")
