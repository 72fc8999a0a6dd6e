"""MySQL/MariaDB specifics of the insert API (the common guarantees are in test_insert_api.py,
which runs every test on MariaDB too): column length limits checked before writing, batches
larger than ``max_allowed_packet``, other PyMySQL cursor classes, the session time zone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pymysql
import pymysql.cursors
import pytest

from outbox_cdc import EventValidationError, Outbox
from outbox_cdc.outbox import MAX_BATCH_PAYLOAD_BYTES
from tests.integration.insert_support import mysql_table, pymysql_args, read_mysql

pytestmark = pytest.mark.mysql


@pytest.fixture
def table(mysql_url: str, unique_name: Any) -> Iterator[str]:
    with mysql_table(mysql_url, unique_name("outbox_my")) as name:
        yield name


@pytest.fixture
def conn(mysql_url: str) -> Iterator[Any]:
    c = pymysql.connect(**pymysql_args(mysql_url))
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize(
    ("field", "arguments"),
    [
        ("type", {"type": "t" * 256}),
        ("key", {"key": "k" * 1025}),
        ("content_type", {"content_type": "c" * 256}),
    ],
)
def test_values_longer_than_the_columns_are_refused_before_writing(
    conn: Any, mysql_url: str, table: str, field: str, arguments: dict[str, str]
) -> None:
    outbox = Outbox(table)
    event = {"topic": "t", "type": "ok", "payload": b"1", **arguments}
    first = outbox.publish(conn, topic="t", type="first", payload=b"0")
    with pytest.raises(EventValidationError) as exc:
        outbox.publish(conn, **event)
    assert exc.value.field == field
    with pytest.raises(EventValidationError) as exc:
        outbox.publish_many(conn, [{"topic": "t", "type": "fine", "payload": b"1"}, event])
    assert exc.value.field == f"events[1].{field}"
    conn.commit()
    assert [r.id for r in read_mysql(mysql_url, table)] == [first]


def test_values_at_the_column_limits_are_stored_whole(
    conn: Any, mysql_url: str, table: str
) -> None:
    outbox = Outbox(table)
    key, type_, ctype = "é" * 1024, "🙂" * 255, "c" * 255  # characters, not bytes (utf8mb4)
    outbox.publish(conn, topic="x" * 249, type=type_, payload=b"1", key=key, content_type=ctype)
    conn.commit()
    (row,) = read_mysql(mysql_url, table)
    assert (row.topic, row.key, row.type, row.content_type) == ("x" * 249, key, type_, ctype)


def test_batch_larger_than_max_allowed_packet(conn: Any, mysql_url: str, table: str) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT @@max_allowed_packet")
        (max_packet,) = cur.fetchone()
    payload_size = 1024 * 1024
    count = max_packet // payload_size + 4  # the whole batch is larger than one packet
    outbox = Outbox(table)
    payloads = [bytes([i]) * payload_size for i in range(count)]  # includes NULs, escaped
    ids = outbox.publish_many(
        conn, [{"topic": "big", "type": "big.blob", "payload": p} for p in payloads]
    )
    conn.commit()
    rows = read_mysql(mysql_url, table)
    assert [r.id for r in rows] == ids
    assert [r.payload for r in rows] == payloads
    assert count * payload_size > MAX_BATCH_PAYLOAD_BYTES


@pytest.mark.parametrize(
    "cursorclass",
    [pymysql.cursors.DictCursor, pymysql.cursors.SSCursor, pymysql.cursors.SSDictCursor],
)
def test_other_cursor_classes(mysql_url: str, table: str, cursorclass: Any) -> None:
    outbox = Outbox(table)
    c = pymysql.connect(**pymysql_args(mysql_url), cursorclass=cursorclass)
    try:
        a = outbox.publish(c, topic="t", type="on.conn", payload=b"1")
        with c.cursor() as cur:
            b = outbox.publish(cur, topic="t", type="on.cursor", payload=b"2")
        c.commit()
    finally:
        c.close()
    assert [r.id for r in read_mysql(mysql_url, table)] == [a, b]


def test_created_at_is_utc_whatever_the_session_time_zone(
    conn: Any, mysql_url: str, table: str
) -> None:
    with conn.cursor() as cur:
        cur.execute("SET time_zone = '+05:30'")
    now = datetime.now(UTC)
    Outbox(table).publish(conn, topic="t", type="tz", payload=b"1")
    conn.commit()
    (row,) = read_mysql(mysql_url, table)
    assert abs(row.created_at - now) < timedelta(seconds=1)
