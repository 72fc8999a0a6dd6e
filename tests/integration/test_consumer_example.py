"""examples/consumer.py, run as docs/consumer.md says: real PostgreSQL and Kafka, every event
published twice, one malformed order (dead-lettered), one event of another type; SIGTERM stops
it cleanly. The guide shows the file in full: checked here too."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from outbox_cdc.events import create_event, to_record
from tests.support.kafka import consume_all, delete_topic

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "consumer.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(port: int, topic: str) -> dict[str, float]:
    """The consumer's counters for ``topic`` from its /metrics endpoint ({} until it answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("topic") == topic and sample.name.endswith("_total"):
                name = sample.name.removeprefix("outbox_cdc_consumer_")
                out[name] = out.get(name, 0) + sample.value
    return out


def test_the_guide_shows_the_example_in_full() -> None:
    guide = (ROOT / "docs" / "consumer.md").read_text()
    assert EXAMPLE.read_text() in guide


@pytest.mark.kafka
@pytest.mark.postgres
def test_example_consumer_invoices_each_order_once(
    postgres_url: str,
    kafka_bootstrap: str,
    kafka_topic: str,
    unique_name: Callable[[str], str],
) -> None:
    port = _free_port()
    schema = unique_name("billing")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    paid = [
        create_event(
            topic=kafka_topic,
            type="order.paid",
            key=f"order-{i}",
            payload={"order": i, "amount": "10.50"},
            id=uuid.uuid4(),
        )
        for i in range(5)
    ]
    other = create_event(topic=kafka_topic, type="order.created", payload={"order": 9})
    malformed = create_event(topic=kafka_topic, type="order.paid", payload={"order": 7})
    records = [to_record(e) for e in [*paid, other, malformed, *paid]]  # paid ones twice
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for r in records:
        producer.send(r.topic, key=r.key, value=r.value, headers=r.headers)
    producer.flush(30)
    producer.close()

    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        # the example's tables go to a schema of this test
        DATABASE_URL=f"{postgres_url}?options=-csearch_path%3D{schema}",
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        TOPIC=kafka_topic,
        GROUP=unique_name("billing"),
        METRICS_PORT=str(port),
    )
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    dlq = f"{kafka_topic}.dlq"
    try:
        # its metrics endpoint says when all 12 records are done: 5 invoices, 1 other type,
        # 5 duplicates skipped (processed), 1 dead letter
        deadline = time.monotonic() + 40
        samples: dict[str, float] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            samples = _metrics(port, kafka_topic)
            if samples.get("events_processed_total") == 11 and samples.get("dead_lettered_total"):
                break
            time.sleep(0.2)
        assert samples == {
            "events_consumed_total": 12,
            "events_processed_total": 11,
            "duplicates_skipped_total": 5,
            "handler_errors_total": 1,  # the KeyError, not retried
            "dead_lettered_total": 1,
        }, proc.stderr.read() if proc.poll() is not None and proc.stderr else samples
        dead = consume_all(kafka_bootstrap, dlq, 1, timeout=20)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err[-3000:]
        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute(
                f"SELECT order_id, amount::text, event_id FROM {schema}.invoices ORDER BY order_id"
            ).fetchall()
        assert rows == [(i, "10.50", str(e.id)) for i, e in enumerate(paid)]
        assert len(dead) == 1
        consumer = KafkaConsumer(
            bootstrap_servers=kafka_bootstrap, group_id=env["GROUP"], enable_auto_commit=False
        )
        try:  # everything processed (dead letter included) is committed at the clean stop
            assert consumer.committed(TopicPartition(kafka_topic, 0)) == len(records)
        finally:
            consumer.close(autocommit=False)
        headers = dict(dead[0].headers)
        assert headers["ce_id"] == str(malformed.id).encode()
        assert headers["outbox_cdc_error_class"] == b"KeyError"
        assert headers["outbox_cdc_attempts"] == b"1"  # give_up_on=(KeyError, ...)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        delete_topic(kafka_bootstrap, dlq)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
