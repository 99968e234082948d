"""Acknowledging task messages in runs instead of one by one.

An ack per task message is, for short tasks, a large share of what the broker and the executor
spend per task: every ack is a frame, a write, and for a quorum queue a settle command in its log.
RabbitMQ's ``basic.ack`` with ``multiple`` settles every message delivered on the channel up to a
delivery tag, so when the finished messages form a run from the oldest unsettled one, one frame
settles them all. A message that finished while an older one still runs is acked alone, at once:
holding it back would keep it counted against the prefetch window behind a slow task.

Delivery tags belong to one channel. After a reconnect the robust channel restarts its tags, so
the state is kept per underlying channel and dropped when that channel closes (the broker
redelivers whatever it did not settle).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

import aiormq
from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger(__name__)


@dataclass
class Unsettled:
    """The delivery tags of one channel, oldest first, and what has become of them."""

    order: deque[int] = field(default_factory=deque)
    finished: list[int] = field(default_factory=list)  # to ack, in the order they finished
    settled: set[int] = field(default_factory=set)  # acked alone or rejected, still in ``order``

    def add(self, tag: int) -> None:
        """A delivered tag. Deliveries are handled in order, but a multiple ack must never pass an
        unfinished tag, so an older tag registered late still goes to its place."""
        if self.order and tag < self.order[-1]:
            bisect.insort(self.order, tag)
        else:
            self.order.append(tag)

    def plan(self) -> tuple[int | None, list[int]]:
        """What to send now: the tag to ack with ``multiple`` (or None), and the tags to ack alone.

        Pops the run of finished or settled tags from the front of ``order``; every finished tag
        after that run is acked alone and remembered as settled until it reaches the front.
        """
        done = set(self.finished)
        self.finished = []
        upto: int | None = None
        while self.order and (self.order[0] in done or self.order[0] in self.settled):
            tag = self.order.popleft()
            if tag in done:
                done.discard(tag)
                upto = tag
            else:
                self.settled.discard(tag)
        # A multiple ack up to ``upto`` also covers settled tags before it: the broker ignores them.
        singles = sorted(done)
        self.settled.update(singles)
        return upto, singles


class Acker:
    """Collects finished task messages and acks them once per event-loop turn, in runs."""

    def __init__(self) -> None:
        self._channels: dict[aiormq.abc.AbstractChannel, Unsettled] = {}
        self._flush: asyncio.Handle | None = None
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done (the loop holds weak refs)

    def delivered(self, message: AbstractIncomingMessage) -> None:
        """Register a message as it arrives, before anything can settle a later one."""
        channel = self._channel(message)
        if channel is not None and message.delivery_tag is not None:
            self._channels.setdefault(channel, Unsettled()).add(message.delivery_tag)

    def finished(self, message: AbstractIncomingMessage) -> None:
        """The message's work is done (its result is confirmed): ack it with the next flush."""
        state = self._state(message)
        if state is not None:
            state.finished.append(message.delivery_tag)  # type: ignore[arg-type]
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_soon(self._send)

    async def reject(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        """Reject now (to the dead-letter exchange, or back to the queue)."""
        state = self._state(message)
        if state is not None:
            state.settled.add(message.delivery_tag)  # type: ignore[arg-type]
        with contextlib.suppress(aiormq.exceptions.AMQPError, RuntimeError):
            await message.reject(requeue=requeue)

    def _channel(self, message: AbstractIncomingMessage) -> aiormq.abc.AbstractChannel | None:
        try:
            return message.channel
        except aiormq.exceptions.ChannelInvalidStateError:
            return None  # closed: the broker requeues what it delivered there

    def _state(self, message: AbstractIncomingMessage) -> Unsettled | None:
        channel = self._channel(message)
        return None if channel is None else self._channels.get(channel)

    def _send(self) -> None:
        self._flush = None
        for channel, state in list(self._channels.items()):
            if channel.is_closed:
                del self._channels[channel]
                continue
            if not state.finished:
                continue
            upto, singles = state.plan()
            task = asyncio.ensure_future(self._ack(channel, upto, singles))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    @staticmethod
    async def _ack(channel: aiormq.abc.AbstractChannel, upto: int | None, singles: list[int]) -> None:
        try:
            if upto is not None:
                await channel.basic_ack(upto, multiple=True)
            for tag in singles:
                await channel.basic_ack(tag)
        except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
            # The channel went away: the broker requeues the messages and they run again.
            log.debug("acks not sent: %s", exc)
