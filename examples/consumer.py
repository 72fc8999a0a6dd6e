"""Example consumer: a billing service that turns ``order.paid`` events into invoices, each
exactly once, although Kafka may deliver an event twice. docs/consumer.md explains it.

Environment: ``DATABASE_URL`` (postgresql://...), ``KAFKA_BOOTSTRAP_SERVERS`` (localhost:9092),
``TOPIC`` (orders), ``GROUP`` (billing), ``METRICS_PORT`` (unset: no /metrics endpoint).
SIGTERM or SIGINT stops it after the current event.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import psycopg
from prometheus_client import start_http_server

from outbox_cdc.consumer import ConsumedEvent, ConsumerMetrics, EventStream, Inbox, RetryPolicy

DATABASE_URL = os.environ["DATABASE_URL"]
TOPIC = os.environ.get("TOPIC", "orders")
GROUP = os.environ.get("GROUP", "billing")
RETENTION = timedelta(days=7)  # longer than any redelivery: topic retention, consumer downtime


def main() -> None:
    metrics = ConsumerMetrics()
    if port := os.environ.get("METRICS_PORT"):
        start_http_server(int(port), registry=metrics.registry)
    inbox = Inbox(GROUP, observer=metrics)
    conn = psycopg.connect(DATABASE_URL, autocommit=True)  # transactions below are explicit
    with conn.transaction():
        inbox.create_table(conn)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS invoices "
            "(order_id bigint NOT NULL, amount numeric NOT NULL, event_id text NOT NULL)"
        )
    last_purge = 0.0

    def handle(event: ConsumedEvent) -> None:
        nonlocal conn, last_purge
        if conn.broken:  # the database went away: reconnect, the retry does the rest
            conn = psycopg.connect(DATABASE_URL, autocommit=True)
        if event.type != "order.paid":
            return  # not ours: processed without side effects
        with conn.transaction():  # the claim and the invoice commit together, or not at all
            if not inbox.claim(conn, event):
                return  # delivered before: already invoiced
            order = event.payload  # parsed JSON (content-type application/json)
            conn.execute(
                "INSERT INTO invoices (order_id, amount, event_id) VALUES (%s, %s, %s)",
                (order["order"], order["amount"], event.id),
            )
        if time.monotonic() - last_purge > 3600:
            with conn.transaction():
                inbox.purge(conn, older_than=RETENTION)
            last_purge = time.monotonic()

    stream = EventStream(
        TOPIC,
        group_id=GROUP,
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
        commit="batch",
        dead_letter_topic=f"{TOPIC}.dlq",
        # a malformed order is not retried; a database error is, up to 30 s, then dead-lettered
        retry=RetryPolicy(max_attempts=10, max_seconds=30, give_up_on=(KeyError, TypeError)),
        observer=metrics,
    )
    signal.signal(signal.SIGTERM, lambda *_: stream.stop())
    signal.signal(signal.SIGINT, lambda *_: stream.stop())
    with stream:
        stream.run(handle)
    conn.close()


if __name__ == "__main__":
    main()
