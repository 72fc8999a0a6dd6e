#!/usr/bin/env bash
# The demo: bring up PostgreSQL 15 + wal2json and Kafka on this machine (installing what is
# missing), create the outbox, start the relay, write a few events in ordinary transactions (one
# rolled back), and show what arrives in Kafka. The relay keeps running until you press Ctrl-C.
#
#   scripts/demo.sh            # Debian/Ubuntu, no Docker needed (root or sudo)
#   DEMO_EVENTS=20 scripts/demo.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/outbox-cdc ]; then
    echo "==> installing outbox-cdc into .venv"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q -e '.[dev]'
fi
scripts/services.sh up
# shellcheck source=/dev/null
. ./.services.env

export OUTBOX_CDC_DATABASE_URL="$OUTBOX_CDC_TEST_POSTGRES_URL"
export OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS="$OUTBOX_CDC_TEST_KAFKA_BOOTSTRAP_SERVERS"
export OUTBOX_CDC_TABLE=public.demo_outbox
export OUTBOX_CDC_SLOT=demo_outbox
topic=demo-orders

echo "==> outbox-cdc init"
.venv/bin/outbox-cdc init --table "$OUTBOX_CDC_TABLE" --slot "$OUTBOX_CDC_SLOT"

echo "==> outbox-cdc start (log: .demo-relay.log)"
.venv/bin/outbox-cdc start >.demo-relay.log 2>&1 &
relay=$!
cleanup() {
    kill -TERM "$relay" 2>/dev/null
    wait "$relay" 2>/dev/null
    echo "relay stopped"
    # A slot nobody reads makes PostgreSQL keep WAL: the demo's goes with the demo.
    .venv/bin/python -c 'import os, psycopg
with psycopg.connect(os.environ["OUTBOX_CDC_DATABASE_URL"], autocommit=True) as c:
    c.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
              " WHERE slot_name = %s AND NOT active", (os.environ["OUTBOX_CDC_SLOT"],))' \
        && echo "replication slot $OUTBOX_CDC_SLOT dropped (the next run creates it again)"
}
trap cleanup EXIT

.venv/bin/python - "$topic" "${DEMO_EVENTS:-5}" <<'PY'
import os
import sys
import time

import psycopg
from kafka import KafkaConsumer, TopicPartition

import outbox_cdc

topic, count = sys.argv[1], int(sys.argv[2])
outbox = outbox_cdc.Outbox(os.environ["OUTBOX_CDC_TABLE"])
bootstrap = os.environ["OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS"]

consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=500)
deadline = time.monotonic() + 30
with psycopg.connect(os.environ["OUTBOX_CDC_DATABASE_URL"]) as conn:
    ids = []
    for i in range(count):
        ids.append(outbox.publish(conn, topic=topic, type="order.created",
                                  payload={"order": i}, key=f"order-{i % 2}"))
        conn.commit()
        print(f"committed  event {ids[-1]}  order {i}")
    outbox.publish(conn, topic=topic, type="order.created", payload={"order": "rolled back"})
    conn.rollback()
    print("rolled back one more event: it must never show up")

seen = {}
wanted = {str(i) for i in ids}
while not wanted <= seen.keys() and time.monotonic() < deadline:
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        time.sleep(0.2)
        continue
    tps = [TopicPartition(topic, p) for p in parts]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    for rec in consumer:
        headers = dict(rec.headers)
        seen[headers["ce_id"].decode()] = rec
print()
for rec in sorted((seen[i] for i in wanted if i in seen), key=lambda r: (r.partition, r.offset)):
    h = dict(rec.headers)
    print(f"in Kafka   {rec.topic}[{rec.partition}]@{rec.offset} key={rec.key.decode()} "
          f"ce_id={h['ce_id'].decode()} ce_type={h['ce_type'].decode()} value={rec.value.decode()}")
missing = [str(i) for i in ids if str(i) not in seen]
if missing:
    sys.exit(f"not in Kafka after 30 s: {missing} (see .demo-relay.log)")
print(f"\nall {count} committed events arrived; the rolled-back one did not.")
PY

echo
.venv/bin/outbox-cdc status --slot "$OUTBOX_CDC_SLOT"
if [ -t 0 ]; then
    echo
    echo "The relay is running: write more events with outbox_cdc.publish(...). Ctrl-C stops it."
    wait $relay
fi
