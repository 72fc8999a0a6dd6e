"""The async twin of :class:`outbox_cdc.consumer.stream.EventStream`.

kafka-python is blocking and not thread-safe, so every Kafka call (poll, commit, dead letter,
close) runs in one dedicated worker thread, always the same one; the handlers run on the event
loop. No extra dependency: an asyncio-native client (aiokafka) would bring a second Kafka
client to configure and test for the same guarantees. The contract is the sync stream's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from outbox_cdc.consumer.events import ConsumedEvent
from outbox_cdc.consumer.observer import ConsumerObserver
from outbox_cdc.consumer.offsets import Partition
from outbox_cdc.consumer.stream import ClientFactory, StreamCore, make_options

log = logging.getLogger(__name__)

T = TypeVar("T")
AsyncHandler = Callable[[ConsumedEvent], Awaitable[object] | object]


class AsyncEventStream:
    """``async with AsyncEventStream("orders", group_id=..., bootstrap_servers=...) as s:``
    then ``async for event in s`` or ``await s.run(handler)`` (an ``async def`` handler, or a
    plain function). Options and semantics: see :class:`EventStream`."""

    def __init__(
        self,
        topics: str | Sequence[str],
        *,
        observer: ConsumerObserver | None = None,
        consumer_factory: ClientFactory | None = None,
        producer_factory: ClientFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        **options: Any,
    ) -> None:
        self.options = make_options(topics, options)
        self._core = StreamCore(
            self.options,
            observer=observer,
            consumer_factory=consumer_factory,
            producer_factory=producer_factory,
            clock=clock,
        )
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="outbox-cdc-consumer"
        )
        self._stop_event: asyncio.Event | None = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> AsyncEventStream:
        self._stop_event = asyncio.Event()
        if self._core.stopping.is_set():
            self._stop_event.set()
        await self._call(self._core.open)
        return self

    async def close(self, *, in_hand_done: bool = True) -> None:
        try:
            await self._call(self._core.close, in_hand_done=in_hand_done)
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncEventStream:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(in_hand_done=exc_type is None)

    def stop(self) -> None:
        """Ask the stream to stop; call it from the event loop's thread (or a signal handler
        installed with ``loop.add_signal_handler``)."""
        self._core.stopping.set()
        if self._stop_event is not None:
            self._stop_event.set()

    async def commit(self) -> bool:
        return await self._call(self._core.commit)

    @property
    def committed_offsets(self) -> dict[Partition, int]:
        return self._core.book.committed_offsets()

    # -- consuming ------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> ConsumedEvent:
        event = await self._call(self._core.next_event)
        if event is None:
            raise StopAsyncIteration
        return event

    async def batches(self) -> AsyncIterator[list[ConsumedEvent]]:
        while True:
            batch = await self._call(self._core.next_batch)
            if batch is None:
                return
            yield batch

    async def run(self, handler: AsyncHandler) -> None:
        async for event in self:
            if not await self._handle(event, handler):
                await self._call(self._core.drop_in_hand)
                return

    async def _handle(self, event: ConsumedEvent, handler: AsyncHandler) -> bool:
        """False when stopped during a retry."""
        core = self._core
        policy = self.options.retry
        started = core.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
                return True
            except Exception as exc:
                core.observer.handler_error(event.topic, type(exc).__name__)
                wait = policy.next_wait(attempt, core.clock() - started, exc)
                if wait is None:
                    await self._call(core.give_up, event, exc, attempt)
                    return True
                log.warning(
                    "handler failed on event %s (%s), attempt %d: %s: %s; retrying in %.2fs",
                    event.id,
                    event.record.where(),
                    attempt,
                    type(exc).__name__,
                    exc,
                    wait,
                )
                assert self._stop_event is not None
                try:
                    await asyncio.wait_for(self._stop_event.wait(), wait)
                    return False
                except TimeoutError:
                    pass
