"""The partition counts of the topics the relay publishes to, as the Kafka sinks saw them: a
topic that disappears or shrinks (deleted under a running relay, then re-created by the
broker's auto-create with its default count) stops the relay with a clear error instead of
records waiting for partitions that no longer exist.

Kept per process and per cluster (bootstrap servers), across the sinks the relay builds after
retriable failures: a new sink must not take a shrunk topic for the original. The sinks check
off the per-record path: when they first use a topic, and when their client's metadata says it
changed (kafka-python: a metadata listener; confluent-kafka: a watcher thread every few
seconds), which makes the next record for that topic go through the check first.
"""

from __future__ import annotations

import threading

from outbox_cdc.errors import TopicChangedError

_lock = threading.Lock()
_seen: dict[tuple[str, str], int] = {}  # (bootstrap servers, topic) -> most partitions seen


def expected(cluster: str, topic: str) -> int | None:
    """The most partitions seen for ``topic``, or None if it was never seen."""
    return _seen.get((cluster, topic))


def changed(cluster: str, topic: str, partitions: int | None) -> bool:
    """True when ``partitions`` (None: the topic is missing) is fewer than seen before."""
    before = _seen.get((cluster, topic))
    return before is not None and (partitions is None or partitions < before)


def check(cluster: str, topic: str, partitions: int | None) -> None:
    """Record ``partitions`` for ``topic``, or raise :class:`TopicChangedError` when it is
    missing (None) or has fewer partitions than seen before."""
    with _lock:
        before = _seen.get((cluster, topic))
        if before is not None and (partitions is None or partitions < before):
            raise TopicChangedError(topic_changed_message(topic, before, partitions))
        if partitions is not None and (before is None or partitions > before):
            _seen[(cluster, topic)] = partitions


def topic_changed_message(topic: str, before: int, after: int | None) -> str:
    what = (
        "disappeared"
        if after is None
        else f"shrank from {before} to {after} partition{'' if after == 1 else 's'}"
    )
    return (
        f"Kafka topic {topic!r} {what} while the relay published to it (it had {before} "
        "partitions: deleted, and perhaps re-created by the broker's auto-create with its "
        "default partition count). Records for the lost partitions can never be acknowledged "
        "and keys would map to other partitions, so the relay stops; nothing past the "
        f"unacknowledged events is confirmed. Fix: recreate the topic with {before} "
        f"partitions (kafka-topics.sh --create --topic {topic} --partitions {before}), set "
        "auto.create.topics.enable=false on the brokers so that a deleted topic is not "
        "re-created with the default count, then restart the relay: it publishes again "
        "everything after the confirmed position"
    )


def forget() -> None:
    """For tests: forget every topic."""
    with _lock:
        _seen.clear()
