"""Operations against real PostgreSQL, Kafka and SQLite, with ``outbox-cdc start`` as a process:
the Prometheus endpoint during an end-to-end run, /healthz and /readyz while the broker goes away
and comes back, heartbeats, JSON logs, and the retention clean-up under concurrent inserts."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_cdc import Outbox
from outbox_cdc.schema import ddl, statements
from tests.acceptance.harness import (
    RelayProcess,
    relay_env,
)
from tests.support.kafka import consume_all
from tests.support.services import ServiceControl

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of ``name{labels}`` in a Prometheus text exposition, or None."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    return None


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def relay_factory(
    tmp_path: Path,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    replication_slot: str,
) -> Iterator[Callable[..., RelayProcess]]:
    made: list[RelayProcess] = []

    def make(**settings: Any) -> RelayProcess:
        env = relay_env(
            database_url=postgres_url,
            bootstrap=kafka_bootstrap,
            table=outbox_table,
            slot=replication_slot,
            kafka_topic_partitions=1,
            **settings,
        )
        relay = RelayProcess(env, tmp_path / "logs", f"relay{len(made) + 1}")
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.kill()


def publish_pg(url: str, table: str, topic: str, n: int, key: str = "k") -> None:
    outbox = Outbox(table, capture_trace_context=False)
    with psycopg.connect(url) as conn:
        for i in range(n):
            outbox.publish(conn, topic=topic, type="t", payload=f"{i}".encode(), key=key)


def test_metrics_count_every_event_of_an_end_to_end_run(
    relay_factory: Callable[..., RelayProcess],
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
) -> None:
    port = free_port()
    relay = relay_factory(http_port=port, heartbeat_interval=1).start()
    relay.wait_streaming()
    for batch in range(5):
        publish_pg(postgres_url, outbox_table, kafka_topic, 100, key=f"k{batch}")
    records = consume_all(kafka_bootstrap, kafka_topic, 500, timeout=60)
    assert len(records) == 500

    def scraped() -> str:
        return get(port, "/metrics")[1]

    wait_until(
        lambda: (
            metric(scraped(), "outbox_cdc_events_published_total", f'topic="{kafka_topic}"') == 500
        ),
        20,
        "the counter to reach 500",
    )
    text = scraped()
    assert metric(text, "outbox_cdc_commit_to_ack_seconds_count") == 500
    assert metric(text, "outbox_cdc_send_to_ack_seconds_count") == 500
    assert 0 < (metric(text, "outbox_cdc_commit_to_ack_seconds_sum") or 0) / 500 < 5
    assert metric(text, "outbox_cdc_relay_state", 'state="streaming"') == 1
    assert metric(text, "outbox_cdc_relay_active") == 1
    assert metric(text, "outbox_cdc_events_in_flight") == 0
    assert metric(text, "outbox_cdc_build_info", 'mode="wal",version="0.1.0.dev0"') == 1
    assert (
        abs((metric(text, "outbox_cdc_last_published_commit_timestamp_seconds") or 0) - time.time())
        < 60
    )
    # the watchdog's slot probe
    wait_until(
        lambda: metric(scraped(), "outbox_cdc_slot_retained_wal_bytes") is not None,
        15,
        "a probe of the slot",
    )
    text = scraped()
    assert metric(text, "outbox_cdc_probe_up") == 1
    assert (metric(text, "outbox_cdc_slot_retained_wal_bytes") or -1) >= 0
    assert metric(text, "outbox_cdc_slot_invalidated") == 0
    # heartbeats every second keep the lag small while the outbox is idle
    time.sleep(4)
    lag = metric(scraped(), "outbox_cdc_replication_lag_seconds")
    assert lag is not None and lag < 3, lag
    assert get(port, "/healthz")[0] == 200
    status, body = get(port, "/readyz")
    assert status == 200, body
    # heartbeats are never published
    assert len(consume_all(kafka_bootstrap, kafka_topic, 500, timeout=5, settle=1)) == 500
    assert relay.stop() == 0


def test_readyz_follows_the_broker_and_healthz_stays_up(
    relay_factory: Callable[..., RelayProcess],
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
    services: ServiceControl,
) -> None:
    port = free_port()
    relay = relay_factory(http_port=port).start()
    relay.wait_streaming()
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "ready")
    services.stop("kafka")
    try:
        t0 = time.monotonic()
        wait_until(lambda: get(port, "/readyz")[0] == 503, 30, "unready with the broker down")
        unready_after = time.monotonic() - t0
        detail = json.loads(get(port, "/readyz")[1])
        assert detail["status"] == "unavailable"
        assert "Kafka" in detail["kafka"]
        assert get(port, "/healthz")[0] == 200
    finally:
        services.start("kafka")
    t1 = time.monotonic()
    wait_until(lambda: get(port, "/readyz")[0] == 200, 60, "ready again")
    ready_after = time.monotonic() - t1
    publish_pg(postgres_url, outbox_table, kafka_topic, 10)
    assert len(consume_all(kafka_bootstrap, kafka_topic, 10, timeout=60)) == 10
    print(
        f"[operations] readyz: unready {unready_after:.1f} s after the broker stopped, "
        f"ready {ready_after:.1f} s after it started"
    )
    assert relay.stop() == 0


def test_json_logs_are_one_object_per_line_without_secrets(
    relay_factory: Callable[..., RelayProcess], postgres_url: str
) -> None:
    relay = relay_factory(log_format="json").start()
    relay.wait_for_log(r'"message": "streaming from')
    assert relay.stop() == 0
    lines = [ln for ln in relay.log_text().splitlines() if ln.strip()]
    objects = [json.loads(ln) for ln in lines]
    assert {"time", "level", "logger", "message"} <= set(objects[0])
    assert any(o["message"].startswith("stopped") for o in objects)
    credentials = postgres_url.split("//", 1)[1].split("@", 1)[0]  # user:password
    assert credentials + "@" not in relay.log_text()


def test_wal_retention_deletes_only_old_delivered_rows_under_concurrent_inserts(
    relay_factory: Callable[..., RelayProcess],
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
) -> None:
    """retention = 3 s: rows older than that are deleted by the relay's clean-up (every 10 s)
    while a producer keeps inserting; no row younger than 3 s ever disappears, and every event
    is delivered."""
    relay = relay_factory(retention=3).start()
    relay.wait_streaming()
    stop = threading.Event()
    written: list[tuple[str, float]] = []

    def produce() -> None:
        outbox = Outbox(outbox_table, capture_trace_context=False)
        with psycopg.connect(postgres_url) as conn:
            while not stop.is_set():
                event_id = outbox.publish(conn, topic=kafka_topic, type="t", payload=b"x")
                conn.commit()
                written.append((str(event_id), time.time()))
                time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    violations: list[str] = []
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            now = time.time()  # rows committed before this moment are in the snapshot below
            committed_before = [(i, at) for i, at in written if at < now]
            with psycopg.connect(postgres_url) as conn:
                present = {
                    str(r[0]) for r in conn.execute(f"SELECT id FROM {outbox_table}").fetchall()
                }
            for event_id, at in committed_before:
                if now - at < 2.5 and event_id not in present:
                    violations.append(f"{event_id} deleted {now - at:.1f} s after its commit")
            time.sleep(0.5)
    finally:
        stop.set()
        producer.join(10)
    with psycopg.connect(postgres_url) as conn:
        oldest = conn.execute(
            f"SELECT extract(epoch FROM now() - min(created_at)) FROM {outbox_table}"
        ).fetchone()[0]
        remaining = conn.execute(f"SELECT count(*) FROM {outbox_table}").fetchone()[0]
    assert not violations, violations[:5]
    assert remaining < len(written) / 2, (remaining, len(written))
    assert oldest is not None and float(oldest) < 3 + 10 + 5  # retention + interval + slack
    records = consume_all(kafka_bootstrap, kafka_topic, len(written), timeout=60)
    assert len(records) == len(written)
    assert relay.stop() == 0


def test_polling_metrics_show_pending_rows_and_their_age(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str
) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    for stmt in statements(ddl("sqlite", "outbox")):
        conn.execute(stmt)
    outbox = Outbox("outbox", capture_trace_context=False)
    for i in range(20):
        outbox.publish(conn, topic=kafka_topic, type="t", payload=str(i).encode())
    conn.commit()
    port = free_port()
    env = {
        "OUTBOX_CDC_DATABASE_URL": f"sqlite:///{path}",
        "OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "OUTBOX_CDC_HTTP_PORT": str(port),
    }
    relay = RelayProcess(env, tmp_path / "logs", "poller")
    try:
        relay.start().wait_streaming()
        assert len(consume_all(kafka_bootstrap, kafka_topic, 20, timeout=60)) == 20

        def scraped() -> str:
            return get(port, "/metrics")[1]

        wait_until(lambda: metric(scraped(), "outbox_cdc_pending_rows") == 0, 20, "no pending")
        text = scraped()
        assert metric(text, "outbox_cdc_build_info", 'mode="polling",version="0.1.0.dev0"') == 1
        assert metric(text, "outbox_cdc_events_published_total", f'topic="{kafka_topic}"') == 20
        assert metric(text, "outbox_cdc_oldest_pending_age_seconds") == 0
        assert metric(text, "outbox_cdc_slot_retained_wal_bytes") is None  # no slot here
        assert relay.stop() == 0
    finally:
        relay.kill()
        conn.close()
