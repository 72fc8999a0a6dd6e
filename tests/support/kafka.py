"""Kafka helpers for tests: read a topic back, delete a topic."""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, UnknownTopicOrPartitionError


def consume_all(
    bootstrap: str,
    topic: str,
    expected_count: int,
    timeout: float = 30.0,
    *,
    settle: float = 0.0,
    isolation_level: str = "read_committed",
    **consumer_config: Any,
) -> list[Any]:
    """Read ``topic`` from the beginning of every partition; return the ConsumerRecords.

    Returns as soon as ``expected_count`` records have arrived (then keeps reading ``settle``
    more seconds, to catch duplicates), or when ``timeout`` runs out: the caller asserts on the
    count, so a shortfall shows as a plain length mismatch. The topic may not exist yet: it is
    waited for (and never auto-created by this consumer). No consumer group is used, so nothing
    is committed. Records are in arrival order; within a partition, in offset order.
    ``read_committed`` hides aborted and still-open transactions.
    """
    deadline = time.monotonic() + timeout
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level=isolation_level,
        allow_auto_create_topics=False,
        client_id="outbox-cdc-tests-consume-all",
        **consumer_config,
    )
    records: list[Any] = []
    try:
        partitions = _wait_for_partitions(consumer, topic, deadline)
        if partitions is None:
            return records
        assignment = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assignment)
        consumer.seek_to_beginning(*assignment)
        settle_until: float | None = None
        while True:
            now = time.monotonic()
            if now >= deadline or (settle_until is not None and now >= settle_until):
                break
            wait_until = deadline if settle_until is None else min(deadline, settle_until)
            batch = consumer.poll(timeout_ms=max(1, int((wait_until - now) * 1000)))
            for tp in sorted(batch, key=lambda tp: tp.partition):
                records.extend(batch[tp])
            if settle_until is None and len(records) >= expected_count:
                if settle <= 0:
                    break
                settle_until = time.monotonic() + settle
    finally:
        consumer.close()
    return records


def _wait_for_partitions(consumer: KafkaConsumer, topic: str, deadline: float) -> set[int] | None:
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return set(partitions)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)
        consumer.topics()  # refreshes the metadata


def delete_topic(bootstrap: str, topic: str, timeout: float = 10.0) -> None:
    """Delete ``topic``; a topic that does not exist is fine."""
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="outbox-cdc-tests-admin",
        request_timeout_ms=int(timeout * 1000),
        bootstrap_timeout_ms=int(timeout * 1000),
    )
    try:
        admin.delete_topics([topic], timeout_ms=int(timeout * 1000))
    except UnknownTopicOrPartitionError:
        pass
    except KafkaError as exc:
        if "UnknownTopicOrPartition" not in repr(exc):
            raise
    finally:
        admin.close()
