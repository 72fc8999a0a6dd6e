"""Metrics and health without servers: the relay with an in-memory source and sink feeding
RelayMetrics, the watchdog's readiness rules with scripted probes, and the HTTP endpoints on a
local port. End-to-end checks against PostgreSQL and Kafka are in
tests/integration/test_operations.py."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime

import pytest

from outbox_cdc.errors import OutboxError
from outbox_cdc.events import OutboxEvent
from outbox_cdc.health import HealthServer, Watchdog
from outbox_cdc.metrics import PROBE_GAUGES, RelayMetrics
from outbox_cdc.protocol import wal2json
from outbox_cdc.relay import Relay, RelayOptions
from outbox_cdc.sinks.memory import MemorySink
from outbox_cdc.sources.base import Begin, Commit, Item
from tests.unit.test_relay import FakeSource


def event(n: int, topic: str = "orders") -> OutboxEvent:
    return OutboxEvent(
        id=uuid.UUID(int=n),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        topic=topic,
        type="x",
        payload=b"p",
        content_type="text/plain",
    )


def test_relay_metrics_count_latency_and_state() -> None:
    now = [1_000_000.0]
    metrics = RelayMetrics(version="9.9", mode="wal", clock=lambda: now[0])
    items: list[Item] = [
        Begin(now[0] - 2.0),
        event(1),
        event(2, "payments"),
        Commit(10, now[0] - 2.0),
        Begin(now[0] - 1.0),
        Commit(20, now[0] - 1.0),  # an empty transaction (e.g. a heartbeat)
    ]
    source = FakeSource(items)
    relay = Relay(source, MemorySink, RelayOptions(), observer=metrics)
    metrics.bind_in_flight(lambda: relay.tracker.in_flight)
    source.relay = relay
    states: list[str] = []
    original = metrics.state

    def record_state(state: str) -> None:
        states.append(state)
        original(state)

    metrics.state = record_state  # type: ignore[method-assign]
    t = threading.Thread(target=relay.run)
    t.start()
    t.join(10)
    value = metrics.registry.get_sample_value
    assert value("outbox_cdc_events_published_total", {"topic": "orders"}) == 1
    assert value("outbox_cdc_events_published_total", {"topic": "payments"}) == 1
    assert value("outbox_cdc_commit_to_ack_seconds_count") == 2
    assert value("outbox_cdc_commit_to_ack_seconds_sum") == 4.0  # 2 s each, by the fake clock
    assert value("outbox_cdc_send_to_ack_seconds_count") == 2
    assert value("outbox_cdc_last_published_commit_timestamp_seconds") == now[0] - 2.0
    assert value("outbox_cdc_replication_lag_seconds") == 1.0  # the empty transaction's time
    assert value("outbox_cdc_build_info", {"version": "9.9", "mode": "wal"}) == 1
    assert value("outbox_cdc_events_in_flight") == 0
    assert states[0] == "streaming" and states[-1] == "stopped"
    assert value("outbox_cdc_relay_state", {"state": "stopped"}) == 1
    assert value("outbox_cdc_relay_state", {"state": "streaming"}) == 0
    assert value("outbox_cdc_relay_active") == 0


def test_errors_count_reconnects_by_target_and_probe_gauges_appear_when_set() -> None:
    metrics = RelayMetrics()
    metrics.error("kafka_unavailable")
    metrics.error("database_unavailable")
    metrics.error("rejected")
    metrics.state("failing:SinkError")
    value = metrics.registry.get_sample_value
    assert value("outbox_cdc_reconnects_total", {"target": "kafka"}) == 1
    assert value("outbox_cdc_reconnects_total", {"target": "database"}) == 1
    assert value("outbox_cdc_publish_errors_total", {"reason": "rejected"}) == 1
    assert value("outbox_cdc_relay_state", {"state": "failing"}) == 1
    assert value("outbox_cdc_pending_rows") is None  # not probed: not exported
    metrics.set_probe({name: 1.0 for name in PROBE_GAUGES} | {"pending_rows": 7.0})
    assert value("outbox_cdc_pending_rows") == 7.0
    metrics.set_probe({"pending_rows": None})
    assert value("outbox_cdc_pending_rows") is None


def test_commit_time_is_read_from_wal2json_begin_without_parsing_json() -> None:
    frame = (
        b'{"action":"B","xid":744,"timestamp":"2026-11-26 07:05:08.787986+00",'
        b'"lsn":"0/197AE70","nextlsn":"0/197AEA0"}'
    )
    expected = datetime(2026, 11, 26, 7, 5, 8, 787986, tzinfo=UTC).timestamp()
    assert wal2json.commit_time(frame) == expected
    assert wal2json.commit_time(b'{"action":"B","xid":1}') is None
    assert wal2json.commit_time(b'{"action":"B","timestamp":"garbage"}') is None


class View:
    def __init__(self, state: str) -> None:
        self.state = state
        self.loop_time = time.monotonic()


def test_readiness_needs_streaming_or_standby_and_kafka() -> None:
    kafka_up = [True]

    def kafka_probe() -> None:
        if not kafka_up[0]:
            raise OutboxError("Kafka did not answer a metadata request: refused")

    view = View("streaming")
    dog = Watchdog(view, kafka_probe, lambda: {"pending_rows": 3.0}, RelayMetrics())
    dog.check_once()
    assert dog.ready()[0]
    view.state = "standby"
    assert dog.ready()[0]
    for state in ("stalled", "failing:SourceError", "stopped", ""):
        view.state = state
        assert not dog.ready()[0], state
    view.state = "streaming"
    kafka_up[0] = False
    dog.check_once()
    ok, detail = dog.ready()
    assert not ok and "refused" in detail["kafka"]
    assert dog.alive()[0]
    view.loop_time -= 1000  # the relay's loop has not passed for a long time
    assert not dog.alive()[0]


def test_http_endpoints_answer_with_status_and_reason() -> None:
    metrics = RelayMetrics(version="1.2.3")
    view = View("streaming")
    dog = Watchdog(view, lambda: None, None, metrics)
    dog.check_once()
    server = HealthServer("127.0.0.1", 0, dog, metrics).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(base + "/readyz", timeout=5) as r:
            assert r.status == 200
            assert json.loads(r.read())["state"] == "streaming"
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            assert b'outbox_cdc_build_info{mode="wal",version="1.2.3"} 1.0' in r.read()
        view.state = "failing:SinkError"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert info.value.code == 503
        assert json.loads(info.value.read())["status"] == "unavailable"
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            assert r.status == 200
    finally:
        server.stop()


def test_the_relay_stays_alive_while_it_waits_for_a_retry_or_as_a_standby() -> None:
    relay = Relay(FakeSource([]), MemorySink, RelayOptions())
    relay.loop_time = 0.0
    relay._sleep(0.05)
    assert time.monotonic() - relay.loop_time < 1.0
