"""The insert API on real databases (issue 3): PostgreSQL, MariaDB/MySQL and SQLite, through every
sync connection kind an application may hold: psycopg Connection and Cursor, SQLAlchemy Connection
and Session, sqlite3, PyMySQL.

For each kind: commit writes exactly one row with the given fields, rollback writes nothing,
rolling back to a SAVEPOINT removes only the events after it, the events of one transaction keep
their order, ``publish_many`` is one statement, and a validation error leaves the transaction
usable. The async kinds are in test_insert_api_async.py, the table-less mode in
test_insert_api_message.py, MySQL-only limits in test_insert_api_mysql.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from outbox_cdc import EventValidationError, Outbox, UnsupportedConnectionError
from outbox_cdc.events import CONTENT_TYPE_JSON, CONTENT_TYPE_TEXT
from tests.integration.insert_support import Db, Tx, database, pg_table, read_pg

PG = pytest.mark.postgres
MYSQL = pytest.mark.mysql

KINDS = [
    pytest.param("pg-conn", marks=PG),
    pytest.param("pg-cursor", marks=PG),
    pytest.param("pg-sa-conn", marks=PG),
    pytest.param("pg-sa-session", marks=PG),
    pytest.param("mysql-conn", marks=MYSQL),
    pytest.param("mysql-cursor", marks=MYSQL),
    pytest.param("mysql-sa-conn", marks=MYSQL),
    pytest.param("mysql-sa-session", marks=MYSQL),
    "sqlite-conn",
    "sqlite-cursor",
    "sqlite-sa-conn",
    "sqlite-sa-session",
]


@pytest.fixture(params=KINDS)
def db(request: pytest.FixtureRequest, tmp_path: Any, unique_name: Any) -> Iterator[Db]:
    with database(request.param, request, tmp_path, unique_name) as d:
        yield d


def near_now(ts: datetime, now: datetime) -> bool:
    return abs(ts - now) < timedelta(seconds=1)


# -- commit / rollback / savepoint / order -------------------------------------------------------


def test_commit_writes_exactly_one_row_with_the_given_fields(db: Db) -> None:
    outbox = Outbox(db.table)
    event_id = uuid.uuid4()
    payload = b"\x00\x01 binary \xff\xfe"
    headers = {
        "tenant": "acme",
        "x-text": "żółw 🐢",
        "x-binary": b"\xff\xfe\x00",  # not UTF-8
        "x-nul": b"a\x00b",  # UTF-8, but with a NUL (stored as base64)
    }
    now = datetime.now(UTC)
    with db.tx() as tx:
        returned = outbox.publish(
            tx.handle,
            topic="orders.v1",
            type="order.created",
            payload=payload,
            key="order-42 ✓",
            headers=headers,
            id=event_id,
            content_type="application/x-protobuf",
        )
        tx.commit()

    assert returned == event_id
    rows = db.rows()
    assert len(rows) == 1
    row = rows[0]
    assert row.id == event_id
    assert row.topic == "orders.v1"
    assert row.key == "order-42 ✓"
    assert row.type == "order.created"
    assert row.content_type == "application/x-protobuf"
    assert row.payload == payload
    assert row.headers == (
        ("tenant", b"acme"),
        ("x-text", "żółw 🐢".encode()),
        ("x-binary", b"\xff\xfe\x00"),
        ("x-nul", b"a\x00b"),
    )
    assert near_now(row.created_at, now)
    assert row.published_at is None


def test_defaults_generated_id_json_payload_no_key_no_headers(db: Db) -> None:
    outbox = Outbox(db.table)
    now = datetime.now(UTC)
    with db.tx() as tx:
        returned = outbox.publish(
            tx.handle, topic="t", type="thing.happened", payload={"n": 1, "name": "Zoë"}
        )
        tx.commit()
    (row,) = db.rows()
    assert isinstance(returned, uuid.UUID)
    assert returned.version == 4
    assert row.id == returned
    assert row.key is None
    assert row.headers == ()
    assert row.payload == '{"n":1,"name":"Zoë"}'.encode()
    assert row.content_type == CONTENT_TYPE_JSON
    assert near_now(row.created_at, now)


def test_rollback_writes_nothing(db: Db) -> None:
    outbox = Outbox(db.table)
    with db.tx() as tx:
        outbox.publish(tx.handle, topic="t", type="a", payload=b"1")
        outbox.publish_many(tx.handle, [{"topic": "t", "type": "b", "payload": b"2"}])
        tx.rollback()
    assert db.rows() == []


def test_rollback_to_savepoint_removes_only_the_events_after_it(db: Db) -> None:
    outbox = Outbox(db.table)
    with db.tx() as tx:
        first = outbox.publish(tx.handle, topic="t", type="before", payload=b"1")
        tx.savepoint("sp_outbox")
        outbox.publish(tx.handle, topic="t", type="undone", payload=b"2")
        outbox.publish_many(tx.handle, [{"topic": "t", "type": "undone", "payload": b"3"}])
        tx.rollback_to("sp_outbox")
        last = outbox.publish(tx.handle, topic="t", type="after", payload=b"4")
        tx.commit()
    rows = db.rows()
    assert [(r.id, r.type, r.payload) for r in rows] == [
        (first, "before", b"1"),
        (last, "after", b"4"),
    ]


def test_events_of_one_transaction_keep_their_order(db: Db) -> None:
    outbox = Outbox(db.table)
    with db.tx() as tx:
        ids = [
            outbox.publish(
                tx.handle,
                topic=f"topic-{i % 3}",
                type=f"step.{i}",
                payload=str(i),
                key="same-key" if i % 2 else None,
            )
            for i in range(8)
        ]
        tx.commit()
    rows = db.rows()
    assert [r.id for r in rows] == ids
    assert [r.type for r in rows] == [f"step.{i}" for i in range(8)]
    assert [r.content_type for r in rows] == [CONTENT_TYPE_TEXT] * 8
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)


def test_two_transactions_commit_in_sequence(db: Db) -> None:
    outbox = Outbox(db.table)
    with db.tx() as tx:
        a = outbox.publish(tx.handle, topic="t", type="one", payload=b"1")
        tx.commit()
        b = outbox.publish(tx.handle, topic="t", type="two", payload=b"2")
        tx.rollback()
        c = outbox.publish(tx.handle, topic="t", type="three", payload=b"3")
        tx.commit()
    assert [r.id for r in db.rows()] == [a, c]
    assert b not in [r.id for r in db.rows()]


# -- publish_many --------------------------------------------------------------------------------


@contextmanager
def count_inserts(tx: Tx, db: Db) -> Iterator[list[int]]:
    """Count the INSERT statements run in ``tx`` inside the block (result in box[0])."""
    box: list[int] = []
    if db.dialect == "mysql":
        before = int(tx.fetchone("SHOW SESSION STATUS LIKE 'Com_insert'")[1])
        yield box
        box.append(int(tx.fetchone("SHOW SESSION STATUS LIKE 'Com_insert'")[1]) - before)
    elif db.dialect == "sqlite":
        raw = tx.sqlite3_connection()
        seen: list[str] = []
        raw.set_trace_callback(seen.append)
        try:
            yield box
        finally:
            raw.set_trace_callback(None)
        box.append(sum(1 for s in seen if s.lstrip().upper().startswith("INSERT")))
    else:
        # rows written by one statement share their command id (cmin) within the transaction
        yield box
        box.append(
            int(
                tx.fetchone(
                    f"SELECT count(DISTINCT cmin::text) FROM {db.table} WHERE type LIKE 'many.%'"
                )[0]
            )
        )


def test_publish_many_is_one_statement_and_keeps_order(db: Db) -> None:
    outbox = Outbox(db.table)
    prebuilt = outbox.event(
        topic="b", type="many.2", payload={"n": 2}, key="k2", headers={"h": "2"}
    )
    with db.tx() as tx:
        single = outbox.publish(tx.handle, topic="a", type="single", payload=b"0")
        with count_inserts(tx, db) as inserts:
            ids = outbox.publish_many(
                tx.handle,
                [
                    {"topic": "a", "type": "many.1", "payload": b"1"},
                    prebuilt,
                    {
                        "topic": "c",
                        "type": "many.3",
                        "payload": "three",
                        "key": "k3",
                        "headers": {"x": b"\xff"},
                    },
                ],
            )
        tx.commit()
    assert inserts == [1]
    assert ids[1] == prebuilt.id
    rows = db.rows()
    assert [r.id for r in rows] == [single, *ids]
    assert [(r.topic, r.type, r.key, r.payload, r.content_type, r.headers) for r in rows[1:]] == [
        ("a", "many.1", None, b"1", "application/octet-stream", ()),
        ("b", "many.2", "k2", b'{"n":2}', CONTENT_TYPE_JSON, (("h", b"2"),)),
        ("c", "many.3", "k3", b"three", CONTENT_TYPE_TEXT, (("x", b"\xff"),)),
    ]
    assert rows[2].created_at == prebuilt.created_at


def test_publish_many_of_nothing_runs_nothing(db: Db) -> None:
    outbox = Outbox(db.table)
    with db.tx() as tx:
        with count_inserts(tx, db) as inserts:
            assert outbox.publish_many(tx.handle, []) == []
            assert outbox.publish_many(tx.handle, iter(())) == []
        tx.commit()
    assert db.rows() == []
    if db.dialect != "postgresql":  # cmin counting needs rows
        assert inserts == [0]


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("pg-conn", marks=PG),
        pytest.param("pg-sa-session", marks=PG),
        pytest.param("mysql-conn", marks=MYSQL),
        "sqlite-conn",
    ],
)
def test_publish_many_large_batch(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, unique_name: Any
) -> None:
    """More rows than one statement can bind (PostgreSQL: 65535 parameters = 8191 rows)."""
    with database(kind, request, tmp_path, unique_name) as db:
        outbox = Outbox(db.table)
        n = 9000
        with db.tx() as tx:
            ids = outbox.publish_many(
                tx.handle,
                (
                    {"topic": "bulk", "type": "bulk.item", "payload": {"i": i}, "key": str(i)}
                    for i in range(n)
                ),
            )
            tx.commit()
        rows = db.rows()
        assert len(rows) == n
        assert [r.id for r in rows] == ids
        assert [r.key for r in rows] == [str(i) for i in range(n)]


# -- errors leave the transaction as it was ------------------------------------------------------


def test_validation_error_keeps_the_transaction_usable(db: Db) -> None:
    outbox = Outbox(db.table)
    with db.tx() as tx:
        first = outbox.publish(tx.handle, topic="t", type="ok.1", payload=b"1")
        with pytest.raises(EventValidationError) as exc:
            outbox.publish(tx.handle, topic="not a topic", type="bad", payload=b"x")
        assert exc.value.field == "topic"
        with pytest.raises(EventValidationError) as exc:
            outbox.publish(tx.handle, topic="t", type="bad", payload={"s": {1, 2}})
        assert exc.value.field == "payload"
        with pytest.raises(EventValidationError) as exc:
            outbox.publish(tx.handle, topic="t", type="bad", payload=b"x", key="nul\x00key")
        assert exc.value.field == "key"
        with pytest.raises(EventValidationError) as exc:
            outbox.publish_many(
                tx.handle,
                [
                    {"topic": "t", "type": "bad.batch", "payload": b"1"},
                    {"topic": "t", "type": "", "payload": b"2"},
                ],
            )
        assert exc.value.field == "events[1].type"
        tx.execute("SELECT 1")
        second = outbox.publish(tx.handle, topic="t", type="ok.2", payload=b"2")
        tx.commit()
    assert [(r.id, r.type) for r in db.rows()] == [(first, "ok.1"), (second, "ok.2")]


@pytest.mark.parametrize(
    "db",
    [p for p in KINDS if not str(getattr(p, "values", [p])[0]).startswith("pg-")],
    indirect=True,
)
def test_message_mode_is_refused_before_anything_is_written(db: Db) -> None:
    """The table-less mode is PostgreSQL only (see test_insert_api_message.py)."""
    with db.tx() as tx:
        with pytest.raises(UnsupportedConnectionError, match="mode='message'"):
            Outbox(mode="message").publish(tx.handle, topic="t", type="x", payload=b"1")
        Outbox(db.table).publish(tx.handle, topic="t", type="ok", payload=b"1")
        tx.commit()
    assert [r.type for r in db.rows()] == ["ok"]


def test_async_entry_points_refuse_a_sync_connection(db: Db) -> None:
    outbox = Outbox(db.table)
    with db.tx() as tx:
        coro = outbox.publish_async(tx.handle, topic="t", type="x", payload=b"1")
        with pytest.raises(UnsupportedConnectionError, match="sync connection"):
            coro.send(None)
        coro.close()
        tx.commit()
    assert db.rows() == []


# -- trace context on the stored row -------------------------------------------------------------


@pytest.mark.parametrize("kind", [pytest.param("pg-conn", marks=PG), "sqlite-conn"])
def test_trace_context_is_stored_in_the_row_headers(
    kind: str, request: pytest.FixtureRequest, tmp_path: Any, unique_name: Any
) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("outbox-cdc-tests")
    with database(kind, request, tmp_path, unique_name) as db:
        outbox = Outbox(db.table)
        with db.tx() as tx:
            with tracer.start_as_current_span("checkout") as span:
                ctx = span.get_span_context()
                traced = outbox.publish(
                    tx.handle, topic="t", type="traced", payload=b"1", headers={"tenant": "acme"}
                )
            untraced = outbox.publish(tx.handle, topic="t", type="untraced", payload=b"2")
            tx.commit()
        rows = {r.id: dict(r.headers) for r in db.rows()}
    assert trace.get_current_span().get_span_context().is_valid is False
    expected = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}".encode()
    assert rows[traced] == {"traceparent": expected, "tenant": b"acme"}
    assert rows[untraced] == {}


# -- psycopg cursor classes ----------------------------------------------------------------------


@PG
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda c: c.cursor(name="named_cur"), id="server-cursor"),
        pytest.param(lambda c: psycopg.ClientCursor(c), id="client-cursor"),
        pytest.param(lambda c: psycopg.RawCursor(c), id="raw-cursor"),
        pytest.param(lambda c: c.cursor(binary=True), id="binary-cursor"),
        pytest.param(lambda c: c, id="conn-raw-cursor-factory"),
    ],
)
def test_psycopg_cursor_classes(make: Any, postgres_url: str, unique_name: Any) -> None:
    """Whatever cursor the app holds (or its connection's cursor_factory), the event joins the
    transaction and nothing breaks it."""
    with pg_table(postgres_url, unique_name("outbox_cur")) as table:
        outbox = Outbox(table)
        with psycopg.connect(postgres_url, cursor_factory=psycopg.RawCursor) as conn:
            handle = make(conn)
            a = outbox.publish(
                handle, topic="t", type="one", payload={"n": 1}, key="k", headers={"h": "v"}
            )
            b = outbox.publish_many(handle, [{"topic": "t", "type": "two", "payload": b"2"}])
            assert conn.execute("SELECT 1").fetchone() == (1,)
            conn.commit()
        rows = read_pg(postgres_url, table)
    assert [(r.id, r.type, r.payload, r.key) for r in rows] == [
        (a, "one", b'{"n":1}', "k"),
        (b[0], "two", b"2", None),
    ]


@PG
async def test_psycopg_async_cursor_classes(postgres_url: str, unique_name: Any) -> None:
    with pg_table(postgres_url, unique_name("outbox_acur")) as table:
        outbox = Outbox(table)
        conn = await psycopg.AsyncConnection.connect(
            postgres_url, cursor_factory=psycopg.AsyncRawCursor
        )
        async with conn:
            ids = [await outbox.publish_async(conn, topic="t", type="conn", payload=b"1")]
            for cur in (
                conn.cursor(name="named_acur"),
                psycopg.AsyncRawCursor(conn),
                psycopg.AsyncClientCursor(conn),
            ):
                ids.append(await outbox.publish_async(cur, topic="t", type="cur", payload=b"2"))
            await conn.commit()
        rows = read_pg(postgres_url, table)
    assert [r.id for r in rows] == ids
