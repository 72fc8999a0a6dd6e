"""Prometheus metrics of the consumer, as an observer (:class:`outbox_cdc.consumer.observer.
ConsumerObserver`) with the registry the application gives (never the global one). The stream
and the inbox never import prometheus_client.

Names: prefix ``outbox_cdc_consumer_``, base units, ``_total`` counters. Labels are bounded:
``topic`` (the subscribed topics), ``error`` (exception class names of the handler's failures:
bounded by the code, not by the data), ``reason`` (handler or unparsable).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

PREFIX = "outbox_cdc_consumer_"
# handed out to processed: 100 us .. 5 min
PROCESSING_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class ConsumerMetrics:
    """``metrics = ConsumerMetrics(registry)``; pass it as ``observer`` to the stream and to the
    inbox. The reference is docs/consumer.md."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._consumed = Counter(
            PREFIX + "events_consumed",
            "Records fetched from Kafka, by topic (before parsing)",
            ["topic"],
            registry=r,
        )
        self._processed = Counter(
            PREFIX + "events_processed",
            "Events processed (the handler returned, duplicates skipped by the inbox included), "
            "by topic",
            ["topic"],
            registry=r,
        )
        self._duplicates = Counter(
            PREFIX + "duplicates_skipped",
            "Events the inbox found already processed, by topic",
            ["topic"],
            registry=r,
        )
        self._errors = Counter(
            PREFIX + "handler_errors",
            "Failed handler attempts (each retry counts), by topic and exception class",
            ["topic", "error"],
            registry=r,
        )
        self._dead = Counter(
            PREFIX + "dead_lettered",
            "Records sent to the dead-letter topic, by original topic and reason: handler "
            "(failed every attempt) or unparsable (not an event, or a payload that does not "
            "decode)",
            ["topic", "reason"],
            registry=r,
        )
        self._seconds = Histogram(
            PREFIX + "processing_seconds",
            "From handing an event out to its being processed (the handler's time, retries "
            "included)",
            buckets=PROCESSING_BUCKETS,
            registry=r,
        )
        self._commits = Counter(
            PREFIX + "offset_commits", "Offset commits Kafka acknowledged", registry=r
        )
        self._commit_errors = Counter(
            PREFIX + "offset_commit_errors",
            "Offset commits that failed (tried again at the next commit point)",
            registry=r,
        )

    def consumed(self, topic: str, count: int) -> None:
        self._consumed.labels(topic=topic).inc(count)

    def processed(self, topic: str, seconds: float) -> None:
        self._processed.labels(topic=topic).inc()
        self._seconds.observe(max(0.0, seconds))

    def duplicate(self, topic: str) -> None:
        self._duplicates.labels(topic=topic).inc()

    def handler_error(self, topic: str, error: str) -> None:
        self._errors.labels(topic=topic, error=error).inc()

    def dead_lettered(self, topic: str, reason: str) -> None:
        self._dead.labels(topic=topic, reason=reason).inc()

    def committed(self, partitions: int) -> None:
        self._commits.inc()

    def commit_failed(self) -> None:
        self._commit_errors.inc()
