"""What the insert API puts in the PostgreSQL WAL, read through a wal2json slot with SQL
(``pg_logical_slot_get_changes``), as the relay will see it:

* the table-less mode (``Outbox(mode="message")``): a committed event is one transactional
  logical decoding message whose envelope decodes back to the event; a rolled-back one (or one
  rolled back to a savepoint) never reaches the WAL decoder;
* the table mode: the inserted row decodes (``protocol.wal2json.row_to_event``) to the event,
  headers in the order they were given.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from outbox_cdc import Outbox
from outbox_cdc.events import OutboxEvent, envelope_from_json
from outbox_cdc.outbox import DEFAULT_MESSAGE_PREFIX
from outbox_cdc.protocol.wal2json import row_to_event
from tests.integration.insert_support import open_tx, pg_table

pytestmark = pytest.mark.postgres


@pytest.fixture
def slot(postgres_url: str, replication_slot: str) -> str:
    """A wal2json slot created now: it sees the transactions that commit from here on (dropped
    by the replication_slot fixture)."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (replication_slot,)
        )
    return replication_slot


def changes(url: str, slot: str, *options: str) -> list[dict[str, Any]]:
    """Consume the slot's pending changes as wal2json v2 objects."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, "
            "'format-version', '2', 'include-transaction', 'false'" + ", %s" * len(options) + ")",
            (slot, *options),
        ).fetchall()
    return [json.loads(r[0]) for r in rows]


def messages(url: str, slot: str, prefix: str = DEFAULT_MESSAGE_PREFIX) -> list[dict[str, Any]]:
    # 'actions' only filters row changes; 'add-tables' naming no table keeps rows of other
    # tests' tables out, 'add-msg-prefixes' keeps other prefixes' messages out
    return [
        c
        for c in changes(url, slot, "add-msg-prefixes", prefix, "add-tables", "none.none")
        if c["action"] == "M"
    ]


def decoded(url: str, slot: str, ids: list[uuid.UUID]) -> list[OutboxEvent]:
    """The events among the slot's messages whose id is in ``ids`` (other tests may emit
    messages with the default prefix at the same time), in WAL order."""
    wanted = set(ids)
    out = []
    for m in messages(url, slot):
        assert m["prefix"] == DEFAULT_MESSAGE_PREFIX
        event = envelope_from_json(m["content"])
        if event.id in wanted:
            assert m["transactional"] is True
            out.append(event)
    return out


KINDS = ["pg-conn", "pg-cursor", "pg-sa-conn", "pg-sa-session"]


@pytest.mark.parametrize("kind", KINDS)
def test_committed_message_appears_with_its_envelope(
    kind: str, postgres_url: str, slot: str
) -> None:
    outbox = Outbox(mode="message")
    event_id = uuid.uuid4()
    now = datetime.now(UTC)
    with open_tx(kind, postgres_url) as tx:
        returned = outbox.publish(
            tx.handle,
            topic="orders.v1",
            type="order.created",
            payload=b"\x00\xffbinary",
            key="order-7 ✓",
            headers={"tenant": "acme", "raw": b"\xff\x00", "z": "last"},
            id=event_id,
            content_type="application/x-protobuf",
        )
        tx.commit()
    assert returned == event_id
    (event,) = decoded(postgres_url, slot, [event_id])
    assert event.id == event_id
    assert event.topic == "orders.v1"
    assert event.key == "order-7 ✓"
    assert event.type == "order.created"
    assert event.content_type == "application/x-protobuf"
    assert event.payload == b"\x00\xffbinary"
    assert event.headers == (("tenant", b"acme"), ("raw", b"\xff\x00"), ("z", b"last"))
    assert abs(event.created_at - now) < timedelta(seconds=1)


@pytest.mark.parametrize("kind", KINDS)
def test_rolled_back_message_never_appears(kind: str, postgres_url: str, slot: str) -> None:
    outbox = Outbox(mode="message")
    with open_tx(kind, postgres_url) as tx:
        undone = outbox.publish(tx.handle, topic="t", type="undone", payload={"n": 1})
        undone_many = outbox.publish_many(
            tx.handle,
            [
                {"topic": "t", "type": "undone.many", "payload": b"1"},
            ],
        )
        tx.rollback()
        kept = outbox.publish(tx.handle, topic="t", type="kept", payload={"n": 2})
        tx.commit()
    events = decoded(postgres_url, slot, [undone, *undone_many, kept])
    assert [e.id for e in events] == [kept]
    assert events[0].payload == b'{"n":2}'
    assert events[0].content_type == "application/json"


@pytest.mark.parametrize("kind", KINDS)
def test_rollback_to_savepoint_drops_only_later_messages(
    kind: str, postgres_url: str, slot: str
) -> None:
    outbox = Outbox(mode="message")
    with open_tx(kind, postgres_url) as tx:
        first = outbox.publish(tx.handle, topic="t", type="before", payload=b"1")
        tx.savepoint("sp_msg")
        undone = outbox.publish(tx.handle, topic="t", type="undone", payload=b"2")
        tx.rollback_to("sp_msg")
        last = outbox.publish(tx.handle, topic="t", type="after", payload=b"3")
        tx.commit()
    events = decoded(postgres_url, slot, [first, undone, last])
    assert [(e.id, e.type) for e in events] == [(first, "before"), (last, "after")]


@pytest.mark.parametrize("kind", ["pg-conn", "pg-sa-session"])
def test_publish_many_messages_keep_their_order(kind: str, postgres_url: str, slot: str) -> None:
    outbox = Outbox(mode="message")
    prebuilt = outbox.event(topic="b", type="many.2", payload="two", key="k")
    with open_tx(kind, postgres_url) as tx:
        single = outbox.publish(tx.handle, topic="a", type="single", payload=b"0")
        many = outbox.publish_many(
            tx.handle,
            [
                {"topic": "a", "type": "many.1", "payload": b"1"},
                prebuilt,
                *({"topic": "c", "type": f"many.{i}", "payload": {"i": i}} for i in range(3, 50)),
            ],
        )
        tx.commit()
    events = decoded(postgres_url, slot, [single, *many])
    assert [e.id for e in events] == [single, *many]
    assert events[2] == prebuilt


def test_message_mode_writes_no_table_row_and_honours_the_prefix(
    postgres_url: str, slot: str, unique_name: Any
) -> None:
    prefix = unique_name("prefix")
    table = unique_name("outbox_msg")
    with pg_table(postgres_url, table):
        outbox = Outbox(table, mode="message", message_prefix=prefix)
        with psycopg.connect(postgres_url) as conn:
            event_id = outbox.publish(conn, topic="t", type="x", payload=b"1")
            conn.commit()
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    found = [
        (m["prefix"], envelope_from_json(m["content"]).id)
        for m in messages(postgres_url, slot, f"{DEFAULT_MESSAGE_PREFIX},{prefix}")
    ]
    assert [p for p, i in found if i == event_id] == [prefix]


def test_table_mode_row_decodes_as_the_relay_sees_it(
    postgres_url: str, slot: str, unique_name: Any
) -> None:
    """The WAL relay turns the wal2json insert into the event: same fields, headers in order."""
    table = unique_name("outbox_wal")
    with pg_table(postgres_url, table):
        outbox = Outbox(table)
        headers = {"zeta": "1", "alpha": "2", "mid": b"\xff", "a": "4", "nul": b"\x00"}
        with psycopg.connect(postgres_url) as conn:
            built = outbox.event(
                topic="t", type="row.made", payload={"k": [1, 2]}, key="key", headers=headers
            )
            outbox.publish_many(conn, [built])
            conn.commit()
        inserts = [
            c
            for c in changes(
                postgres_url,
                slot,
                "add-tables",
                f"public.{table}",
                "actions",
                "insert",
                "add-msg-prefixes",
                "none",
            )
            if c["action"] == "I"
        ]
    (insert,) = inserts
    event = row_to_event({c["name"]: c["value"] for c in insert["columns"]})
    assert event == built
    assert [name for name, _ in event.headers] == ["zeta", "alpha", "mid", "a", "nul"]
