"""Which database and driver a connection object belongs to, and how to run SQL on it.

Shared by the insert API (outbox.py) and the consumer's inbox: both run statements on the
caller's own connection, in the caller's transaction, and never commit. Supported: psycopg 3
(connection or cursor, sync or async), SQLAlchemy 2 (Connection or Session, sync or async),
sqlite3, PyMySQL. No IO here: only type inspection.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from outbox_cdc.errors import UnsupportedConnectionError

SUPPORTED = (
    "psycopg Connection/Cursor (sync or async), SQLAlchemy Connection/Session (sync or async), "
    "sqlite3.Connection/Cursor, PyMySQL Connection/Cursor"
)


@dataclass(frozen=True)
class Target:
    """How to run SQL on one connection object."""

    dialect: str  # postgresql | mysql | sqlite
    style: str  # format (%s) | qmark (?) | named (:p0, for SQLAlchemy text())
    flavor: str  # psycopg[_cursor][_async] | sqlalchemy[_async] | dbapi
    handle: Any


_libraries: dict[type, str | None] = {}


def _library(cls: type) -> str | None:
    """Which driver library a connection class comes from, looking at its bases too: apps and
    frameworks subclass connections and sessions (e.g. Flask-SQLAlchemy's Session)."""
    try:
        return _libraries[cls]
    except KeyError:
        pass
    roots = {c.__module__.partition(".")[0] for c in cls.__mro__}
    lib: str | None = next((n for n in ("psycopg", "sqlalchemy", "pymysql") if n in roots), None)
    if lib is None and issubclass(cls, sqlite3.Connection | sqlite3.Cursor):
        lib = "sqlite3"
    if len(_libraries) < 256:
        _libraries[cls] = lib
    return lib


def _psycopg_unusable_cursors(psycopg: Any) -> tuple[type, ...]:
    return (
        psycopg.ServerCursor,
        psycopg.AsyncServerCursor,
        psycopg.RawCursor,
        psycopg.AsyncRawCursor,
    )


def target_of(conn: Any) -> Target:
    """The way to run SQL on ``conn``; UnsupportedConnectionError names what is accepted."""
    lib = _library(type(conn))
    if lib == "psycopg":
        import psycopg

        # Our SQL uses %s placeholders. A server-side (named) cursor would wrap the INSERT in
        # DECLARE ... CURSOR FOR, and a RawCursor wants $1 placeholders: both fail with a syntax
        # error that aborts the caller's transaction. So such cursors are replaced by their
        # connection (the same transaction), and a connection is used through a plain
        # psycopg.Cursor of ours, whatever its cursor_factory.
        if isinstance(conn, psycopg.Cursor | psycopg.AsyncCursor) and isinstance(
            conn, _psycopg_unusable_cursors(psycopg)
        ):
            conn = conn.connection
        if isinstance(conn, psycopg.Connection):
            return Target("postgresql", "format", "psycopg", conn)
        if isinstance(conn, psycopg.Cursor):
            return Target("postgresql", "format", "psycopg_cursor", conn)
        if isinstance(conn, psycopg.AsyncConnection):
            return Target("postgresql", "format", "psycopg_async", conn)
        if isinstance(conn, psycopg.AsyncCursor):
            return Target("postgresql", "format", "psycopg_cursor_async", conn)
    elif lib == "sqlalchemy":
        return _sqlalchemy_target(conn)
    elif lib == "sqlite3":
        return Target("sqlite", "qmark", "dbapi", conn)
    elif lib == "pymysql":
        from pymysql.connections import Connection as PyMySQLConnection
        from pymysql.cursors import Cursor as PyMySQLCursor

        if isinstance(conn, PyMySQLConnection | PyMySQLCursor):
            return Target("mysql", "format", "dbapi", conn)
    raise UnsupportedConnectionError(
        f"conn: unsupported connection type {type(conn).__module__}.{type(conn).__qualname__}; "
        f"pass one of: {SUPPORTED}"
    )


def _sqlalchemy_target(conn: Any) -> Target:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
    from sqlalchemy.orm import Session, scoped_session

    if isinstance(conn, scoped_session | async_scoped_session):
        conn = conn()  # the registry's current session (e.g. Flask-SQLAlchemy's db.session)
    bind: Any
    if isinstance(conn, Connection | Session):
        flavor = "sqlalchemy"
        bind = conn.get_bind() if isinstance(conn, Session) else conn
    elif isinstance(conn, AsyncConnection | AsyncSession):
        flavor = "sqlalchemy_async"
        bind = conn.sync_session.get_bind() if isinstance(conn, AsyncSession) else conn
    else:
        raise UnsupportedConnectionError(
            f"conn: unsupported SQLAlchemy object {type(conn).__qualname__}; pass a Connection "
            "or Session (sync or async), not an Engine: the event must join your transaction"
        )
    name = bind.dialect.name
    dialect = {
        "postgresql": "postgresql",
        "mysql": "mysql",
        "mariadb": "mysql",
        "sqlite": "sqlite",
    }.get(name)
    if dialect is None:
        raise UnsupportedConnectionError(f"conn: SQLAlchemy dialect {name!r} is not supported")
    return Target(dialect, "named", flavor, conn)
