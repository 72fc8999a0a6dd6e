"""The consumer stream against a real Kafka broker: the relay's records parsed back, dead letters
read back from their topic, read_committed behind Kafka transactions, several topics, the async
twin, and the offsets each commit mode leaves in the group."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from outbox_cdc.consumer import (
    AsyncEventStream,
    ConsumedEvent,
    ConsumerMetrics,
    EventStream,
    RetryPolicy,
)
from outbox_cdc.events import KafkaRecord, create_event, to_record
from outbox_cdc.sinks.kafka import KafkaOptions, KafkaSink
from tests.support.kafka import consume_all, delete_topic

pytestmark = pytest.mark.kafka

FAST: dict[str, Any] = {"poll_timeout_ms": 200, "session_timeout_ms": 10_000}


def _records(topic: str, n: int, **kw: Any) -> list[KafkaRecord]:
    return [
        to_record(create_event(topic=topic, type="order.created", key=f"k{i}", payload={"i": i}))
        for i in range(n)
    ]


def _send(bootstrap: str, records: list[KafkaRecord]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for r in records:
            producer.send(r.topic, key=r.key, value=r.value, headers=r.headers)
        producer.flush(30)
    finally:
        producer.close()


def _committed(bootstrap: str, group: str, topic: str, partition: int = 0) -> int | None:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        value = c.committed(TopicPartition(topic, partition))
        return None if value is None else int(value)
    finally:
        c.close(autocommit=False)


@pytest.fixture
def dlq_topic(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    name = unique_name("dlq")
    yield name
    delete_topic(kafka_bootstrap, name)


def test_the_relay_sinks_records_come_back_as_events(
    kafka_bootstrap: str, kafka_topic: str, unique_name: Callable[[str], str]
) -> None:
    events = [
        create_event(
            topic=kafka_topic,
            type="order.created",
            key="o-1",
            payload={"order": 1, "total": "9.90"},
            headers={"traceparent": "00-abc-01", "raw": b"\x00\xff"},
        ),
        create_event(topic=kafka_topic, type="note", payload="héllo"),
        create_event(topic=kafka_topic, type="blob", key="b", payload=b"\x00\x01\x02"),
    ]
    sink = KafkaSink(KafkaOptions(bootstrap_servers=kafka_bootstrap))
    errors: list[BaseException | None] = []
    try:
        for e in events:
            sink.send(to_record(e), errors.append)
        sink.flush(30)
    finally:
        sink.close(10)
    assert errors == [None] * 3
    got: list[ConsumedEvent] = []
    with EventStream(
        kafka_topic, group_id=unique_name("g"), bootstrap_servers=kafka_bootstrap, **FAST
    ) as stream:
        for event in stream:
            got.append(event)
            if len(got) == 3:
                break
    assert [(g.id, g.type, g.key, g.payload) for g in got] == [
        (str(e.id), e.type, e.key, p)
        for e, p in zip(
            events, [{"order": 1, "total": "9.90"}, "héllo", b"\x00\x01\x02"], strict=True
        )
    ]
    assert got[0].headers == (("traceparent", b"00-abc-01"), ("raw", b"\x00\xff"))
    assert got[0].time == events[0].created_at
    assert got[0].source == "outbox-cdc"
    assert stream.committed_offsets == {(kafka_topic, 0): 3}


def test_dead_letters_carry_the_record_and_the_error(
    kafka_bootstrap: str, kafka_topic: str, dlq_topic: str, unique_name: Callable[[str], str]
) -> None:
    good = _records(kafka_topic, 3)
    not_an_event = KafkaRecord(kafka_topic, b"x", b"plain", [("h", b"v")], "")
    _send(kafka_bootstrap, [good[0], not_an_event, good[1], good[2]])
    group = unique_name("g")
    metrics = ConsumerMetrics()
    handled: list[int] = []

    with EventStream(
        kafka_topic,
        group_id=group,
        bootstrap_servers=kafka_bootstrap,
        dead_letter_topic=dlq_topic,
        retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01),
        observer=metrics,
        **FAST,
    ) as stream:

        def handler(event: ConsumedEvent) -> None:
            if event.key == "k1":
                raise ValueError("cannot bill order k1")
            handled.append(event.offset)
            if event.offset == 3:
                stream.stop()

        stream.run(handler)

    assert handled == [0, 3]
    assert _committed(kafka_bootstrap, group, kafka_topic) == 4
    dead = consume_all(kafka_bootstrap, dlq_topic, 2, timeout=20)
    assert [d.value for d in dead] == [b"plain", good[1].value]
    unparsable, failed = (dict(d.headers) for d in dead)
    assert unparsable["h"] == b"v"
    assert unparsable["outbox_cdc_error_class"] == b"outbox_cdc.errors.EventParseError"
    assert unparsable["outbox_cdc_attempts"] == b"0"
    assert unparsable["outbox_cdc_original_offset"] == b"1"
    assert failed["ce_id"] == good[1].event_id.encode()
    assert failed["outbox_cdc_error"] == b"cannot bill order k1"
    assert failed["outbox_cdc_error_class"] == b"ValueError"
    assert failed["outbox_cdc_attempts"] == b"2"
    assert failed["outbox_cdc_original_topic"] == kafka_topic.encode()
    assert failed["outbox_cdc_original_offset"] == b"2"
    assert failed["outbox_cdc_consumer_group"] == group.encode()
    assert dead[1].key == b"k1"
    value = metrics.registry.get_sample_value
    assert (
        value(
            "outbox_cdc_consumer_dead_lettered_total", {"topic": kafka_topic, "reason": "handler"}
        )
        == 1
    )
    assert (
        value(
            "outbox_cdc_consumer_dead_lettered_total",
            {"topic": kafka_topic, "reason": "unparsable"},
        )
        == 1
    )


def test_read_committed_skips_aborted_transactions(
    kafka_bootstrap: str, kafka_topic: str, unique_name: Callable[[str], str]
) -> None:
    aborted, committed = _records(kafka_topic, 2), _records(kafka_topic, 1)
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=unique_name("tx"), acks="all"
    )
    try:
        producer.init_transactions()
        for batch, commit in ((aborted, False), (committed, True)):
            producer.begin_transaction()
            for r in batch:
                producer.send(r.topic, key=r.key, value=r.value, headers=r.headers)
            producer.flush(30)
            if commit:
                producer.commit_transaction()
            else:
                producer.abort_transaction()
    finally:
        producer.close()

    def read(isolation: str) -> list[str]:
        got: list[str] = []
        with EventStream(
            kafka_topic,
            group_id=unique_name("g"),
            bootstrap_servers=kafka_bootstrap,
            isolation_level=isolation,
            idle_timeout_ms=1500,
            **FAST,
        ) as stream:
            got.extend(e.id for e in stream)
        return got

    assert read("read_committed") == [committed[0].event_id]
    assert read("read_uncommitted") == [r.event_id for r in aborted + committed]


def test_several_topics_in_one_group(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topics = [unique_name("orders"), unique_name("payments")]
    try:
        sent = _records(topics[0], 2) + _records(topics[1], 3)
        _send(kafka_bootstrap, sent)
        got: set[str] = set()
        with EventStream(
            topics, group_id=unique_name("g"), bootstrap_servers=kafka_bootstrap, **FAST
        ) as stream:
            for event in stream:
                got.add(event.id)
                if len(got) == len(sent):
                    break
        assert got == {r.event_id for r in sent}
        assert stream.committed_offsets == {(topics[0], 0): 2, (topics[1], 0): 3}
    finally:
        for t in topics:
            delete_topic(kafka_bootstrap, t)


@pytest.mark.parametrize("mode", ["message", "batch", "auto"])
def test_a_failure_in_the_loop_commits_what_was_processed_and_nothing_after(
    mode: str, kafka_bootstrap: str, kafka_topic: str, unique_name: Callable[[str], str]
) -> None:
    """An exception escapes the loop at offset 3 (batches of 2, no interval commit): leaving the
    ``with`` block commits 0-2 in every mode, not the failed event; the next consumer of the
    group starts at it. (What a *crash* leaves per mode: test_consumer_crash.py.)"""
    _send(kafka_bootstrap, _records(kafka_topic, 6))
    group = unique_name("g")
    stream = EventStream(
        kafka_topic,
        group_id=group,
        bootstrap_servers=kafka_bootstrap,
        commit=mode,
        commit_interval_ms=60_000,
        max_poll_records=2,
        **FAST,
    )

    def consume() -> None:
        with stream:
            for event in stream:
                if event.offset == 3:
                    raise RuntimeError("crash in the handler")

    with pytest.raises(RuntimeError):
        consume()
    assert _committed(kafka_bootstrap, group, kafka_topic) == 3
    with EventStream(
        kafka_topic, group_id=group, bootstrap_servers=kafka_bootstrap, **FAST
    ) as again:
        assert next(iter(again)).offset == 3


async def test_async_stream(
    kafka_bootstrap: str, kafka_topic: str, unique_name: Callable[[str], str]
) -> None:
    sent = _records(kafka_topic, 5)
    _send(kafka_bootstrap, sent)
    got: list[str] = []
    group = unique_name("g")
    async with AsyncEventStream(
        kafka_topic, group_id=group, bootstrap_servers=kafka_bootstrap, commit="message", **FAST
    ) as stream:

        async def handler(event: ConsumedEvent) -> None:
            await asyncio.sleep(0)
            got.append(event.id)
            if len(got) == len(sent):
                stream.stop()

        await asyncio.wait_for(stream.run(handler), 60)
    assert got == [r.event_id for r in sent]
    assert _committed(kafka_bootstrap, group, kafka_topic) == 5
    assert uuid.UUID(got[0])
