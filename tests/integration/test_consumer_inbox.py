"""The inbox on real PostgreSQL (psycopg sync and async, SQLAlchemy) and MariaDB (PyMySQL):
claims in the caller's transaction, concurrent claims of one id serialized by the primary key,
retention purge."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pymysql
import pytest

from outbox_cdc.consumer import Inbox
from tests.support.services import mysql_connect_kwargs


@pytest.fixture
def pg_inbox(postgres_url: str, unique_name: Callable[[str], str]) -> Iterator[Inbox]:
    inbox = Inbox("billing", table=unique_name("inbox"))
    with psycopg.connect(postgres_url) as conn:
        inbox.create_table(conn)
    yield inbox
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {inbox.table}")


@pytest.fixture
def mysql_inbox(mysql_url: str, unique_name: Callable[[str], str]) -> Iterator[Inbox]:
    inbox = Inbox("billing", table=unique_name("inbox"))
    conn = pymysql.connect(**mysql_connect_kwargs(mysql_url))
    try:
        inbox.create_table(conn)
        yield inbox
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {inbox.table}")
    finally:
        conn.close()


@pytest.mark.postgres
def test_postgresql_claim_rollback_purge(postgres_url: str, pg_inbox: Inbox) -> None:
    now = [datetime(2024, 1, 1, tzinfo=UTC)]
    inbox = Inbox(pg_inbox.consumer, table=pg_inbox.table, clock=lambda: now[0])
    with psycopg.connect(postgres_url) as conn:
        assert inbox.claim(conn, "e-1")
        conn.rollback()
        assert inbox.claim(conn, "e-1")
        conn.commit()
        assert not inbox.claim(conn, "e-1")
        with conn.cursor() as cur:
            assert not inbox.claim(cur, "e-1")
        now[0] += timedelta(days=10)
        assert inbox.claim(conn, "e-2")
        assert inbox.purge(conn, older_than=timedelta(days=7)) == 1
        conn.commit()
        assert inbox.claim(conn, "e-1")  # purged


@pytest.mark.postgres
def test_postgresql_concurrent_claims_of_one_id(postgres_url: str, pg_inbox: Inbox) -> None:
    """Two members of a group handling the same event (during a rebalance): the second claim
    waits for the first transaction, then sees the id."""
    with psycopg.connect(postgres_url) as first, psycopg.connect(postgres_url) as second:
        assert pg_inbox.claim(first, "e-1")
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(pg_inbox.claim(second, "e-1")))
        t.start()
        time.sleep(0.3)
        assert result == []  # blocked on the first transaction's row
        first.commit()
        t.join(10)
        assert result == [False]


@pytest.mark.postgres
def test_postgresql_first_transaction_rolls_back_second_claim_wins(
    postgres_url: str, pg_inbox: Inbox
) -> None:
    with psycopg.connect(postgres_url) as first, psycopg.connect(postgres_url) as second:
        assert pg_inbox.claim(first, "e-1")
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(pg_inbox.claim(second, "e-1")))
        t.start()
        time.sleep(0.3)
        first.rollback()  # the first handler failed: the event is still to process
        t.join(10)
        assert result == [True]


@pytest.mark.postgres
async def test_postgresql_async(postgres_url: str, pg_inbox: Inbox) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        await pg_inbox.create_table_async(conn)
        assert await pg_inbox.claim_async(conn, "a-1")
        assert not await pg_inbox.claim_async(conn, "a-1")
        async with conn.cursor() as cur:
            assert not await pg_inbox.claim_async(cur, "a-1")
        assert await pg_inbox.purge_async(conn, older_than=timedelta(days=1)) == 0
        await conn.commit()


@pytest.mark.postgres
def test_postgresql_sqlalchemy(postgres_url: str, pg_inbox: Inbox) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(
        postgres_url.replace("postgresql://", "postgresql+psycopg://")
    )
    try:
        with engine.begin() as conn:
            assert pg_inbox.claim(conn, "s-1")
            assert not pg_inbox.claim(conn, "s-1")
    finally:
        engine.dispose()


@pytest.mark.mysql
def test_mariadb_claim_rollback_purge(mysql_url: str, mysql_inbox: Inbox) -> None:
    now = [datetime(2024, 1, 1, tzinfo=UTC)]
    inbox = Inbox(mysql_inbox.consumer, table=mysql_inbox.table, clock=lambda: now[0])
    conn = pymysql.connect(**mysql_connect_kwargs(mysql_url), autocommit=False)
    try:
        assert inbox.claim(conn, "e-1")
        conn.rollback()
        assert inbox.claim(conn, "e-1")
        conn.commit()
        assert not inbox.claim(conn, "e-1")
        assert inbox.claim(conn, "E-1")  # byte-for-byte ids (binary collation)
        now[0] += timedelta(days=10)
        assert inbox.claim(conn, "e-2")
        assert inbox.purge(conn, older_than=timedelta(days=7)) == 2
        conn.commit()
        assert inbox.claim(conn, "e-1")
        conn.rollback()
    finally:
        conn.close()


@pytest.mark.mysql
def test_mariadb_concurrent_claims_of_one_id(mysql_url: str, mysql_inbox: Inbox) -> None:
    kwargs = mysql_connect_kwargs(mysql_url)
    first = pymysql.connect(**kwargs, autocommit=False)
    second = pymysql.connect(**kwargs, autocommit=False)
    try:
        assert mysql_inbox.claim(first, "e-1")
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(mysql_inbox.claim(second, "e-1")))
        t.start()
        time.sleep(0.3)
        assert result == []
        first.commit()
        t.join(10)
        assert result == [False]
        second.rollback()
    finally:
        first.close()
        second.close()
