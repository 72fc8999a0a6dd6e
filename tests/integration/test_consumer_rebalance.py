"""A second member joins the group while the first is busy (real Kafka, real PostgreSQL inbox):
the first commits what it processed before its partitions move (on_partitions_revoked), so
nothing is redelivered at the rebalance, and every event has its side effect once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from outbox_cdc.consumer import ConsumedEvent, ConsumerMetrics, EventStream, Inbox
from outbox_cdc.events import create_event, to_record

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

EVENTS = 60


@pytest.fixture
def tables(postgres_url: str, unique_name: Callable[[str], str]) -> Iterator[tuple[str, Inbox]]:
    effects = unique_name("effects")
    inbox = Inbox("billing", table=unique_name("inbox"))
    with psycopg.connect(postgres_url) as conn:
        conn.execute(f"CREATE TABLE {effects} (event_id text NOT NULL, member text NOT NULL)")
        inbox.create_table(conn)
    yield effects, inbox
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {effects}, {inbox.table}")


def test_a_member_joining_gets_committed_offsets(
    postgres_url: str,
    kafka_bootstrap: str,
    kafka_topic: str,
    unique_name: Callable[[str], str],
    tables: tuple[str, Inbox],
) -> None:
    effects, inbox = tables
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(kafka_topic, num_partitions=2, replication_factor=1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    ids = []
    for i in range(EVENTS):
        r = to_record(create_event(topic=kafka_topic, type="t", key=f"k{i}", payload={"i": i}))
        producer.send(r.topic, key=r.key, value=r.value, headers=r.headers, partition=i % 2)
        ids.append(r.event_id)
    producer.flush(30)
    producer.close()

    group = unique_name("g")
    done = threading.Event()
    deliveries: dict[str, int] = {"a": 0, "b": 0}
    lock = threading.Lock()
    streams: dict[str, EventStream] = {}
    errors: list[BaseException] = []
    metrics = {"a": ConsumerMetrics(), "b": ConsumerMetrics()}

    def member(name: str) -> None:
        stream = EventStream(
            kafka_topic,
            group_id=group,
            bootstrap_servers=kafka_bootstrap,
            commit="auto",
            commit_interval_ms=600_000,  # no interval commit: only the rebalance and close commit
            max_poll_records=5,
            poll_timeout_ms=100,
            session_timeout_ms=6000,
            observer=metrics[name],
        )
        streams[name] = stream
        with psycopg.connect(postgres_url, autocommit=True) as conn:

            def handle(event: ConsumedEvent) -> None:
                time.sleep(0.08)
                with conn.transaction():
                    if inbox.claim(conn, event):
                        conn.execute(f"INSERT INTO {effects} VALUES (%s, %s)", (event.id, name))
                with lock:
                    deliveries[name] += 1
                    if sum(deliveries.values()) >= EVENTS:
                        done.set()

            try:
                with stream:
                    stream.run(handle)
            except BaseException as exc:
                errors.append(exc)
                done.set()

    a = threading.Thread(target=member, args=("a",))
    a.start()
    deadline = time.monotonic() + 20
    while deliveries["a"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    b = threading.Thread(target=member, args=("b",))
    b.start()
    assert done.wait(60), deliveries
    for s in streams.values():
        s.stop()
    a.join(30)
    b.join(30)
    assert errors == []

    with psycopg.connect(postgres_url) as conn:
        rows: list[Any] = conn.execute(f"SELECT event_id, member FROM {effects}").fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)  # every event once
    assert deliveries["b"] > 0, "the second member never got a partition"
    # the first member committed before its partitions moved: nothing was delivered twice
    assert sum(deliveries.values()) == EVENTS
    duplicates = sum(
        m.registry.get_sample_value(
            "outbox_cdc_consumer_duplicates_skipped_total", {"topic": kafka_topic}
        )
        or 0
        for m in metrics.values()
    )
    assert duplicates == 0
    commits_a = metrics["a"].registry.get_sample_value("outbox_cdc_consumer_offset_commits_total")
    assert commits_a is not None and commits_a >= 2  # at the rebalance, and at close
