"""The consumer stream: outbox events from Kafka topics in a consumer group, with explicit offset
commits in one of three modes, retries and a dead-letter topic.

Contract (what this module guarantees, and what it must never do):

* An event is *processed* when the code it was handed to is done with it: the next event is
  asked for (iteration), the next batch is asked for (:meth:`EventStream.batches`), the handler
  returned (:meth:`EventStream.run`), or the ``with`` block is left without an exception. Only
  processed events have their offsets committed (next offset = last processed + 1); an event
  merely fetched, or being handled when the process dies, is delivered again.
* kafka-python's own auto-commit is off: it commits fetched positions, not processed ones.
* A record that is not an event, or an event whose handler failed every attempt, goes to the
  dead-letter topic (and only then counts as processed); without a dead-letter topic the stream
  raises before it, and it is delivered again on restart. Nothing is dropped silently.
* Buffering is bounded: one fetched batch (``max_poll_records``) in hand, plus what kafka-python
  prefetches (``fetch_max_bytes``, ``max_partition_fetch_bytes``).

The stream is not thread-safe (kafka-python's consumer is not), except :meth:`stop`.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from kafka import ConsumerRebalanceListener

from outbox_cdc.consumer.dead_letter import dead_letter_record, error_class
from outbox_cdc.consumer.events import ConsumedEvent, RawRecord, parse_records
from outbox_cdc.consumer.observer import ConsumerObserver, NullObserver
from outbox_cdc.consumer.offsets import CommitMode, CommitPolicy, OffsetBook, Partition
from outbox_cdc.consumer.retry import RetryPolicy
from outbox_cdc.errors import (
    ConfigurationError,
    ConsumerError,
    EventParseError,
    HandlerFailedError,
)
from outbox_cdc.events import validate_topic

log = logging.getLogger(__name__)

Handler = Callable[[ConsumedEvent], object]
ClientFactory = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class ConsumerOptions:
    """Settings of a stream. ``client_config`` passes extra kafka-python settings (security_*,
    sasl_*, ssl_*, fetch sizes...) to the consumer and the dead-letter producer, unchanged."""

    topics: tuple[str, ...]
    group_id: str
    bootstrap_servers: str
    commit: CommitMode = CommitMode.BATCH
    commit_interval_ms: int = 5000
    isolation_level: str = "read_committed"
    auto_offset_reset: str = "earliest"
    max_poll_records: int = 500
    poll_timeout_ms: int = 500
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 45_000
    group_instance_id: str | None = None
    client_id: str = "outbox-cdc-consumer"
    dead_letter_topic: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    commit_timeout_ms: int = 10_000
    dead_letter_timeout_ms: int = 30_000
    idle_timeout_ms: int | None = None
    client_config: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.topics, str):
            object.__setattr__(self, "topics", (self.topics,))
        object.__setattr__(self, "topics", tuple(self.topics))
        object.__setattr__(self, "commit", CommitMode.parse(self.commit))
        if not self.topics:
            raise ConfigurationError("topics: give at least one topic")
        for t in self.topics:
            try:
                validate_topic(t)
            except Exception as exc:
                raise ConfigurationError(f"topics: {exc}") from None
        if self.dead_letter_topic is not None:
            try:
                validate_topic(self.dead_letter_topic)
            except Exception as exc:
                raise ConfigurationError(f"dead_letter_topic: {exc}") from None
            if self.dead_letter_topic in self.topics:
                raise ConfigurationError(
                    "dead_letter_topic: must not be one of the consumed topics (a dead letter "
                    "would come back to the handler that failed on it)"
                )
        if not self.group_id:
            raise ConfigurationError("group_id: a consumer group is required (offsets live there)")
        if self.isolation_level not in ("read_committed", "read_uncommitted"):
            raise ConfigurationError(
                "isolation_level: 'read_committed' (default; required behind an exactly-once "
                "relay) or 'read_uncommitted'"
            )
        if self.max_poll_records < 1:
            raise ConfigurationError("max_poll_records: must be >= 1")
        if self.retry.max_seconds * 1000 >= self.max_poll_interval_ms:
            raise ConfigurationError(
                f"retry max_seconds ({self.retry.max_seconds}) must stay below "
                f"max_poll_interval_ms ({self.max_poll_interval_ms} ms): a consumer that does not "
                "poll for that long is removed from its group"
            )

    def consumer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = dict(self.client_config)
        config.update(
            bootstrap_servers=self.bootstrap_servers.split(","),
            group_id=self.group_id,
            client_id=self.client_id,
            enable_auto_commit=False,  # we commit processed offsets, never fetched ones
            auto_offset_reset=self.auto_offset_reset,
            isolation_level=self.isolation_level,
            max_poll_records=self.max_poll_records,
            max_poll_interval_ms=self.max_poll_interval_ms,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=min(3000, self.session_timeout_ms // 3),
        )
        if self.group_instance_id:
            config["group_instance_id"] = self.group_instance_id  # KIP-345 static membership
        config.setdefault("reconnect_backoff_max_ms", 1000)
        return config

    def producer_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            k: v
            for k, v in self.client_config.items()
            if k.startswith(("security_", "sasl_", "ssl_")) or k in ("api_version",)
        }
        config.update(
            bootstrap_servers=self.bootstrap_servers.split(","),
            client_id=f"{self.client_id}-dlq",
            acks="all",
            enable_idempotence=True,
            reconnect_backoff_max_ms=1000,
        )
        return config


def _kafka_consumer(config: dict[str, Any]) -> Any:
    import kafka

    return kafka.KafkaConsumer(**config)


def _kafka_producer(config: dict[str, Any]) -> Any:
    import kafka

    return kafka.KafkaProducer(**config)


class StopFlag:
    """Set by stop(); safe to set from a signal handler, unlike threading.Event, whose set()
    takes a lock that the interrupted thread may hold inside wait()."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds, waking within 50 ms of set(); True if set."""
        deadline = time.monotonic() + timeout
        while not self._set:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(0.05, remaining))
        return self._set


class _Stopped(Exception):
    """stop() was called while an event was being retried."""


class StreamCore:
    """The stream's state and its blocking Kafka IO, shared by the sync and async streams (the
    async one runs every call here in one worker thread). Not part of the public API."""

    def __init__(
        self,
        options: ConsumerOptions,
        *,
        observer: ConsumerObserver | None = None,
        consumer_factory: ClientFactory | None = None,
        producer_factory: ClientFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.observer: ConsumerObserver = observer if observer is not None else NullObserver()
        self.clock = clock
        self.book = OffsetBook()
        self.policy = CommitPolicy(options.commit, options.commit_interval_ms / 1000)
        self.stopping = StopFlag()
        self._consumer_factory = consumer_factory or _kafka_consumer
        self._producer_factory = producer_factory or _kafka_producer
        self._consumer: Any = None
        self._producer: Any = None
        self._buffer: collections.deque[ConsumedEvent | EventParseError] = collections.deque()
        self._in_hand: list[tuple[ConsumedEvent, float]] = []
        self._last_commit = clock()
        self._last_record = clock()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        if self._consumer is not None:
            return
        import kafka.errors as kerr

        o = self.options
        try:
            self._consumer = self._consumer_factory(o.consumer_config())
            self._consumer.subscribe(list(o.topics), listener=_Rebalance(self))
            if o.dead_letter_topic:
                self._producer = self._producer_factory(o.producer_config())
        except kerr.KafkaConfigurationError as exc:
            self._close_clients()
            raise ConfigurationError(f"kafka consumer settings: {exc}") from None
        except kerr.KafkaError as exc:
            self._close_clients()
            raise ConsumerError(
                f"cannot start the consumer at {o.bootstrap_servers}: {type(exc).__name__}: {exc}"
            ) from None
        self._last_commit = self._last_record = self.clock()

    def close(self, *, in_hand_done: bool) -> None:
        """Commit what was processed (the events in hand too if ``in_hand_done``), then close."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._consumer is not None:
                if in_hand_done:
                    self.finish_in_hand()
                self._in_hand.clear()
                self.commit(final=True)
        finally:
            self._close_clients()

    def _close_clients(self) -> None:
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception as exc:
                log.warning("closing the Kafka consumer: %s", exc)
        if producer is not None:
            try:
                producer.close(timeout=5)
            except Exception as exc:
                log.warning("closing the dead-letter producer: %s", exc)

    # -- events ---------------------------------------------------------------------------------

    def _require_open(self) -> Any:
        if self._consumer is None:
            raise ConsumerError(
                "the stream is not open: use it in a with block, or call open() first"
            )
        return self._consumer

    def fetch(self) -> list[RawRecord]:
        """One poll: up to ``max_poll_records`` records (possibly none)."""
        import kafka.errors as kerr

        consumer = self._require_open()
        try:
            batch = consumer.poll(
                timeout_ms=self.options.poll_timeout_ms, max_records=self.options.max_poll_records
            )
        except kerr.KafkaError as exc:
            raise ConsumerError(f"fetching from Kafka: {type(exc).__name__}: {exc}") from None
        records: list[RawRecord] = []
        for tp in sorted(batch, key=lambda tp: (tp.topic, tp.partition)):
            recs = batch[tp]
            if recs:
                self.observer.consumed(tp.topic, len(recs))
                records.extend(RawRecord.from_kafka(r) for r in recs)
        if records:
            self._last_record = self.clock()
        return records

    def next_event(self) -> ConsumedEvent | None:
        """Finish the event in hand, then the next event; None when stopped or idle too long."""
        self.finish_in_hand()
        while not self.stopping.is_set():
            if not self._buffer:
                self.after_batch()
                records = self.fetch()
                if not records:
                    if self._idle():
                        return None
                    continue
                self._buffer.extend(parse_records(records))
            item = self._buffer.popleft()
            if isinstance(item, EventParseError):
                self.reject(item)
                continue
            self._in_hand.append((item, self.clock()))
            return item
        return None

    def next_batch(self) -> list[ConsumedEvent] | None:
        """Finish the batch in hand, then the next fetched batch (records that are not events
        already dead-lettered); None when stopped or idle too long."""
        self.finish_in_hand()
        while not self.stopping.is_set():
            if self._buffer:  # left over from event-at-a-time iteration
                items = list(self._buffer)
                self._buffer.clear()
            else:
                self.after_batch()
                records = self.fetch()
                if not records:
                    if self._idle():
                        return None
                    continue
                items = parse_records(records)
            events: list[ConsumedEvent] = []
            for i, item in enumerate(items):
                if isinstance(item, EventParseError):
                    if events:
                        # the events before it go out first: it keeps its place in the order
                        self._buffer.extend(items[i:])
                        break
                    self.reject(item)
                else:
                    events.append(item)
            if events:
                now = self.clock()
                self._in_hand.extend((e, now) for e in events)
                return events
        return None

    def _idle(self) -> bool:
        limit = self.options.idle_timeout_ms
        return limit is not None and (self.clock() - self._last_record) * 1000 >= limit

    def finish_in_hand(self) -> None:
        """The events in hand are processed."""
        if not self._in_hand:
            return
        now = self.clock()
        for event, handed_at in self._in_hand:
            self.book.processed((event.topic, event.partition), event.offset)
            self.observer.processed(event.topic, now - handed_at)
        self._in_hand.clear()
        self.after_event()

    def drop_in_hand(self) -> None:
        """The events in hand are not processed (stop during a retry): delivered again."""
        self._in_hand.clear()

    def reject(self, error: EventParseError) -> None:
        """A record that is not an event: dead letter, or raise (it stays unprocessed)."""
        record = error.record
        assert isinstance(record, RawRecord)
        if not self.options.dead_letter_topic:
            log.error("%s; no dead-letter topic is set: stopping before it", error)
            raise error
        log.error("%s; sending it to dead-letter topic %s", error, self.options.dead_letter_topic)
        self.dead_letter(record, error, attempts=0, reason="unparsable")

    def give_up(self, event: ConsumedEvent, exc: BaseException, attempts: int) -> None:
        """The handler failed for good on the event in hand: dead letter, or raise."""
        if not self.options.dead_letter_topic:
            raise HandlerFailedError(
                f"handler failed on event {event.id} ({event.record.where()}) after "
                f"{attempts} attempt(s): {error_class(exc)}: {exc}; no dead-letter topic is set, "
                "so the consumer stops before it (it will be delivered again)",
                event=event,
                attempts=attempts,
            ) from exc
        log.error(
            "handler failed on event %s (%s) after %d attempt(s): %s: %s; sending it to "
            "dead-letter topic %s",
            event.id,
            event.record.where(),
            attempts,
            error_class(exc),
            exc,
            self.options.dead_letter_topic,
        )
        self._in_hand = [(e, t) for e, t in self._in_hand if e is not event]
        self.dead_letter(event.record, exc, attempts=attempts, reason="handler")

    def dead_letter(
        self, record: RawRecord, exc: BaseException, *, attempts: int, reason: str
    ) -> None:
        """Publish the dead letter and wait for Kafka's ack; only then is the record processed."""
        import kafka.errors as kerr

        topic = self.options.dead_letter_topic
        assert topic is not None and self._producer is not None
        dlq = dead_letter_record(
            record, exc, topic=topic, attempts=attempts, group=self.options.group_id
        )
        try:
            future = self._producer.send(
                dlq.topic, key=dlq.key, value=dlq.value, headers=dlq.headers
            )
            future.get(timeout=self.options.dead_letter_timeout_ms / 1000)
        except kerr.KafkaError as exc2:
            raise ConsumerError(
                f"the dead letter of {record.where()} was not acknowledged by Kafka "
                f"({type(exc2).__name__}: {exc2}); stopping before it (it will be delivered again)"
            ) from None
        self.observer.dead_lettered(record.topic, reason)
        self.book.processed((record.topic, record.partition), record.offset)
        self.after_event()

    # -- commits --------------------------------------------------------------------------------

    def after_event(self) -> None:
        if self.policy.after_event(self.clock(), self._last_commit):
            self.commit()

    def after_batch(self) -> None:
        if self.policy.after_batch(self.clock(), self._last_commit):
            self.commit()

    def commit(self, *, final: bool = False) -> bool:
        """Commit the processed offsets Kafka does not have. False if the commit failed (it is
        tried again at the next commit point; the records are delivered again meanwhile)."""
        import kafka.errors as kerr
        from kafka.structs import OffsetAndMetadata, TopicPartition

        self._last_commit = self.clock()
        offsets = self.book.to_commit()
        if not offsets or self._consumer is None:
            return True
        request = {
            TopicPartition(t, p): OffsetAndMetadata(off, "", -1) for (t, p), off in offsets.items()
        }
        try:
            self._consumer.commit(request, timeout_ms=self.options.commit_timeout_ms)
        except kerr.CommitFailedError as exc:
            # the group rebalanced: the partitions may belong to another member now
            self.observer.commit_failed()
            assigned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
            self.book.forget(p for p in offsets if p not in assigned)
            log.warning(
                "offset commit refused after a rebalance (%s); records since the last "
                "commit will be delivered again",
                exc,
            )
            return False
        except kerr.KafkaError as exc:
            self.observer.commit_failed()
            log.log(
                logging.ERROR if final else logging.WARNING,
                "offset commit failed (%s: %s)%s",
                type(exc).__name__,
                exc,
                "; records since the last commit will be delivered again"
                if final
                else "; trying again at the next commit point",
            )
            return False
        self.book.committed(offsets)
        self.observer.committed(len(offsets))
        return True

    def revoked(self, partitions: Sequence[Partition]) -> None:
        """Before the group takes partitions away: commit what was processed of them, forget
        them and what was buffered for them (their next owner reads from the committed offset).

        kafka-python 3 calls this on its IO thread while our thread waits in poll(), where a
        blocking commit() is refused; so the commit is sent with commit_async(), before this
        member rejoins the group, as kafka-python's own pre-rebalance auto-commit is. If it
        fails, the next owner gets those events again: the inbox skips them."""
        from kafka.structs import OffsetAndMetadata, TopicPartition

        gone = set(partitions)
        offsets = {p: off for p, off in self.book.to_commit().items() if p in gone}
        if offsets and self._consumer is not None:
            request = {
                TopicPartition(t, p): OffsetAndMetadata(off, "", -1)
                for (t, p), off in offsets.items()
            }
            try:
                self._consumer.commit_async(request, callback=self._revoked_commit_done)
            except Exception as exc:  # the commit is an optimization: never fail the rebalance
                self.observer.commit_failed()
                log.warning("offset commit before the rebalance failed: %s", exc)
        self.book.forget(gone)
        if self._buffer:
            self._buffer = collections.deque(
                item
                for item in self._buffer
                if (_record_of(item).topic, _record_of(item).partition) not in gone
            )

    def _revoked_commit_done(self, offsets: Any, response: Any) -> None:
        # kafka-python runs commit callbacks on the consumer's thread (in poll or commit)
        if isinstance(response, BaseException):
            self.observer.commit_failed()
            log.warning(
                "offset commit before the rebalance failed (%s: %s); the next owner of the "
                "partitions gets the events processed since the last commit again",
                type(response).__name__,
                response,
            )
            return
        self.book.record_history(
            {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()}
        )
        self.observer.committed(len(offsets))


def _record_of(item: ConsumedEvent | EventParseError) -> RawRecord:
    record = item.record
    assert isinstance(record, RawRecord)
    return record


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """kafka-python calls these from inside poll(), on the consumer's thread."""

    def __init__(self, core: StreamCore) -> None:
        self.core = core

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.core.revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))

    def on_partitions_lost(self, lost: Any) -> None:
        # lost, not revoked: committing is no longer allowed (KIP-429)
        gone = [(tp.topic, tp.partition) for tp in lost]
        self.core.book.forget(gone)


def make_options(topics: str | Sequence[str], options: dict[str, Any]) -> ConsumerOptions:
    try:
        return ConsumerOptions(
            topics=tuple([topics] if isinstance(topics, str) else topics), **options
        )
    except TypeError as exc:
        raise ConfigurationError(f"consumer options: {exc}") from None


class EventStream:
    """Outbox events from ``topics`` in the consumer group ``group_id``::

        with EventStream("orders", group_id="billing", bootstrap_servers="kafka:9092") as stream:
            for event in stream:  # the event is processed when the loop asks for the next one
                handle(event)

        with EventStream(...) as stream:
            stream.run(handle)  # retries, then the dead-letter topic; until stop()

    Keyword options are the fields of :class:`ConsumerOptions`. ``observer`` receives the
    metrics hooks (:class:`outbox_cdc.consumer.ConsumerMetrics`). ``consumer_factory`` and
    ``producer_factory`` build the kafka-python clients from their config (tests pass fakes).
    """

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

    # -- lifecycle ------------------------------------------------------------------------------

    def open(self) -> EventStream:
        self._core.open()
        return self

    def close(self, *, in_hand_done: bool = True) -> None:
        """Commit what was processed and leave. ``in_hand_done=False``: the event(s) handed out
        last are not processed (delivered again)."""
        self._core.close(in_hand_done=in_hand_done)

    def __enter__(self) -> EventStream:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(in_hand_done=exc_type is None)

    def stop(self) -> None:
        """Ask the stream to stop (thread- and signal-safe): iteration ends and :meth:`run`
        returns after the current event; within ``poll_timeout_ms`` when idle."""
        self._core.stopping.set()

    def commit(self) -> bool:
        """Commit the processed offsets now (whatever the mode)."""
        return self._core.commit()

    @property
    def committed_offsets(self) -> dict[Partition, int]:
        """What this stream committed, per (topic, partition): next offset to read."""
        return self._core.book.committed_offsets()

    # -- consuming ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ConsumedEvent]:
        return self

    def __next__(self) -> ConsumedEvent:
        event = self._core.next_event()
        if event is None:
            raise StopIteration
        return event

    def batches(self) -> Iterator[list[ConsumedEvent]]:
        """Fetched batches (at most ``max_poll_records`` events); a batch is processed when the
        next one is asked for."""
        while True:
            batch = self._core.next_batch()
            if batch is None:
                return
            yield batch

    def run(self, handler: Handler) -> None:
        """Call ``handler`` for each event until :meth:`stop` (or ``idle_timeout_ms``). A failing
        handler is retried per ``retry``; then the event is dead-lettered, or, with no
        dead-letter topic, :class:`HandlerFailedError` is raised (the event is not committed)."""
        core = self._core
        for event in self:
            try:
                self._handle(event, handler)
            except _Stopped:
                core.drop_in_hand()
                return

    def _handle(self, event: ConsumedEvent, handler: Handler) -> None:
        core = self._core
        policy = self.options.retry
        started = core.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                handler(event)
                return
            except Exception as exc:
                core.observer.handler_error(event.topic, type(exc).__name__)
                wait = policy.next_wait(attempt, core.clock() - started, exc)
                if wait is None:
                    core.give_up(event, exc, attempt)
                    return
                log.warning(
                    "handler failed on event %s (%s), attempt %d: %s: %s; retrying in %.2fs",
                    event.id,
                    event.record.where(),
                    attempt,
                    type(exc).__name__,
                    exc,
                    wait,
                )
                if core.stopping.wait(wait):
                    raise _Stopped from None
