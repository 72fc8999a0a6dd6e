"""Shared helpers for the insert-API integration tests (test_insert_api*.py).

A *kind* is one way for an application to hold a transaction and hand it to the insert API
(psycopg connection or cursor, SQLAlchemy Connection or Session, sqlite3, PyMySQL...). Every kind
offers the same small interface (:class:`Tx`), so one test body covers all of them. Rows are read
back on a separate connection of the test's own, which also proves that a commit is visible to
others and a rollback left nothing behind.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import pymysql

from outbox_cdc import schema
from outbox_cdc.events import headers_from_obj

# -- URLs ---------------------------------------------------------------------------------------


def sqlalchemy_url(url: str, driver: str) -> str:
    """postgresql://... -> postgresql+psycopg://...; mysql://... -> mysql+pymysql://..."""
    scheme, rest = url.split("://", 1)
    base = scheme.split("+", 1)[0]
    if base == "postgres":
        base = "postgresql"
    return f"{base}+{driver}://{rest}"


def pymysql_args(url: str) -> dict[str, Any]:
    u = urlsplit(url)
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": unquote(u.username or ""),
        "password": unquote(u.password or ""),
        "database": u.path.lstrip("/"),
        "charset": "utf8mb4",
    }


# -- tables -------------------------------------------------------------------------------------


def create_table(dialect: str, table: str, execute: Callable[[str], Any]) -> None:
    for stmt in schema.statements(schema.ddl(dialect, table)):
        execute(stmt)


@contextmanager
def pg_table(url: str, table: str) -> Iterator[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        for attempt in range(3):
            try:
                create_table("postgresql", table, conn.execute)
                break
            except psycopg.errors.UniqueViolation:
                # two sessions creating the shared outbox_cdc_* tables at the same moment
                if attempt == 2:
                    raise
                time.sleep(0.2)
    try:
        yield table
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute("DELETE FROM outbox_cdc_schema WHERE table_name = %s", (table,))


@contextmanager
def mysql_table(url: str, table: str) -> Iterator[str]:
    conn = pymysql.connect(**pymysql_args(url), autocommit=True)
    try:
        with conn.cursor() as cur:
            create_table("mysql", table, cur.execute)
    finally:
        conn.close()
    try:
        yield table
    finally:
        conn = pymysql.connect(**pymysql_args(url), autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {table}")
                cur.execute("DELETE FROM outbox_cdc_schema WHERE table_name = %s", (table,))
        finally:
            conn.close()


@contextmanager
def sqlite_table(path: str, table: str) -> Iterator[str]:
    conn = sqlite3.connect(path)
    try:
        create_table("sqlite", table, conn.execute)
        conn.commit()
    finally:
        conn.close()
    try:
        yield table
    finally:
        conn = sqlite3.connect(path)
        try:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute("DELETE FROM outbox_cdc_schema WHERE table_name = ?", (table,))
            conn.commit()
        finally:
            conn.close()


# -- reading rows back --------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    seq: int
    id: uuid.UUID
    created_at: datetime
    topic: str
    key: str | None
    type: str
    content_type: str
    payload: bytes
    headers: tuple[tuple[str, bytes], ...]
    published_at: Any


_SELECT = (
    'SELECT seq, id, created_at, topic, "key", type, content_type, payload, headers, '
    "published_at FROM {table} ORDER BY seq"
)


def _row(values: tuple[Any, ...]) -> Row:
    seq, id_, created, topic, key, type_, ctype, payload, headers, published = values
    if isinstance(created, str):  # SQLite: RFC 3339 text
        created = datetime.fromisoformat(created.replace("Z", "+00:00"))
    if created.tzinfo is None:  # MySQL DATETIME(6) holds UTC
        created = created.replace(tzinfo=UTC)
    if isinstance(headers, str | bytes):
        headers = json.loads(headers)
    return Row(
        seq=int(seq),
        id=id_ if isinstance(id_, uuid.UUID) else uuid.UUID(str(id_)),
        created_at=created,
        topic=topic,
        key=key,
        type=type_,
        content_type=ctype,
        payload=bytes(payload),
        headers=headers_from_obj(headers),
        published_at=published,
    )


def read_pg(url: str, table: str) -> list[Row]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [_row(r) for r in conn.execute(_SELECT.format(table=table)).fetchall()]


def read_mysql(url: str, table: str) -> list[Row]:
    conn = pymysql.connect(**pymysql_args(url), autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(_SELECT.format(table=table).replace('"key"', "`key`"))
            return [_row(r) for r in cur.fetchall()]
    finally:
        conn.close()


def read_sqlite(path: str, table: str) -> list[Row]:
    conn = sqlite3.connect(path)
    try:
        return [_row(r) for r in conn.execute(_SELECT.format(table=table)).fetchall()]
    finally:
        conn.close()


# -- transactions of every kind -----------------------------------------------------------------


class Tx:
    """One open transaction of some kind; ``handle`` is what the application passes as conn."""

    handle: Any

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def savepoint(self, name: str) -> None:
        raise NotImplementedError

    def rollback_to(self, name: str) -> None:
        raise NotImplementedError

    def execute(self, sql: str) -> None:
        """Run a statement in the same transaction (to prove it is still usable)."""
        raise NotImplementedError

    def fetchone(self, sql: str) -> tuple[Any, ...]:
        """Run a query in the same transaction (session) and return its first row."""
        raise NotImplementedError

    def sqlite3_connection(self) -> sqlite3.Connection:
        """The sqlite3 connection underneath (SQLite kinds only)."""
        raise NotImplementedError


class DbapiTx(Tx):
    """psycopg, sqlite3 or PyMySQL: a connection, or a cursor of it."""

    def __init__(self, conn: Any, *, use_cursor: bool) -> None:
        self.conn = conn
        self.cursor = conn.cursor()
        self.handle = self.cursor if use_cursor else conn

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def savepoint(self, name: str) -> None:
        self.cursor.execute(f"SAVEPOINT {name}")

    def rollback_to(self, name: str) -> None:
        self.cursor.execute(f"ROLLBACK TO SAVEPOINT {name}")

    def execute(self, sql: str) -> None:
        self.cursor.execute(sql)

    def fetchone(self, sql: str) -> tuple[Any, ...]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql)
            return tuple(cur.fetchone())
        finally:
            cur.close()

    def sqlite3_connection(self) -> sqlite3.Connection:
        assert isinstance(self.conn, sqlite3.Connection)
        return self.conn

    def close(self) -> None:
        self.cursor.close()
        self.conn.close()


class SqlAlchemyTx(Tx):
    """SQLAlchemy Connection or Session; savepoints through begin_nested(), as apps do."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._nested: dict[str, Any] = {}

    def commit(self) -> None:
        self.handle.commit()

    def rollback(self) -> None:
        self.handle.rollback()

    def savepoint(self, name: str) -> None:
        self._nested[name] = self.handle.begin_nested()

    def rollback_to(self, name: str) -> None:
        self._nested.pop(name).rollback()

    def execute(self, sql: str) -> None:
        from sqlalchemy import text

        self.handle.execute(text(sql))

    def fetchone(self, sql: str) -> tuple[Any, ...]:
        from sqlalchemy import text

        row = self.handle.execute(text(sql)).fetchone()
        return tuple(row)

    def sqlite3_connection(self) -> sqlite3.Connection:
        conn = self.handle if not hasattr(self.handle, "get_bind") else self.handle.connection()
        raw = conn.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        return raw

    def close(self) -> None:
        self.handle.close()


@contextmanager
def open_tx(kind: str, url: str) -> Iterator[Tx]:
    """Open a transaction of ``kind`` (``<dialect>-<api>``) on ``url`` (a file path for SQLite).

    Kinds: ``*-conn`` / ``*-cursor`` (DB-API driver: psycopg, sqlite3, PyMySQL),
    ``*-sa-conn`` / ``*-sa-session`` (SQLAlchemy 2).
    """
    dialect, api = kind.split("-", 1)
    if api in ("conn", "cursor"):
        if dialect == "pg":
            raw: Any = psycopg.connect(url)
        elif dialect == "mysql":
            raw = pymysql.connect(**pymysql_args(url))
        else:
            raw = sqlite3.connect(url)
        tx: Any = DbapiTx(raw, use_cursor=api == "cursor")
        try:
            yield tx
        finally:
            tx.close()
        return

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    if dialect == "pg":
        engine = create_engine(sqlalchemy_url(url, "psycopg"))
    elif dialect == "mysql":
        engine = create_engine(sqlalchemy_url(url, "pymysql"))
    else:
        engine = create_engine(f"sqlite:///{url}")
    try:
        handle = engine.connect() if api == "sa-conn" else Session(engine)
        tx = SqlAlchemyTx(handle)
        try:
            yield tx
        finally:
            tx.close()
    finally:
        engine.dispose()


# -- one database + table per test --------------------------------------------------------------


@dataclass
class Db:
    """The database a test writes to: its kind, URL (a file path for SQLite) and own table."""

    kind: str
    url: str
    table: str

    @property
    def dialect(self) -> str:
        return {"pg": "postgresql", "mysql": "mysql", "sqlite": "sqlite"}[self.kind.split("-")[0]]

    def tx(self) -> Any:
        return open_tx(self.kind, self.url)

    def rows(self) -> list[Row]:
        if self.dialect == "postgresql":
            return read_pg(self.url, self.table)
        if self.dialect == "mysql":
            return read_mysql(self.url, self.table)
        return read_sqlite(self.url, self.table)


@contextmanager
def database(
    kind: str, request: Any, tmp_path: Any, unique_name: Callable[[str], str]
) -> Iterator[Db]:
    """Create the test's own outbox table for ``kind`` and drop it afterwards."""
    dialect = kind.split("-")[0]
    table = unique_name("outbox_ins")
    if dialect == "pg":
        url = request.getfixturevalue("postgres_url")
        cm = pg_table(url, table)
    elif dialect == "mysql":
        url = request.getfixturevalue("mysql_url")
        cm = mysql_table(url, table)
    else:
        url = str(tmp_path / "outbox.sqlite3")
        cm = sqlite_table(url, table)
    with cm:
        yield Db(kind, url, table)
