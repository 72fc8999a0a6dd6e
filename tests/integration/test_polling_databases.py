"""The polling source against real PostgreSQL, MariaDB and SQLite: the database half's contract
(poller lock, what a poll sees, marking, clean-up) and the source with the relay and an
in-memory sink under concurrent producers. Kafka is covered in tests/acceptance."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest

from outbox_cdc import Outbox
from outbox_cdc.relay import Relay, RelayOptions
from outbox_cdc.schema import ddl, statements
from outbox_cdc.sinks.memory import MemorySink
from outbox_cdc.sources.polling import PollingSource, PollingSourceOptions
from outbox_cdc.sources.polling_databases import PollingDatabase, open_database
from tests.integration.insert_support import pymysql_args


@dataclass
class Db:
    """A database with a fresh outbox table: ``connect()`` gives a producer's DB-API
    connection (autocommit off); ``sql(q, *params)`` runs one statement on its own connection,
    committed, and returns the rows; ``ph`` is the driver's placeholder."""

    kind: str
    url: str
    table: str
    connect: Callable[[], Any]
    ph: str

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(query.replace("?", self.ph), params)
            rows = list(cur.fetchall()) if cur.description else []
            conn.commit()
            return rows
        finally:
            conn.close()

    def adapter(self) -> PollingDatabase:
        return open_database(self.url, self.table)


@pytest.fixture(params=["postgres", "mariadb", "sqlite"])
def db(
    request: pytest.FixtureRequest, unique_name: Callable[[str], str], tmp_path: Path
) -> Iterator[Db]:
    kind: str = request.param
    name = unique_name("poll")
    if kind == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        table = f"public.{name}"
        with psycopg.connect(url, autocommit=True) as conn:
            for stmt in statements(ddl("postgresql", table, polling=True)):
                conn.execute(stmt)
        yield Db(kind, url, table, lambda: psycopg.connect(url), "%s")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    elif kind == "mariadb":
        url = request.getfixturevalue("mysql_url")
        args = pymysql_args(url)
        with pymysql.connect(**args, autocommit=True) as conn, conn.cursor() as cur:
            for stmt in statements(ddl("mysql", name)):
                cur.execute(stmt)
        yield Db(kind, url, name, lambda: pymysql.connect(**args), "%s")
        with pymysql.connect(**args, autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {name}")
    else:
        path = str(tmp_path / "app.db")
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA journal_mode=WAL")
        for stmt in statements(ddl("sqlite", name)):
            conn.execute(stmt)
        conn.commit()
        conn.close()
        yield Db(kind, f"sqlite:///{path}", name, lambda: sqlite3.connect(path, timeout=30), "?")


def publish(db: Db, conn: Any, n: int, key: str = "k", topic: str = "t") -> None:
    outbox = Outbox(db.table, capture_trace_context=False)
    for i in range(n):
        outbox.publish(conn, topic=topic, type="x", payload=f"{key}:{i}".encode(), key=key)


def pending(db: Db) -> list[int]:
    return [
        r[0] for r in db.sql(f"SELECT seq FROM {db.table} WHERE published_at IS NULL ORDER BY seq")
    ]


# -- the database half --------------------------------------------------------------------------


def test_one_poller_lock_per_table_released_with_the_connection(db: Db) -> None:
    first, second = db.adapter(), db.adapter()
    first.connect()
    second.connect()
    try:
        assert first.try_lock()
        assert not second.try_lock()
        holder = second.lock_holder()
        assert holder != "another relay" or db.kind == "sqlite", holder
        first.close()
        # the server releases it when it has processed the disconnection (MariaDB: a moment
        # later); a standby retries every couple of seconds
        deadline = time.monotonic() + 5
        while not second.try_lock():
            assert time.monotonic() < deadline, "the lock stayed taken after its connection closed"
            time.sleep(0.05)
    finally:
        first.close()
        second.close()


def test_a_poll_sees_committed_rows_in_seq_order_and_never_uncommitted_ones(db: Db) -> None:
    producer = db.connect()
    publish(db, producer, 3)
    producer.commit()
    poller = db.adapter()
    poller.connect()
    try:
        assert [r[0] for r in poller.fetch(10)] == pending(db)
        open_txn = db.connect()
        publish(db, open_txn, 2, key="open")  # not committed
        seen = poller.fetch(10)
        assert len(seen) == 3
        assert all(r[4] == "k" for r in seen)
        open_txn.commit()  # the same connection polls again: READ COMMITTED, it sees the commit
        assert len(poller.fetch(10)) == 5
        open_txn.close()
    finally:
        poller.close()
        producer.close()


def test_a_lower_seq_committing_late_is_seen_by_the_next_poll(db: Db) -> None:
    if db.kind == "sqlite":
        # The reason SQLite needs no such care: one writer at a time. While a transaction that
        # took a seq is open, no other can insert (and so commit a later seq).
        path = db.url.split(":///", 1)[1]
        holder = sqlite3.connect(path)
        publish(db, holder, 1)
        other = sqlite3.connect(path, timeout=0.2)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            publish(db, other, 1)
        holder.close()
        other.close()
        return
    late = db.connect()
    publish(db, late, 1, key="late")  # takes the lower seq, stays open
    early = db.connect()
    publish(db, early, 1, key="early")
    early.commit()
    poller = db.adapter()
    poller.connect()
    try:
        (row,) = poller.fetch(10)
        assert row[4] == "early"
        poller.mark([row[0]])
        late.commit()
        (row2,) = poller.fetch(10)
        assert row2[4] == "late" and row2[0] < row[0]
    finally:
        poller.close()
        late.close()
        early.close()


def test_mark_and_delete_take_rows_out_of_the_next_poll(db: Db) -> None:
    producer = db.connect()
    publish(db, producer, 4)
    producer.commit()
    producer.close()
    poller = db.adapter()
    poller.connect()
    try:
        seqs = [r[0] for r in poller.fetch(10)]
        poller.mark(seqs[:2])
        poller.delete(seqs[2:3])
        assert [r[0] for r in poller.fetch(10)] == seqs[3:]
        rows = db.sql(f"SELECT seq, published_at FROM {db.table} ORDER BY seq")
        assert [r[0] for r in rows] == [*seqs[:2], seqs[3]]
        assert rows[0][1] is not None and rows[1][1] is not None and rows[2][1] is None
    finally:
        poller.close()


def test_cleanup_deletes_only_published_rows_older_than_retention_under_inserts(db: Db) -> None:
    producer = db.connect()
    publish(db, producer, 30)
    producer.commit()
    poller = db.adapter()
    poller.connect()
    stop = threading.Event()
    inserted = [0]

    def insert_meanwhile() -> None:
        conn = db.connect()
        try:
            while not stop.is_set():
                publish(db, conn, 1, key="new")
                conn.commit()
                inserted[0] += 1
        finally:
            conn.close()

    try:
        seqs = [r[0] for r in poller.fetch(100)]
        poller.mark(seqs[:20])
        old = "2000-01-01T00:00:00.000000Z" if db.kind == "sqlite" else "2000-01-01 00:00:00"
        marks = ",".join(str(s) for s in seqs[:10])
        db.sql(f"UPDATE {db.table} SET published_at = ? WHERE seq IN ({marks})", old)
        writer = threading.Thread(target=insert_meanwhile)
        writer.start()
        time.sleep(0.2)
        deleted = 0
        for _ in range(5):
            deleted += poller.cleanup(3600.0, 1000)
        stop.set()
        writer.join(10)
        assert deleted == 10
        left = {r[0] for r in db.sql(f"SELECT seq FROM {db.table}")}
        assert left.isdisjoint(seqs[:10])
        assert set(seqs[10:]) <= left  # published recently, or pending: kept
        assert inserted[0] > 0
        assert len(left) == 20 + inserted[0]
    finally:
        stop.set()
        poller.close()
        producer.close()


# -- the source with the relay ------------------------------------------------------------------


@pytest.mark.parametrize("retention", [0.0, 3600.0])
def test_concurrent_producers_everything_once_in_key_order(db: Db, retention: float) -> None:
    """Three producer threads commit 600 events each while the relay polls; one transaction in
    five rolls back. Every committed event is published once, in key order; the table ends up
    with nothing pending (retention 0: nothing at all)."""
    sink = MemorySink()
    source = PollingSource(
        PollingSourceOptions(
            url=db.url, table=db.table, poll_interval=0.02, batch_size=100, retention=retention
        )
    )
    relay = Relay(source, lambda: sink, RelayOptions())
    runner = threading.Thread(target=relay.run, daemon=True)
    runner.start()
    committed: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def produce(t: int) -> None:
        conn = db.connect()
        outbox = Outbox(db.table, capture_trace_context=False)
        try:
            for n in range(200):
                key = f"k{t}-{n % 7}"
                values = [f"{key}:{n}:{i}".encode() for i in range(3)]
                for v in values:
                    outbox.publish(conn, topic="t", type="x", payload=v, key=key)
                if n % 5 == 4:
                    conn.rollback()
                    continue
                conn.commit()
                with lock:
                    committed.setdefault(key, []).extend(values)
        finally:
            conn.close()

    producers = [threading.Thread(target=produce, args=(t,)) for t in range(3)]
    for p in producers:
        p.start()
    for p in producers:
        p.join(60)
    total = sum(len(v) for v in committed.values())
    deadline = time.monotonic() + 30
    while len(sink.records) < total and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # nothing more may arrive
    relay.stop()
    runner.join(10)
    by_key: dict[str, list[bytes]] = {}
    for r in sink.records:
        assert r.key is not None
        by_key.setdefault(r.key.decode(), []).append(r.value)
    assert by_key == committed  # each committed event once, in commit order per key
    assert len(sink.records) == total == 3 * 160 * 3
    assert pending(db) == []
    remaining = db.sql(f"SELECT count(*) FROM {db.table}")[0][0]
    assert remaining == (0 if retention == 0 else total)


@pytest.mark.postgres
def test_postgres_notify_wakes_the_poller_long_before_the_poll_interval(
    postgres_url: str, unique_name: Callable[[str], str]
) -> None:
    """With ``init --polling --notify`` and ``poll_notify``, a commit is picked up at once even
    with a 30 s poll interval; the notification of another table does not trigger a poll."""
    table = f"public.{unique_name('poll_notify')}"
    other = f"public.{unique_name('poll_other')}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for t in (table, other):
            for stmt in statements(ddl("postgresql", t, polling=True, notify=True)):
                conn.execute(stmt)
    source = PollingSource(
        PollingSourceOptions(
            url=postgres_url, table=table, poll_interval=30.0, retention=0.0, notify=True
        )
    )
    wake_r, wake_w = os.pipe()
    try:
        source.open(0)
        assert source.read(0.5, wake_r, 100) == []  # first poll: empty; the next is 30 s away
        with psycopg.connect(postgres_url) as producer:
            publish_pg(producer, other)
        started = time.monotonic()
        assert source.read(0.5, wake_r, 100) == []  # another table's NOTIFY: no poll
        with psycopg.connect(postgres_url) as producer:
            publish_pg(producer, table)
        items: list[Any] = []
        while not items and time.monotonic() - started < 5:
            items = source.read(0.5, wake_r, 100)
        assert len(items) == 3, "the NOTIFY did not wake the poller"
        assert time.monotonic() - started < 5
    finally:
        source.close()
        os.close(wake_r)
        os.close(wake_w)
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for t in (table, other):
                conn.execute(f"DROP TABLE IF EXISTS {t}")


def publish_pg(conn: Any, table: str) -> None:
    Outbox(table, capture_trace_context=False).publish(conn, topic="t", type="x", payload=b"1")
