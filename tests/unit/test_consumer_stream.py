"""The consumer stream against an in-memory Kafka (fake consumer and producer): what is committed
in each mode, retries, dead letters, rebalances, stop, the async twin, metrics."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from kafka.errors import CommitFailedError, KafkaTimeoutError
from kafka.structs import TopicPartition

from outbox_cdc.consumer import (
    AsyncEventStream,
    ConsumedEvent,
    ConsumerMetrics,
    EventStream,
    RetryPolicy,
)
from outbox_cdc.errors import ConfigurationError, ConsumerError, EventParseError, HandlerFailedError
from outbox_cdc.events import create_event, to_record

TOPIC = "orders"
DLQ = "orders.dlq"


@dataclass
class Broker:
    """One topic's partitions, committed offsets, dead letters, and what went wrong on purpose."""

    partitions: dict[int, list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]]] = field(
        default_factory=dict
    )
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    commits: list[dict[TopicPartition, int]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    fail_commits: list[Exception] = field(default_factory=list)
    fail_dead_letter: bool = False
    consumer: FakeConsumer | None = None

    def publish(self, n: int, partition: int = 0, *, start: int = 0) -> list[str]:
        ids = []
        for i in range(start, start + n):
            r = to_record(
                create_event(
                    topic=TOPIC, type="t", key=f"k{i}", payload={"i": i}, id=uuid.UUID(int=i + 1)
                )
            )
            self.partitions.setdefault(partition, []).append((r.key, r.value, r.headers))
            ids.append(r.event_id)
        return ids

    def publish_raw(self, value: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self.partitions.setdefault(0, []).append((None, value, headers))

    def consumer_factory(self, config: dict[str, Any]) -> FakeConsumer:
        self.consumer = FakeConsumer(self, config)
        return self.consumer

    def producer_factory(self, config: dict[str, Any]) -> FakeProducer:
        return FakeProducer(self)


class FakeConsumer:
    def __init__(self, broker: Broker, config: dict[str, Any]) -> None:
        self.broker, self.config = broker, config
        self.positions: dict[TopicPartition, int] = {}
        self.listener: Any = None
        self.closed = False
        self.rebalance_next_poll: list[TopicPartition] | None = None
        self.pending_callbacks: list[tuple[Any, Any, Exception | None]] = []
        self.unassigned: set[int] = set()

    def subscribe(self, topics: list[str], listener: Any) -> None:
        assert topics == [TOPIC]
        self.listener = listener

    def assignment(self) -> set[TopicPartition]:
        return {
            TopicPartition(TOPIC, p) for p in self.broker.partitions if p not in self.unassigned
        }

    def poll(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Any]]:
        self.run_callbacks()
        if self.rebalance_next_poll is not None:
            revoked, self.rebalance_next_poll = self.rebalance_next_poll, None
            self.listener.on_partitions_revoked(revoked)
            for tp in revoked:  # another member owns them now
                self.positions.pop(tp, None)
                self.unassigned.add(tp.partition)
        out: dict[TopicPartition, list[Any]] = {}
        room = max_records
        for p, records in sorted(self.broker.partitions.items()):
            if p in self.unassigned:
                continue
            tp = TopicPartition(TOPIC, p)
            pos = self.positions.get(tp, self.broker.committed.get(tp, 0))
            batch = records[pos : pos + room]
            if batch:
                out[tp] = [
                    SimpleNamespace(
                        topic=TOPIC,
                        partition=p,
                        offset=pos + i,
                        key=k,
                        value=v,
                        headers=h,
                        timestamp=1,
                    )
                    for i, (k, v, h) in enumerate(batch)
                ]
                self.positions[tp] = pos + len(batch)
                room -= len(batch)
        return out

    def run_callbacks(self) -> None:
        """Commit callbacks run on the consumer's thread, in poll() and commit()."""
        while self.pending_callbacks:
            callback, offsets, exc = self.pending_callbacks.pop(0)
            callback(offsets, exc)

    def commit(self, offsets: dict[TopicPartition, Any], timeout_ms: int) -> None:
        self.run_callbacks()
        if self.broker.fail_commits:
            raise self.broker.fail_commits.pop(0)
        plain = {tp: om.offset for tp, om in offsets.items()}
        self.broker.commits.append(plain)
        self.broker.committed.update(plain)

    def commit_async(self, offsets: dict[TopicPartition, Any], callback: Any) -> None:
        """kafka-python 3 refuses a blocking commit() inside a rebalance listener."""
        error: Exception | None = None
        if self.broker.fail_commits:
            error = self.broker.fail_commits.pop(0)
        else:
            plain = {tp: om.offset for tp, om in offsets.items()}
            self.broker.commits.append(plain)
            self.broker.committed.update(plain)
        self.pending_callbacks.append((callback, offsets, error))

    def close(self, autocommit: bool) -> None:
        assert autocommit is False
        self.closed = True


class FakeProducer:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def send(self, topic: str, key: Any, value: Any, headers: Any) -> Any:
        if self.broker.fail_dead_letter:
            raise KafkaTimeoutError("no broker")
        self.broker.dead_letters.append(
            {"topic": topic, "key": key, "value": value, "headers": dict(headers)}
        )
        return SimpleNamespace(get=lambda timeout: None)

    def close(self, timeout: float) -> None:
        pass


def stream(broker: Broker, cls: Any = EventStream, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "group_id": "billing",
        "bootstrap_servers": "fake:9092",
        "poll_timeout_ms": 1,
        "idle_timeout_ms": 0,  # stop at the first empty poll
        "retry": RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_seconds=1),
        "consumer_factory": broker.consumer_factory,
        "producer_factory": broker.producer_factory,
    }
    options.update(kw)
    return cls(TOPIC, **options)


def offset0(broker: Broker) -> int | None:
    return broker.committed.get(TopicPartition(TOPIC, 0))


# -- iteration and commit modes ------------------------------------------------------------------


def test_iteration_yields_parsed_events_and_commits_per_batch() -> None:
    broker = Broker()
    ids = broker.publish(10)
    seen: list[ConsumedEvent] = []
    with stream(broker, commit="batch", max_poll_records=4) as s:
        for event in s:
            seen.append(event)
    assert [e.id for e in seen] == ids
    assert seen[3].payload == {"i": 3} and seen[3].key == "k3"
    # after each exhausted batch, then the rest at close
    assert broker.commits == [{TopicPartition(TOPIC, 0): n} for n in (4, 8, 10)]
    assert s.committed_offsets == {(TOPIC, 0): 10}
    assert broker.consumer is not None and broker.consumer.closed
    config = broker.consumer.config
    assert config["enable_auto_commit"] is False
    assert config["isolation_level"] == "read_committed"


def test_message_mode_commits_before_handing_out_the_next_event() -> None:
    broker = Broker()
    broker.publish(3)
    with stream(broker, commit="message") as s:
        for event in s:
            # everything before this event is committed, this one is not
            assert offset0(broker) == (event.offset or None)
    assert [c[TopicPartition(TOPIC, 0)] for c in broker.commits] == [1, 2, 3]


def test_auto_mode_commits_processed_offsets_at_the_interval() -> None:
    broker = Broker()
    broker.publish(6)
    now = [0.0]
    with stream(broker, commit="auto", commit_interval_ms=1000, clock=lambda: now[0]) as s:
        for event in s:
            if event.offset == 3:
                assert broker.commits == []  # the interval is not over
                now[0] = 1.5
            if event.offset == 4:
                # offsets 0-3 were processed when 4 was asked for: committed, 4 is not
                assert broker.commits == [{TopicPartition(TOPIC, 0): 4}]
    assert offset0(broker) == 6


def test_an_exception_in_the_loop_leaves_the_event_unprocessed() -> None:
    broker = Broker()
    broker.publish(5)

    def consume(s: EventStream) -> None:
        for event in s:
            if event.offset == 2:
                raise RuntimeError("handler bug")

    with pytest.raises(RuntimeError), stream(broker, commit="batch") as s:
        consume(s)
    assert offset0(broker) == 2  # 0 and 1 processed; 2 is delivered again


def test_close_without_the_in_hand_event() -> None:
    broker = Broker()
    broker.publish(2)
    s = stream(broker, commit="batch").open()
    next(s)
    next(s)
    s.close(in_hand_done=False)
    assert offset0(broker) == 1


def test_batches_are_processed_when_the_next_is_asked_for() -> None:
    broker = Broker()
    broker.publish(5)
    sizes = []
    with stream(broker, commit="batch", max_poll_records=2) as s:
        for batch in s.batches():
            sizes.append(len(batch))
            assert offset0(broker) == (batch[0].offset or None)
    assert sizes == [2, 2, 1]
    assert offset0(broker) == 5


def test_commit_refused_after_a_rebalance_is_not_fatal() -> None:
    broker = Broker()
    broker.publish(3)
    broker.fail_commits = [CommitFailedError("rebalanced"), KafkaTimeoutError("slow")]
    metrics = ConsumerMetrics()
    with stream(broker, commit="message", observer=metrics) as s:
        list(s)
    assert offset0(broker) == 3
    assert metrics.registry.get_sample_value("outbox_cdc_consumer_offset_commit_errors_total") == 2


def test_revoked_partitions_are_committed_and_forgotten() -> None:
    broker = Broker()
    broker.publish(2, partition=0)
    broker.publish(2, partition=1, start=2)
    with stream(broker, commit="auto", commit_interval_ms=600_000) as s:
        it = iter(s)
        events = [next(it) for _ in range(4)]
        assert broker.commits == []
        assert broker.consumer is not None
        broker.consumer.rebalance_next_poll = [TopicPartition(TOPIC, 1)]
        assert list(it) == []
    assert [e.partition for e in events] == [0, 0, 1, 1]
    # the revocation committed what was processed of the revoked partition, before it went
    # away; the rest at close
    assert broker.commits == [{TopicPartition(TOPIC, 1): 2}, {TopicPartition(TOPIC, 0): 2}]
    assert s.committed_offsets == {(TOPIC, 0): 2, (TOPIC, 1): 2}


def test_a_failed_commit_before_a_rebalance_is_counted_not_fatal() -> None:
    broker = Broker()
    broker.publish(2, partition=0)
    broker.publish(2, partition=1, start=2)
    broker.fail_commits = [CommitFailedError("generation")]
    metrics = ConsumerMetrics()
    with stream(broker, commit="auto", commit_interval_ms=600_000, observer=metrics) as s:
        it = iter(s)
        for _ in range(4):
            next(it)
        assert broker.consumer is not None
        broker.consumer.rebalance_next_poll = [TopicPartition(TOPIC, 1)]
        assert list(it) == []
    assert metrics.registry.get_sample_value("outbox_cdc_consumer_offset_commit_errors_total") == 1
    assert broker.commits == [{TopicPartition(TOPIC, 0): 2}]  # partition 1: its next owner redoes


# -- run(): retries, dead letters ---------------------------------------------------------------


def test_run_retries_then_succeeds() -> None:
    broker = Broker()
    broker.publish(2)
    calls: list[int] = []
    metrics = ConsumerMetrics()

    def handler(event: ConsumedEvent) -> None:
        calls.append(event.offset)
        if event.offset == 0 and calls.count(0) < 3:
            raise TimeoutError("db busy")

    with stream(broker, observer=metrics) as s:
        s.run(handler)
    assert calls == [0, 0, 0, 1]
    assert broker.dead_letters == []
    assert offset0(broker) == 2
    value = metrics.registry.get_sample_value
    assert (
        value("outbox_cdc_consumer_handler_errors_total", {"topic": TOPIC, "error": "TimeoutError"})
        == 2
    )
    assert value("outbox_cdc_consumer_events_processed_total", {"topic": TOPIC}) == 2
    assert value("outbox_cdc_consumer_events_consumed_total", {"topic": TOPIC}) == 2
    assert value("outbox_cdc_consumer_processing_seconds_count") == 2


def test_poison_event_goes_to_the_dead_letter_topic_and_the_others_go_on() -> None:
    broker = Broker()
    ids = broker.publish(3)
    done: list[int] = []
    metrics = ConsumerMetrics()

    def handler(event: ConsumedEvent) -> None:
        if event.offset == 1:
            raise ValueError("cannot bill this order")
        done.append(event.offset)

    with stream(broker, dead_letter_topic=DLQ, observer=metrics) as s:
        s.run(handler)
    assert done == [0, 2]
    assert offset0(broker) == 3
    [dlq] = broker.dead_letters
    assert dlq["topic"] == DLQ and dlq["key"] == b"k1"
    assert dlq["headers"]["ce_id"] == ids[1].encode()
    assert dlq["headers"]["outbox_cdc_error"] == b"cannot bill this order"
    assert dlq["headers"]["outbox_cdc_attempts"] == b"3"
    assert dlq["headers"]["outbox_cdc_original_offset"] == b"1"
    assert (
        metrics.registry.get_sample_value(
            "outbox_cdc_consumer_dead_lettered_total", {"topic": TOPIC, "reason": "handler"}
        )
        == 1
    )


def test_retry_budget_bounds_how_long_a_poison_event_blocks() -> None:
    broker = Broker()
    broker.publish(2)
    attempts = []
    retry = RetryPolicy(max_attempts=1000, initial_backoff_s=0.01, max_seconds=0.05)

    def handler(event: ConsumedEvent) -> None:
        if event.offset == 0:
            attempts.append(1)
            raise RuntimeError("poison")

    with stream(broker, dead_letter_topic=DLQ, retry=retry) as s:
        s.run(handler)
    assert 2 <= len(attempts) <= 6  # ~0.01 + 0.02 (+0.04 > budget): given up within 0.05 s
    assert len(broker.dead_letters) == 1
    assert offset0(broker) == 2


def test_without_a_dead_letter_topic_the_stream_stops_before_the_poison_event() -> None:
    broker = Broker()
    broker.publish(3)

    def handler(event: ConsumedEvent) -> None:
        if event.offset == 1:
            raise ValueError("nope")

    with pytest.raises(HandlerFailedError, match="after 3 attempt") as info, stream(broker) as s:
        s.run(handler)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.attempts == 3
    assert offset0(broker) == 1  # delivered again on restart: never dropped


def test_unparsable_records_are_dead_lettered_without_reaching_the_handler() -> None:
    broker = Broker()
    broker.publish(1)
    broker.publish_raw(b"not an event", [("x", b"y")])
    broker.publish_raw(
        b"{bad json", to_record(create_event(topic=TOPIC, type="t", payload={})).headers
    )
    broker.publish(1, start=1)
    handled: list[int] = []
    metrics = ConsumerMetrics()
    with stream(broker, dead_letter_topic=DLQ, observer=metrics) as s:
        s.run(lambda e: handled.append(e.offset))
    assert handled == [0, 3]
    assert [d["headers"]["outbox_cdc_attempts"] for d in broker.dead_letters] == [b"0", b"0"]
    assert broker.dead_letters[0]["value"] == b"not an event"
    assert b"JSONDecodeError" in broker.dead_letters[1]["headers"]["outbox_cdc_error"]
    assert offset0(broker) == 4
    assert (
        metrics.registry.get_sample_value(
            "outbox_cdc_consumer_dead_lettered_total", {"topic": TOPIC, "reason": "unparsable"}
        )
        == 2
    )


def test_unparsable_record_without_dead_letter_topic_stops_the_stream() -> None:
    broker = Broker()
    broker.publish(1)
    broker.publish_raw(b"x", [])
    with pytest.raises(EventParseError), stream(broker) as s:
        list(s)
    assert offset0(broker) == 1


def test_batches_stop_before_an_unparsable_record_in_order() -> None:
    broker = Broker()
    broker.publish(2)
    broker.publish_raw(b"x", [])
    broker.publish(1, start=2)
    with stream(broker, dead_letter_topic=DLQ, max_poll_records=10) as s:
        batches = [[e.offset for e in b] for b in s.batches()]
    assert batches == [[0, 1], [3]]
    assert len(broker.dead_letters) == 1


def test_dead_letter_not_acknowledged_stops_without_committing_it() -> None:
    broker = Broker()
    broker.publish(2)
    broker.fail_dead_letter = True

    def handler(event: ConsumedEvent) -> None:
        if event.offset == 1:
            raise ValueError("x")

    with (
        pytest.raises(ConsumerError, match="not acknowledged"),
        stream(broker, dead_letter_topic=DLQ) as s,
    ):
        s.run(handler)
    assert offset0(broker) == 1


def test_stop_during_a_retry_leaves_the_event_unprocessed() -> None:
    broker = Broker()
    broker.publish(3)
    retry = RetryPolicy(max_attempts=5, initial_backoff_s=5, max_seconds=20)

    with stream(broker, retry=retry, dead_letter_topic=DLQ) as s:

        def handler(event: ConsumedEvent) -> None:
            if event.offset == 1:
                s.stop()
                raise RuntimeError("stop while failing")

        s.run(handler)
    assert offset0(broker) == 1
    assert broker.dead_letters == []


def test_options_are_checked() -> None:
    broker = Broker()
    with pytest.raises(ConfigurationError, match="commit mode"):
        stream(broker, commit="never")
    with pytest.raises(ConfigurationError, match="must not be one of the consumed topics"):
        stream(broker, dead_letter_topic=TOPIC)
    with pytest.raises(ConfigurationError, match="isolation_level"):
        stream(broker, isolation_level="dirty")
    with pytest.raises(ConfigurationError, match="max_poll_interval_ms"):
        stream(broker, retry=RetryPolicy(max_seconds=400))
    with pytest.raises(ConfigurationError, match="not a legal Kafka topic"):
        EventStream("bad topic!", group_id="g", bootstrap_servers="x")
    with pytest.raises(ConfigurationError, match="unexpected keyword"):
        stream(broker, no_such_option=1)
    with pytest.raises(ConsumerError, match="not open"):
        next(iter(stream(broker)))


# -- async twin ---------------------------------------------------------------------------------


async def test_async_stream_runs_async_handlers_with_the_same_semantics() -> None:
    broker = Broker()
    broker.publish(4)
    handled: list[int] = []
    fails = {2: 1}

    async def handler(event: ConsumedEvent) -> None:
        await asyncio.sleep(0)
        if fails.get(event.offset):
            fails[event.offset] -= 1
            raise RuntimeError("once")
        handled.append(event.offset)

    async with stream(broker, AsyncEventStream, commit="message", dead_letter_topic=DLQ) as s:
        await s.run(handler)
    assert handled == [0, 1, 2, 3]
    assert offset0(broker) == 4
    assert [c[TopicPartition(TOPIC, 0)] for c in broker.commits] == [1, 2, 3, 4]


async def test_async_iteration_and_batches() -> None:
    broker = Broker()
    broker.publish(5)
    async with stream(broker, AsyncEventStream, max_poll_records=3) as s:
        first = [e.offset async for e in s]
    assert first == [0, 1, 2, 3, 4]
    broker2 = Broker()
    broker2.publish(5)
    async with stream(broker2, AsyncEventStream, max_poll_records=3) as s2:
        sizes = [len(b) async for b in s2.batches()]
    assert sizes == [3, 2]
    assert offset0(broker2) == 5


async def test_async_stop_during_retry() -> None:
    broker = Broker()
    broker.publish(2)
    retry = RetryPolicy(max_attempts=5, initial_backoff_s=5, max_seconds=20)
    async with stream(broker, AsyncEventStream, retry=retry) as s:

        async def handler(event: ConsumedEvent) -> None:
            asyncio.get_running_loop().call_soon(s.stop)
            raise RuntimeError("x")

        await asyncio.wait_for(s.run(handler), 5)
    assert offset0(broker) is None


def test_metrics_names() -> None:
    metrics = ConsumerMetrics()
    names = {m.name for m in metrics.registry.collect()}
    assert names == {
        "outbox_cdc_consumer_events_consumed",
        "outbox_cdc_consumer_events_processed",
        "outbox_cdc_consumer_duplicates_skipped",
        "outbox_cdc_consumer_handler_errors",
        "outbox_cdc_consumer_dead_lettered",
        "outbox_cdc_consumer_processing_seconds",
        "outbox_cdc_consumer_offset_commits",
        "outbox_cdc_consumer_offset_commit_errors",
    }
