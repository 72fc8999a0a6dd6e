"""Capture real replication frames (CopyData payloads) from a PostgreSQL 15 + wal2json server.

Writes tests/data/wal2json_v2_frames.json: a list of {"hex": <CopyData bytes>} in arrival order,
for the unit tests of the protocol layer. Re-run against a server started by
``scripts/services.sh up``:  python tests/data/capture_wal2json.py "$OUTBOX_CDC_TEST_POSTGRES_URL"
"""

from __future__ import annotations

import json
import select
import sys
import time
from pathlib import Path

import psycopg

from outbox_cdc import Outbox
from outbox_cdc.protocol.wal2json import plugin_options
from outbox_cdc.schema import ddl, statements

SLOT = "capture_frames"
TABLE = "public.capture_outbox"


def main(url: str) -> None:
    ctl = psycopg.connect(url, autocommit=True)
    ctl.execute(f"DROP TABLE IF EXISTS {TABLE}")
    for stmt in statements(ddl("postgresql", TABLE)):
        ctl.execute(stmt)
    ctl.execute("CREATE TABLE IF NOT EXISTS capture_other (v int)")
    if ctl.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name=%s", (SLOT,)).fetchone():
        ctl.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
    ctl.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (SLOT,))

    table_outbox = Outbox(TABLE)
    msg_outbox = Outbox(mode="message", message_prefix="outbox-cdc")
    with psycopg.connect(url) as app:
        # 1: one event, JSON payload, key, headers
        table_outbox.publish(
            app,
            topic="orders",
            type="order.created",
            payload={"n": 1},
            key="order-1",
            headers={"tenant": "acme"},
            id="00000000-0000-4000-8000-000000000001",
        )
        app.commit()
        # 2: a transaction that touches only another table (empty for us)
        app.execute("INSERT INTO capture_other VALUES (1)")
        app.commit()
        # 3: two events in one transaction, binary payload with NUL, no key, bytes header
        table_outbox.publish_many(
            app,
            [
                {
                    "topic": "orders",
                    "type": "bin",
                    "payload": b"\x00\x01\xff",
                    "id": "00000000-0000-4000-8000-000000000002",
                },
                {
                    "topic": "orders",
                    "type": "text",
                    "payload": "h\u00e9llo",
                    "key": "k\u00e9y",
                    "headers": {"raw": b"\xff\x00"},
                    "id": "00000000-0000-4000-8000-000000000003",
                },
            ],
        )
        app.commit()
        # 4: rolled back: must not appear
        table_outbox.publish(app, topic="orders", type="rolled.back", payload=b"x")
        app.rollback()
        # 5: table-less mode (transactional message)
        msg_outbox.publish(
            app,
            topic="payments",
            type="payment.done",
            payload=b"\x00bin",
            key="p-1",
            id="00000000-0000-4000-8000-000000000004",
        )
        app.commit()
        # 6: a non-transactional message with our prefix: must be ignored
        app.execute("SELECT pg_logical_emit_message(false, 'outbox-cdc', 'not transactional')")
        app.commit()

    repl = psycopg.connect(url, autocommit=True, replication="database")
    opts = ", ".join(f"\"{k}\" '{v}'" for k, v in plugin_options(TABLE, "outbox-cdc").items())
    repl.execute(f'START_REPLICATION SLOT "{SLOT}" LOGICAL 0/0 ({opts})'.encode())
    pg = repl.pgconn
    frames: list[dict[str, str]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        n, data = pg.get_copy_data(1)
        if n > 0:
            frames.append({"hex": bytes(data).hex()})
            continue
        select.select([pg.socket], [], [], 0.5)
        pg.consume_input()
    repl.close()
    ctl.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
    ctl.execute(f"DROP TABLE {TABLE}")
    ctl.execute("DROP TABLE capture_other")
    out = Path(__file__).with_name("wal2json_v2_frames.json")
    out.write_text(json.dumps(frames, indent=1) + "\n")
    print(f"wrote {len(frames)} frames to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
