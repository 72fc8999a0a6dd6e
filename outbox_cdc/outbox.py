"""The insert API: write events in the caller's own transaction, on the caller's connection.

It never begins, commits or rolls back: commit = the event will be published, rollback = it
never was. Supported connections: psycopg 3 (connection or cursor, sync or async), SQLAlchemy 2
(Connection or Session, sync or async), sqlite3, PyMySQL. Everything is validated before the
first statement runs, so a bad event leaves the caller's transaction untouched and usable.

Statements are built once per (database, parameter style, table, batch size) and cached.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from outbox_cdc.errors import ConfigurationError, EventValidationError, UnsupportedConnectionError
from outbox_cdc.events import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    HeaderValue,
    OutboxEvent,
    create_event,
    envelope_to_json,
    format_time,
    headers_to_json,
)
from outbox_cdc.schema import validate_table

DEFAULT_MESSAGE_PREFIX = "outbox-cdc"
Mode = Literal["table", "message"]

_COLUMNS = '(id, created_at, topic, "key", type, content_type, payload, headers)'
_MYSQL_COLUMNS = "(id, created_at, topic, `key`, type, content_type, payload, headers)"

SUPPORTED = (
    "psycopg Connection/Cursor (sync or async), SQLAlchemy Connection/Session (sync or async), "
    "sqlite3.Connection/Cursor, PyMySQL Connection/Cursor"
)


@dataclass(frozen=True)
class _Target:
    """How to run SQL on one connection object."""

    dialect: str  # postgresql | mysql | sqlite
    style: str  # format (%s) | qmark (?) | named (:p0, for SQLAlchemy text())
    flavor: str  # psycopg | psycopg_async | sqlalchemy | sqlalchemy_async | dbapi
    handle: Any


def _target(conn: Any) -> _Target:
    mod = type(conn).__module__
    if mod.startswith("psycopg"):
        import psycopg

        if isinstance(conn, psycopg.Connection | psycopg.Cursor):
            return _Target("postgresql", "format", "psycopg", conn)
        if isinstance(conn, psycopg.AsyncConnection | psycopg.AsyncCursor):
            return _Target("postgresql", "format", "psycopg_async", conn)
    if mod.startswith("sqlalchemy"):
        return _sqlalchemy_target(conn)
    if isinstance(conn, sqlite3.Connection | sqlite3.Cursor):
        return _Target("sqlite", "qmark", "dbapi", conn)
    if mod.startswith("pymysql"):
        return _Target("mysql", "format", "dbapi", conn)
    raise UnsupportedConnectionError(
        f"conn: unsupported connection type {mod}.{type(conn).__qualname__}; pass one of: "
        f"{SUPPORTED}"
    )


def _sqlalchemy_target(conn: Any) -> _Target:
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
    from sqlalchemy.orm import Session

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
    dialect = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql",
               "sqlite": "sqlite"}.get(name)
    if dialect is None:
        raise UnsupportedConnectionError(f"conn: SQLAlchemy dialect {name!r} is not supported")
    return _Target(dialect, "named", flavor, conn)


# -- statements ----------------------------------------------------------------------------------


def _placeholders(style: str, start: int, count: int) -> list[str]:
    if style == "format":
        return ["%s"] * count
    if style == "qmark":
        return ["?"] * count
    return [f":p{i}" for i in range(start, start + count)]


@lru_cache(maxsize=256)
def _insert_sql(dialect: str, style: str, table: str, rows: int) -> str:
    groups = []
    for r in range(rows):
        p = _placeholders(style, r * 8, 8)
        if dialect == "postgresql":
            p[0] = f"CAST({p[0]} AS uuid)"
            p[1] = f"CAST({p[1]} AS timestamptz)"
            p[7] = f"CAST({p[7]} AS json)"
        groups.append("(" + ", ".join(p) + ")")
    cols = _MYSQL_COLUMNS if dialect == "mysql" else _COLUMNS
    return f"INSERT INTO {table} {cols} VALUES " + ", ".join(groups)


@lru_cache(maxsize=64)
def _message_sql(style: str, rows: int) -> str:
    if rows == 1:
        prefix, content = _placeholders(style, 0, 2)
        return f"SELECT pg_logical_emit_message(true, {prefix}, {content})"
    prefix, contents = _placeholders(style, 0, 2)
    # unnest yields the array in order, and the target list runs row by row in that order
    return (f"SELECT count(pg_logical_emit_message(true, {prefix}, m)) "
            f"FROM unnest(CAST({contents} AS text[])) AS m")


def _row_params(dialect: str, event: OutboxEvent) -> list[Any]:
    if dialect == "mysql":
        created: Any = event.created_at.replace(tzinfo=None)  # DATETIME(6) in UTC
    elif dialect == "sqlite":
        created = format_time(event.created_at)
    else:
        created = event.created_at
    return [str(event.id), created, event.topic, event.key, event.type, event.content_type,
            event.payload, headers_to_json(event.headers)]


# -- trace context -------------------------------------------------------------------------------

_propagator: Any = None


def _trace_headers() -> dict[str, str]:
    """traceparent/tracestate of the active OpenTelemetry span, if OpenTelemetry is installed."""
    global _propagator
    if _propagator is None:
        try:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            _propagator = TraceContextTextMapPropagator()
        except ImportError:
            _propagator = False
    if not _propagator:
        return {}
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


class Outbox:
    """Insert API bound to one outbox table (or, for PostgreSQL, to logical messages).

    ``mode="table"`` inserts a row into ``table``; ``mode="message"`` writes a transactional
    logical decoding message (``pg_logical_emit_message(true, ...)``) carrying the same
    envelope: nothing to clean up, but nothing to re-publish from if the slot is lost.
    """

    def __init__(
        self,
        table: str = "outbox",
        *,
        mode: Mode = "table",
        message_prefix: str = DEFAULT_MESSAGE_PREFIX,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        capture_trace_context: bool = True,
    ) -> None:
        if mode not in ("table", "message"):
            raise ConfigurationError(f"mode: {mode!r}; expected 'table' or 'message'")
        if not message_prefix:
            raise ConfigurationError("message_prefix: must be a non-empty string")
        self.table = validate_table(table)
        self.mode = mode
        self.message_prefix = message_prefix
        self.max_payload_bytes = max_payload_bytes
        self.capture_trace_context = capture_trace_context

    # -- building -------------------------------------------------------------------------------

    def event(
        self,
        *,
        topic: str,
        type: str,
        payload: object,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        id: uuid.UUID | str | None = None,
        content_type: str | None = None,
    ) -> OutboxEvent:
        """Validate and build an event without writing it (for :meth:`publish_many`)."""
        if self.capture_trace_context:
            trace = _trace_headers()
            if trace:
                if headers is not None and not isinstance(headers, Mapping):
                    raise EventValidationError("headers", "must be a mapping of str to str or bytes")
                merged: dict[str, HeaderValue] = dict(trace)
                merged.update(headers or {})
                headers = merged
        return create_event(topic=topic, type=type, payload=payload, key=key, headers=headers,
                            id=id, content_type=content_type,
                            max_payload_bytes=self.max_payload_bytes)

    def _events(self, events: Iterable[OutboxEvent | Mapping[str, Any]]) -> list[OutboxEvent]:
        out = []
        for i, e in enumerate(events):
            if isinstance(e, OutboxEvent):
                out.append(e)
            elif isinstance(e, Mapping):
                try:
                    out.append(self.event(**e))
                except EventValidationError as exc:
                    raise EventValidationError(f"events[{i}].{exc.field}",
                                               str(exc).split(": ", 1)[1]) from None
                except TypeError as exc:
                    raise EventValidationError(f"events[{i}]", str(exc)) from None
            else:
                raise EventValidationError(
                    f"events[{i}]", f"must be an OutboxEvent or a mapping, not {type(e).__name__}"
                )
        return out

    def _statement(self, target: _Target, events: Sequence[OutboxEvent]) -> tuple[str, Any]:
        if self.mode == "message":
            if target.dialect != "postgresql":
                raise UnsupportedConnectionError(
                    "conn: mode='message' needs PostgreSQL (pg_logical_emit_message); use "
                    "mode='table' with this database"
                )
            envelopes = [envelope_to_json(e) for e in events]
            sql = _message_sql(target.style, len(events))
            params: list[Any] = [self.message_prefix,
                                 envelopes[0] if len(events) == 1 else envelopes]
        else:
            sql = _insert_sql(target.dialect, target.style, self.table, len(events))
            params = []
            for e in events:
                params.extend(_row_params(target.dialect, e))
        if target.style == "named":
            return sql, {f"p{i}": v for i, v in enumerate(params)}
        return sql, params

    # -- sync -----------------------------------------------------------------------------------

    def publish(self, conn: Any, *, topic: str, type: str, payload: object,
                key: str | None = None, headers: Mapping[str, HeaderValue] | None = None,
                id: uuid.UUID | str | None = None, content_type: str | None = None) -> uuid.UUID:
        """Write one event in the caller's transaction; returns its id."""
        event = self.event(topic=topic, type=type, payload=payload, key=key, headers=headers,
                           id=id, content_type=content_type)
        self._run(conn, [event])
        return event.id

    def publish_many(self, conn: Any,
                     events: Iterable[OutboxEvent | Mapping[str, Any]]) -> list[uuid.UUID]:
        """Write several events in one round trip, in the given order; returns their ids."""
        built = self._events(events)
        if built:
            self._run(conn, built)
        return [e.id for e in built]

    def _run(self, conn: Any, events: Sequence[OutboxEvent]) -> None:
        target = _target(conn)
        if target.flavor.endswith("_async"):
            raise UnsupportedConnectionError(
                "conn: this is an async connection; use publish_async / publish_many_async"
            )
        sql, params = self._statement(target, events)
        h = target.handle
        if target.flavor == "sqlalchemy":
            from sqlalchemy import text

            h.execute(text(sql), params)
        elif target.flavor == "psycopg":
            h.execute(sql, params)
        else:  # DB-API: a cursor we may use, or a connection we open a cursor on
            if hasattr(h, "cursor") and not isinstance(h, sqlite3.Cursor):
                cur = h.cursor()
                try:
                    cur.execute(sql, params)
                finally:
                    cur.close()
            else:
                h.execute(sql, params)

    # -- async ----------------------------------------------------------------------------------

    async def publish_async(self, conn: Any, *, topic: str, type: str, payload: object,
                            key: str | None = None,
                            headers: Mapping[str, HeaderValue] | None = None,
                            id: uuid.UUID | str | None = None,
                            content_type: str | None = None) -> uuid.UUID:
        """Async twin of :meth:`publish` (psycopg AsyncConnection, SQLAlchemy async)."""
        event = self.event(topic=topic, type=type, payload=payload, key=key, headers=headers,
                           id=id, content_type=content_type)
        await self._run_async(conn, [event])
        return event.id

    async def publish_many_async(
        self, conn: Any, events: Iterable[OutboxEvent | Mapping[str, Any]]
    ) -> list[uuid.UUID]:
        built = self._events(events)
        if built:
            await self._run_async(conn, built)
        return [e.id for e in built]

    async def _run_async(self, conn: Any, events: Sequence[OutboxEvent]) -> None:
        target = _target(conn)
        if not target.flavor.endswith("_async"):
            raise UnsupportedConnectionError(
                "conn: this is a sync connection; use publish / publish_many"
            )
        sql, params = self._statement(target, events)
        if target.flavor == "sqlalchemy_async":
            from sqlalchemy import text

            await target.handle.execute(text(sql), params)
        else:
            await target.handle.execute(sql, params)


_default = Outbox()


def publish(conn: Any, *, topic: str, type: str, payload: object, key: str | None = None,
            headers: Mapping[str, HeaderValue] | None = None, id: uuid.UUID | str | None = None,
            content_type: str | None = None) -> uuid.UUID:
    """Write one event into table ``outbox`` in the caller's transaction; returns its id.

    Use :class:`Outbox` for another table, the table-less mode or other limits.
    """
    return _default.publish(conn, topic=topic, type=type, payload=payload, key=key,
                            headers=headers, id=id, content_type=content_type)


async def publish_async(conn: Any, *, topic: str, type: str, payload: object,
                        key: str | None = None, headers: Mapping[str, HeaderValue] | None = None,
                        id: uuid.UUID | str | None = None,
                        content_type: str | None = None) -> uuid.UUID:
    """Async twin of :func:`publish`."""
    return await _default.publish_async(conn, topic=topic, type=type, payload=payload, key=key,
                                        headers=headers, id=id, content_type=content_type)


def publish_many(conn: Any, events: Iterable[OutboxEvent | Mapping[str, Any]]) -> list[uuid.UUID]:
    """Write several events in one round trip (table ``outbox``); returns their ids."""
    return _default.publish_many(conn, events)


async def publish_many_async(conn: Any,
                             events: Iterable[OutboxEvent | Mapping[str, Any]]) -> list[uuid.UUID]:
    """Async twin of :func:`publish_many`."""
    return await _default.publish_many_async(conn, events)
