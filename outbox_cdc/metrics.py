"""Prometheus metrics, as an observer of the relay (and of the insert API, on a registry the
application passes). Every metric lives in the registry given to :class:`RelayMetrics`, never
the global one; the relay core never imports prometheus_client.

Names follow the Prometheus conventions: prefix ``outbox_cdc_``, base units (seconds, bytes),
``_total`` for counters. Labels are bounded: ``topic`` (the outbox's topics), ``reason`` and
``state`` (fixed words). The reference is docs/metrics.md.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from outbox_cdc.events import KafkaRecord

PREFIX = "outbox_cdc_"
# commit-to-ack and send-to-ack: 1 ms .. 10 min
LATENCY_BUCKETS = (
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
    600.0,
)
STATES = ("starting", "streaming", "recovering", "standby", "stalled", "failing", "stopped")
ACTIVE_STATES = ("streaming", "recovering", "stalled")


class RelayMetrics:
    """The relay's metrics. Implements :class:`outbox_cdc.relay.RelayObserver` and the
    sources' clean-up hook; ``probe`` values (slot, pending rows) come from
    :class:`outbox_cdc.health.Watchdog` through :meth:`set_probe`."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        version: str = "",
        mode: str = "wal",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock
        r = self.registry
        self._published = Counter(
            PREFIX + "events_published",
            "Events Kafka acknowledged, by topic (dead-lettered events under the DLQ topic)",
            ["topic"],
            registry=r,
        )
        self._errors = Counter(
            PREFIX + "publish_errors",
            "Errors while publishing, by reason: kafka_unavailable, database_unavailable, "
            "rejected (Kafka refused a record for good), undecodable (a row that cannot "
            "become a record)",
            ["reason"],
            registry=r,
        )
        self._reconnects = Counter(
            PREFIX + "reconnects",
            "Reconnections after a failure, by target: database or kafka",
            ["target"],
            registry=r,
        )
        self._commit_to_ack = Histogram(
            PREFIX + "commit_to_ack_seconds",
            "From the source transaction's commit (the event's creation in polling mode) to "
            "Kafka's acknowledgment",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._send_to_ack = Histogram(
            PREFIX + "send_to_ack_seconds",
            "From handing the record to the Kafka producer to its acknowledgment",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._last_commit = Gauge(
            PREFIX + "last_published_commit_timestamp_seconds",
            "Commit time of the last event Kafka acknowledged (Unix time)",
            registry=r,
        )
        self._cleanup = Histogram(
            PREFIX + "cleanup_seconds",
            "Duration of one clean-up round of published outbox rows",
            registry=r,
        )
        self._cleanup_deleted = Counter(
            PREFIX + "cleanup_deleted_rows", "Outbox rows deleted by the clean-up", registry=r
        )
        self._cleanup_errors = Counter(
            PREFIX + "cleanup_errors", "Clean-up rounds that failed", registry=r
        )
        self._slot_gaps = Counter(
            PREFIX + "slot_gaps",
            "Times the replication slot was found missing or lost over a gap and recreated "
            "(its events re-published from the outbox table)",
            registry=r,
        )
        self._gap_events = Counter(
            PREFIX + "gap_events_republished",
            "Events of a slot gap re-published from the outbox table and acknowledged",
            registry=r,
        )
        self._state = Gauge(
            PREFIX + "relay_state",
            "1 for the relay's current state: starting, streaming, recovering (re-publishing "
            "a slot gap), standby, stalled (Kafka "
            "acknowledges nothing), failing (reconnecting), stopped",
            ["state"],
            registry=r,
        )
        self._active = Gauge(
            PREFIX + "relay_active",
            "1 when this relay is the active one (holds the slot or the poller lock), 0 when "
            "it is a standby or failing",
            registry=r,
        )
        info = Gauge(
            PREFIX + "build_info",
            "Always 1; the labels tell the version and the mode (wal or polling)",
            ["version", "mode"],
            registry=r,
        )
        info.labels(version=version, mode=mode).set(1)
        self._in_flight = Gauge(
            PREFIX + "events_in_flight", "Events sent to Kafka and not yet acknowledged", registry=r
        )
        self._lag_seconds = Gauge(
            PREFIX + "replication_lag_seconds",
            "Now minus the commit time of the last source transaction the relay read (WAL; "
            "with heartbeats it stays small while the outbox is idle)",
            registry=r,
        )
        self._source_time: float | None = None
        self._lag_seconds.set_function(self._lag)
        self._by_topic: dict[str, Any] = {}
        self._last_commit_value = 0.0
        self._lock = threading.Lock()
        self._probe = _ProbeCollector()
        r.register(self._probe)
        for state in STATES:
            self._state.labels(state=state).set(0)
        self.state("starting")

    # -- wiring ---------------------------------------------------------------------------------

    def bind_in_flight(self, function: Callable[[], float]) -> None:
        self._in_flight.set_function(function)

    def set_probe(self, values: dict[str, float | None]) -> None:
        """Values of the latest database probe, exported as gauges (missing = not exported)."""
        self._probe.values = dict(values)

    # -- RelayObserver --------------------------------------------------------------------------

    def published(self, record: KafkaRecord, commit_time: float, send_seconds: float) -> None:
        child = self._by_topic.get(record.topic)
        if child is None:
            child = self._by_topic[record.topic] = self._published.labels(topic=record.topic)
        child.inc()
        self._commit_to_ack.observe(max(0.0, self.clock() - commit_time))
        self._send_to_ack.observe(send_seconds)
        if commit_time > self._last_commit_value:
            self._last_commit_value = commit_time
            self._last_commit.set(commit_time)

    def source_time(self, commit_time: float) -> None:
        if self._source_time is None or commit_time > self._source_time:
            self._source_time = commit_time

    def state(self, state: str) -> None:
        base = state.split(":", 1)[0]
        with self._lock:
            for s in STATES:
                self._state.labels(state=s).set(1 if s == base else 0)
            self._active.set(1 if base in ACTIVE_STATES else 0)

    def error(self, reason: str) -> None:
        self._errors.labels(reason=reason).inc()
        if reason.endswith("_unavailable"):
            self._reconnects.labels(target=reason.removesuffix("_unavailable")).inc()

    def slot_gap(self) -> None:
        self._slot_gaps.inc()

    def gap_published(self, events: int) -> None:
        self._gap_events.inc(events)

    # -- clean-up hook --------------------------------------------------------------------------

    def cleanup(self, seconds: float, deleted: int, failed: bool) -> None:
        self._cleanup.observe(seconds)
        self._cleanup_deleted.inc(deleted)
        if failed:
            self._cleanup_errors.inc()

    def _lag(self) -> float:
        if self._source_time is None:
            return 0.0
        return max(0.0, self.clock() - self._source_time)


# Gauges filled from the watchdog's database probe: name -> help.
PROBE_GAUGES = {
    "replication_lag_bytes": "WAL bytes between the server's current position and the slot's "
    "confirmed position",
    "slot_retained_wal_bytes": "WAL the slot keeps on the server's disk (current position minus "
    "restart_lsn)",
    "slot_safe_wal_size_bytes": "WAL that can still be written before the slot is invalidated "
    "(max_slot_wal_keep_size); absent when unlimited",
    "slot_invalidated": "1 when the slot lost WAL it needed (wal_status lost): run outbox-cdc "
    "recover",
    "slot_retained_wal_warning": "1 while the retained WAL is above the warning threshold",
    "pending_rows": "Outbox rows not yet published (polling)",
    "oldest_pending_age_seconds": "Age of the oldest row not yet published (polling)",
    "probe_up": "1 when the last database probe succeeded",
}


class _ProbeCollector(Collector):
    def __init__(self) -> None:
        self.values: dict[str, float | None] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self.values
        for name, help_text in PROBE_GAUGES.items():
            value = values.get(name)
            if value is not None:
                yield GaugeMetricFamily(PREFIX + name, help_text, value=float(value))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class StoreMetrics:
    """The insert API's store timer and errors (``Outbox(..., registry=registry)``), in the
    application's registry: ``outbox_cdc_store_seconds`` and ``outbox_cdc_store_errors_total``
    (by reason: invalid_event, unsupported_connection, database)."""

    _instances: weakref.WeakKeyDictionary[CollectorRegistry, StoreMetrics] = (
        weakref.WeakKeyDictionary()
    )
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            PREFIX + "store_seconds",
            "Time the insert API spent writing events into the caller's transaction",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=registry,
        )
        self.errors = Counter(
            PREFIX + "store_errors",
            "Insert API calls that failed, by reason",
            ["reason"],
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> StoreMetrics:
        """One instance per registry: several Outbox objects share the same metrics."""
        with cls._lock:
            found = cls._instances.get(registry)
            if found is None:
                found = cls._instances[registry] = cls(registry)
            return found
