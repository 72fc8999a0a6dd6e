"""Demo producer: commit one sample event through the insert API every DEMO_INTERVAL seconds.

It plays the application of the compose stack (compose.yaml, service ``demo-producer``): each
event is written with ``Outbox.publish`` in a transaction of its own and committed, and the
relay carries it to Kafka. Configured only by environment variables:

- ``DEMO_DATABASE_URL`` (required): ``postgresql://user:password@host:5432/db``
- ``DEMO_TABLE`` (``public.outbox``): the outbox table, created by ``outbox-cdc init``
- ``DEMO_TOPIC`` (``demo-orders``): the Kafka topic of the events
- ``DEMO_INTERVAL`` (``1``): seconds between two events
- ``DEMO_EVENTS`` (``0``): stop after this many events; ``0``: never stop
- ``DEMO_KEYS`` (``3``): distinct keys, used in turn (``order-0``, ``order-1``, ...)

Until the database answers and the table exists it retries every few seconds, so it can start
before the relay has run ``outbox-cdc init``. SIGTERM or SIGINT stops it after the current
event. Run it by hand::

    DEMO_DATABASE_URL=postgresql://outbox:outbox@localhost:5432/outbox \\
        python examples/demo_producer.py
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from datetime import UTC, datetime
from types import FrameType

import psycopg

from outbox_cdc import Outbox

RETRY_SECONDS = 3.0

stop = threading.Event()


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    stop.set()


def _say(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
    print(f"{stamp} demo-producer: {message}", flush=True)


def main() -> int:
    url = os.environ.get("DEMO_DATABASE_URL", "").strip()
    if not url:
        print("demo-producer: DEMO_DATABASE_URL is required", file=sys.stderr)
        return 2
    table = _setting("DEMO_TABLE", "public.outbox")
    topic = _setting("DEMO_TOPIC", "demo-orders")
    try:
        interval = float(_setting("DEMO_INTERVAL", "1"))
        total = int(_setting("DEMO_EVENTS", "0"))
        keys = int(_setting("DEMO_KEYS", "3"))
    except ValueError as exc:
        print(f"demo-producer: DEMO_INTERVAL, DEMO_EVENTS, DEMO_KEYS: {exc}", file=sys.stderr)
        return 2
    if interval < 0 or total < 0 or keys < 1:
        print(
            "demo-producer: need DEMO_INTERVAL >= 0, DEMO_EVENTS >= 0, DEMO_KEYS >= 1",
            file=sys.stderr,
        )
        return 2

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    outbox = Outbox(table)
    _say(
        f"writing to {table}, topic {topic}, every {interval:g} s"
        + (f", {total} events" if total else "")
    )

    sent = 0
    conn: psycopg.Connection | None = None
    while not stop.is_set() and (total == 0 or sent < total):
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(url, connect_timeout=5, application_name="demo-producer")
            order, key = sent + 1, f"order-{sent % keys}"
            event_id = outbox.publish(
                conn,
                topic=topic,
                type="order.created",
                key=key,
                payload={
                    "order": order,
                    "amount": round(10 + (order * 7.31) % 90, 2),
                    "created_at": datetime.now(UTC).isoformat(),
                },
            )
            conn.commit()
        except psycopg.Error as exc:
            # Database not up yet, restarting, or the table not created yet: try again.
            first_line = (str(exc).strip().splitlines() or [""])[0]
            _say(f"not written ({type(exc).__name__}: {first_line}); retrying")
            if conn is not None:
                conn.close()
                conn = None
            stop.wait(RETRY_SECONDS)
            continue
        sent += 1
        _say(f"committed event {event_id} key={key} order={order}")
        if total == 0 or sent < total:
            stop.wait(interval)
    if conn is not None:
        conn.close()
    _say(f"stopped after {sent} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
