"""The async insert API on a real PostgreSQL: psycopg AsyncConnection and AsyncCursor, SQLAlchemy
AsyncConnection and AsyncSession (postgresql+psycopg). Same guarantees as the sync kinds
(test_insert_api.py): commit = one row with the given fields, rollback = none, savepoints,
order, ``publish_many_async`` in one statement, validation errors leave the transaction usable.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import outbox_cdc
from outbox_cdc import EventValidationError, Outbox, UnsupportedConnectionError
from outbox_cdc.events import envelope_from_json
from tests.integration.insert_support import pg_table, read_pg, sqlalchemy_url

pytestmark = pytest.mark.postgres

KINDS = ["psycopg-conn", "psycopg-cursor", "sa-conn", "sa-session"]


class AsyncTx:
    def __init__(self, handle: Any, conn: Any = None) -> None:
        self.handle = handle
        self.conn = conn  # psycopg: the AsyncConnection (handle may be its cursor)
        self._nested: dict[str, Any] = {}

    async def commit(self) -> None:
        await (self.conn or self.handle).commit()

    async def rollback(self) -> None:
        await (self.conn or self.handle).rollback()

    async def savepoint(self, name: str) -> None:
        if self.conn is not None:
            await self.conn.execute(f"SAVEPOINT {name}")
        else:
            self._nested[name] = await self.handle.begin_nested()

    async def rollback_to(self, name: str) -> None:
        if self.conn is not None:
            await self.conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
        else:
            await self._nested.pop(name).rollback()

    async def fetchone(self, sql: str) -> tuple[Any, ...]:
        if self.conn is not None:
            cur = await self.conn.execute(sql)
            row = await cur.fetchone()
        else:
            from sqlalchemy import text

            row = (await self.handle.execute(text(sql))).fetchone()
        assert row is not None
        return tuple(row)


@asynccontextmanager
async def open_async_tx(kind: str, url: str) -> AsyncIterator[AsyncTx]:
    if kind.startswith("psycopg"):
        conn = await psycopg.AsyncConnection.connect(url)
        try:
            if kind == "psycopg-cursor":
                async with conn.cursor() as cur:
                    yield AsyncTx(cur, conn)
            else:
                yield AsyncTx(conn, conn)
        finally:
            await conn.close()
        return
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(sqlalchemy_url(url, "psycopg"))
    try:
        if kind == "sa-conn":
            async with engine.connect() as sa_conn:
                yield AsyncTx(sa_conn)
        else:
            async with AsyncSession(engine) as session:
                yield AsyncTx(session)
    finally:
        await engine.dispose()


@pytest.fixture
def table(postgres_url: str, unique_name: Any) -> Iterator[str]:
    with pg_table(postgres_url, unique_name("outbox_async")) as name:
        yield name


@pytest.mark.parametrize("kind", KINDS)
async def test_commit_writes_exactly_one_row_with_the_given_fields(
    kind: str, postgres_url: str, table: str
) -> None:
    outbox = Outbox(table)
    event_id = uuid.uuid4()
    now = datetime.now(UTC)
    async with open_async_tx(kind, postgres_url) as tx:
        returned = await outbox.publish_async(
            tx.handle,
            topic="orders.v1",
            type="order.created",
            payload={"total": 12.5},
            key="order-1",
            headers={"tenant": "acme", "bin": b"\xff"},
            id=str(event_id),
        )
        await tx.commit()
    assert returned == event_id
    (row,) = read_pg(postgres_url, table)
    assert row.id == event_id
    assert (row.topic, row.key, row.type) == ("orders.v1", "order-1", "order.created")
    assert row.content_type == "application/json"
    assert row.payload == b'{"total":12.5}'
    assert row.headers == (("tenant", b"acme"), ("bin", b"\xff"))
    assert abs(row.created_at - now) < timedelta(seconds=1)


@pytest.mark.parametrize("kind", KINDS)
async def test_rollback_writes_nothing(kind: str, postgres_url: str, table: str) -> None:
    outbox = Outbox(table)
    async with open_async_tx(kind, postgres_url) as tx:
        await outbox.publish_async(tx.handle, topic="t", type="a", payload=b"1")
        await outbox.publish_many_async(tx.handle, [{"topic": "t", "type": "b", "payload": b"2"}])
        await tx.rollback()
    assert read_pg(postgres_url, table) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_rollback_to_savepoint_removes_only_later_events(
    kind: str, postgres_url: str, table: str
) -> None:
    outbox = Outbox(table)
    async with open_async_tx(kind, postgres_url) as tx:
        first = await outbox.publish_async(tx.handle, topic="t", type="before", payload=b"1")
        await tx.savepoint("sp_async")
        await outbox.publish_async(tx.handle, topic="t", type="undone", payload=b"2")
        await tx.rollback_to("sp_async")
        last = await outbox.publish_async(tx.handle, topic="t", type="after", payload=b"3")
        await tx.commit()
    assert [(r.id, r.type) for r in read_pg(postgres_url, table)] == [
        (first, "before"),
        (last, "after"),
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_order_and_publish_many_in_one_statement(
    kind: str, postgres_url: str, table: str
) -> None:
    outbox = Outbox(table)
    async with open_async_tx(kind, postgres_url) as tx:
        ids = [
            await outbox.publish_async(tx.handle, topic="t", type=f"single.{i}", payload=str(i))
            for i in range(3)
        ]
        ids += await outbox.publish_many_async(
            tx.handle, [{"topic": "t", "type": f"many.{i}", "payload": str(i)} for i in range(5)]
        )
        (statements,) = await tx.fetchone(
            f"SELECT count(DISTINCT cmin::text) FROM {table} WHERE type LIKE 'many.%'"
        )
        await tx.commit()
    assert statements == 1
    rows = read_pg(postgres_url, table)
    assert [r.id for r in rows] == ids
    assert [r.type for r in rows] == [f"single.{i}" for i in range(3)] + [
        f"many.{i}" for i in range(5)
    ]


@pytest.mark.parametrize("kind", KINDS)
async def test_validation_error_keeps_the_transaction_usable(
    kind: str, postgres_url: str, table: str
) -> None:
    outbox = Outbox(table, max_payload_bytes=10)
    async with open_async_tx(kind, postgres_url) as tx:
        first = await outbox.publish_async(tx.handle, topic="t", type="ok.1", payload=b"1")
        with pytest.raises(EventValidationError) as exc:
            await outbox.publish_async(tx.handle, topic="t", type="big", payload=b"x" * 11)
        assert exc.value.field == "payload"
        with pytest.raises(EventValidationError) as exc:
            await outbox.publish_many_async(
                tx.handle,
                [
                    {"topic": "t", "type": "fine", "payload": b"1"},
                    {"topic": "..", "type": "bad", "payload": b"2"},
                ],
            )
        assert exc.value.field == "events[1].topic"
        with pytest.raises(UnsupportedConnectionError, match="async connection"):
            outbox.publish(tx.handle, topic="t", type="sync.call", payload=b"1")
        assert await tx.fetchone("SELECT 1") == (1,)
        second = await outbox.publish_async(tx.handle, topic="t", type="ok.2", payload=b"2")
        await tx.commit()
    assert [r.id for r in read_pg(postgres_url, table)] == [first, second]


@pytest.mark.parametrize("kind", KINDS)
async def test_message_mode(kind: str, postgres_url: str, replication_slot: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (replication_slot,)
        )
    outbox = Outbox(mode="message")
    async with open_async_tx(kind, postgres_url) as tx:
        undone = await outbox.publish_async(tx.handle, topic="t", type="undone", payload=b"0")
        await tx.rollback()
        kept = await outbox.publish_async(
            tx.handle, topic="t", type="kept", payload=b"1", key="k", headers={"h": "v"}
        )
        kept_many = await outbox.publish_many_async(
            tx.handle,
            [
                {"topic": "t", "type": "kept.many", "payload": b"2"},
                {"topic": "t", "type": "kept.many", "payload": b"3"},
            ],
        )
        await tx.commit()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'format-version', '2',"
            " 'add-msg-prefixes', 'outbox-cdc', 'add-tables', 'none.none')",
            (replication_slot,),
        ).fetchall()
    wanted = {undone, kept, *kept_many}
    events = [
        e
        for e in (
            envelope_from_json(json.loads(r[0])["content"])
            for r in rows
            if json.loads(r[0])["action"] == "M"
        )
        if e.id in wanted
    ]
    assert [e.id for e in events] == [kept, *kept_many]
    assert (events[0].key, events[0].headers, events[0].payload) == ("k", (("h", b"v"),), b"1")


# -- the module-level functions write to table "outbox": give each test its own schema -----------


@pytest.fixture
def default_schema(postgres_url: str, unique_name: Any) -> Iterator[str]:
    schema_name = unique_name("ins_schema")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema_name}")
    try:
        with pg_table(postgres_url, f"{schema_name}.outbox"):
            yield schema_name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema_name} CASCADE")


async def test_module_level_functions(postgres_url: str, default_schema: str) -> None:
    options = f"-c search_path={default_schema}"
    aconn = await psycopg.AsyncConnection.connect(postgres_url, options=options)
    async with aconn:
        a = await outbox_cdc.publish_async(aconn, topic="t", type="async.one", payload=b"1")
        b = await outbox_cdc.publish_many_async(
            aconn,
            [
                {"topic": "t", "type": "async.many", "payload": b"2"},
            ],
        )
        await aconn.commit()
    with psycopg.connect(postgres_url, options=options) as conn:
        c = outbox_cdc.publish(conn, topic="t", type="sync.one", payload=b"3")
        d = outbox_cdc.publish_many(conn, [{"topic": "t", "type": "sync.many", "payload": b"4"}])
        conn.commit()
    rows = read_pg(postgres_url, f"{default_schema}.outbox")
    assert [(r.id, r.type) for r in rows] == [
        (a, "async.one"),
        (b[0], "async.many"),
        (c, "sync.one"),
        (d[0], "sync.many"),
    ]
