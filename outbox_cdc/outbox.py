"""The insert API: write events in the caller's own transaction, on the caller's connection.

It never begins, commits or rolls back: commit = the event will be published, rollback = it
never was. Supported connections: psycopg 3 (connection or cursor, sync or async), SQLAlchemy 2
(Connection or Session, sync or async), sqlite3, PyMySQL. Everything is validated before the
first statement runs, so a bad event leaves the caller's transaction untouched and usable.

Statements are built once per (database, parameter style, table, batch size) and cached.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from outbox_cdc.connections import Target, target_of
from outbox_cdc.errors import ConfigurationError, EventValidationError, UnsupportedConnectionError
from outbox_cdc.events import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    HeaderValue,
    OutboxEvent,
    check_event,
    create_event,
    envelope_to_json,
    headers_to_json,
)
from outbox_cdc.schema import validate_table

DEFAULT_MESSAGE_PREFIX = "outbox-cdc"
Mode = Literal["table", "message"]

_COLUMNS = '(id, created_at, topic, "key", type, content_type, payload, headers)'
_MYSQL_COLUMNS = "(id, created_at, topic, `key`, type, content_type, payload, headers)"

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
    return (
        f"SELECT count(pg_logical_emit_message(true, {prefix}, m)) "
        f"FROM unnest(CAST({contents} AS text[])) AS m"
    )


def _utc_naive(ts: datetime) -> datetime:
    return ts if ts.tzinfo is None else ts.astimezone(UTC).replace(tzinfo=None)


def _row_params(dialect: str, event: OutboxEvent) -> list[Any]:
    if dialect == "mysql":
        created: Any = _utc_naive(event.created_at)  # DATETIME(6) in UTC
    elif dialect == "sqlite":
        # fixed width (always microseconds), so the text sorts like the time it holds
        created = _utc_naive(event.created_at).isoformat(timespec="microseconds") + "Z"
    else:
        created = event.created_at
    return [
        str(event.id),
        created,
        event.topic,
        event.key,
        event.type,
        event.content_type,
        event.payload,
        headers_to_json(event.headers),
    ]


def _bind(target: Target, sql: str, params: list[Any]) -> tuple[str, Any]:
    if target.style == "named":
        return sql, {f"p{i}": v for i, v in enumerate(params)}
    return sql, params


# One INSERT binds 8 parameters per row. PostgreSQL's protocol allows 65535 parameters per
# statement, SQLite builds before 3.32 allow 999; MySQL's max_allowed_packet (16 MiB by default in
# MariaDB, 4 MiB in MySQL 5.7) limits the statement size, as PyMySQL inlines the values.
MAX_BATCH_ROWS = 1000
MAX_BATCH_PAYLOAD_BYTES = 4 * 1024 * 1024


def _max_rows(dialect: str) -> int:
    if dialect == "sqlite" and sqlite3.sqlite_version_info < (3, 32, 0):
        return 999 // 8
    return MAX_BATCH_ROWS


def _chunks(events: Sequence[OutboxEvent], max_rows: int) -> Iterator[Sequence[OutboxEvent]]:
    if len(events) <= max_rows and (
        len(events) == 1 or sum(len(e.payload) for e in events) <= MAX_BATCH_PAYLOAD_BYTES
    ):
        yield events
        return
    start, size = 0, 0
    for i, e in enumerate(events):
        if i > start and (i - start >= max_rows or size + len(e.payload) > MAX_BATCH_PAYLOAD_BYTES):
            yield events[start:i]
            start, size = i, 0
        size += len(e.payload)
    yield events[start:]


# MySQL/MariaDB columns with a length (characters, utf8mb4); a longer value would fail the
# statement in strict mode or be cut silently without it.
_MYSQL_LIMITS = (("key", 1024), ("type", 255), ("content_type", 255))


def _check_mysql_limits(events: Sequence[OutboxEvent], many: bool) -> None:
    for i, e in enumerate(events):
        for field, limit in _MYSQL_LIMITS:
            value = getattr(e, field)
            if value is not None and len(value) > limit:
                name = f"events[{i}].{field}" if many else field
                raise EventValidationError(
                    name, f"is {len(value)} characters; the MySQL outbox column holds {limit}"
                )


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
        registry: Any = None,
    ) -> None:
        if mode not in ("table", "message"):
            raise ConfigurationError(f"mode: {mode!r}; expected 'table' or 'message'")
        if not message_prefix:
            raise ConfigurationError("message_prefix: must be a non-empty string")
        if (
            not isinstance(max_payload_bytes, int)
            or isinstance(max_payload_bytes, bool)
            or max_payload_bytes < 0
        ):
            raise ConfigurationError(
                f"max_payload_bytes: {max_payload_bytes!r}; expected an int >= 0"
            )
        self.table = validate_table(table)
        self.mode = mode
        self.message_prefix = message_prefix
        self.max_payload_bytes = max_payload_bytes
        self.capture_trace_context = capture_trace_context
        # ``registry``: a prometheus_client CollectorRegistry of the application's; the store
        # timer and errors go there (outbox_cdc_store_seconds, outbox_cdc_store_errors_total).
        self._metrics: Any = None
        if registry is not None:
            from outbox_cdc.metrics import StoreMetrics

            self._metrics = StoreMetrics.for_registry(registry)

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
                    raise EventValidationError(
                        "headers", "must be a mapping of str to str or bytes"
                    )
                merged: dict[str, HeaderValue] = dict(trace)
                merged.update(headers or {})
                headers = merged
        return create_event(
            topic=topic,
            type=type,
            payload=payload,
            key=key,
            headers=headers,
            id=id,
            content_type=content_type,
            max_payload_bytes=self.max_payload_bytes,
        )

    def _events(self, events: Iterable[OutboxEvent | Mapping[str, Any]]) -> list[OutboxEvent]:
        out = []
        for i, e in enumerate(events):
            try:
                if isinstance(e, OutboxEvent):
                    check_event(e, self.max_payload_bytes)
                    out.append(e)
                elif isinstance(e, Mapping):
                    out.append(self.event(**e))
                else:
                    raise EventValidationError(
                        f"events[{i}]",
                        f"must be an OutboxEvent or a mapping, not {type(e).__name__}",
                    )
            except EventValidationError as exc:
                if exc.field.startswith("events["):
                    raise
                raise EventValidationError(
                    f"events[{i}].{exc.field}", str(exc).split(": ", 1)[1]
                ) from None
            except TypeError as exc:
                raise EventValidationError(f"events[{i}]", str(exc)) from None
        return out

    def _statements(
        self, target: Target, events: Sequence[OutboxEvent], many: bool
    ) -> list[tuple[str, Any]]:
        """The statements writing ``events``: one, unless a batch is too large for one."""
        if self.mode == "message":
            if target.dialect != "postgresql":
                raise UnsupportedConnectionError(
                    "conn: mode='message' needs PostgreSQL (pg_logical_emit_message); use "
                    "mode='table' with this database"
                )
            envelopes = [envelope_to_json(e) for e in events]
            sql = _message_sql(target.style, len(events))
            params: list[Any] = [
                self.message_prefix,
                envelopes[0] if len(events) == 1 else envelopes,
            ]
            return [_bind(target, sql, params)]
        if target.dialect == "mysql":
            _check_mysql_limits(events, many)
        out = []
        chunks = (events,) if len(events) == 1 else _chunks(events, _max_rows(target.dialect))
        for chunk in chunks:
            params = []
            for e in chunk:
                params.extend(_row_params(target.dialect, e))
            sql = _insert_sql(target.dialect, target.style, self.table, len(chunk))
            out.append(_bind(target, sql, params))
        return out

    @contextlib.contextmanager
    def _measure(self) -> Iterator[None]:
        """Store timer and errors, when the application passed a registry."""
        metrics = self._metrics
        if metrics is None:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        except EventValidationError:
            metrics.errors.labels(reason="invalid_event").inc()
            raise
        except UnsupportedConnectionError:
            metrics.errors.labels(reason="unsupported_connection").inc()
            raise
        except Exception:
            metrics.errors.labels(reason="database").inc()
            raise
        metrics.seconds.observe(time.perf_counter() - started)

    # -- sync -----------------------------------------------------------------------------------

    def publish(
        self,
        conn: Any,
        *,
        topic: str,
        type: str,
        payload: object,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        id: uuid.UUID | str | None = None,
        content_type: str | None = None,
    ) -> uuid.UUID:
        """Write one event in the caller's transaction; returns its id."""
        with self._measure():
            event = self.event(
                topic=topic,
                type=type,
                payload=payload,
                key=key,
                headers=headers,
                id=id,
                content_type=content_type,
            )
            self._run(conn, [event], many=False)
        return event.id

    def publish_many(
        self, conn: Any, events: Iterable[OutboxEvent | Mapping[str, Any]]
    ) -> list[uuid.UUID]:
        """Write several events in the given order, in one statement (one round trip) unless
        the batch exceeds 1000 events or 4 MiB of payload; returns their ids. All are validated
        before the first is written."""
        with self._measure():
            built = self._events(events)
            if built:
                self._run(conn, built, many=True)
        return [e.id for e in built]

    def _run(self, conn: Any, events: Sequence[OutboxEvent], *, many: bool) -> None:
        target = target_of(conn)
        if target.flavor.endswith("_async"):
            raise UnsupportedConnectionError(
                "conn: this is an async connection; use publish_async / publish_many_async"
            )
        statements = self._statements(target, events, many)
        h = target.handle
        if target.flavor == "sqlalchemy":
            from sqlalchemy import text

            for sql, params in statements:
                h.execute(text(sql), params)
        elif target.flavor == "psycopg":
            import psycopg

            with psycopg.Cursor(h) as cur:
                for sql, params in statements:
                    cur.execute(sql, params)
        elif target.flavor == "psycopg_cursor":
            for sql, params in statements:
                h.execute(sql, params)
        elif hasattr(h, "cursor") and not isinstance(h, sqlite3.Cursor):
            # DB-API connection: run on a cursor of our own
            cur = h.cursor()
            try:
                for sql, params in statements:
                    cur.execute(sql, params)
            finally:
                cur.close()
        else:  # DB-API cursor given by the caller
            for sql, params in statements:
                h.execute(sql, params)

    # -- async ----------------------------------------------------------------------------------

    async def publish_async(
        self,
        conn: Any,
        *,
        topic: str,
        type: str,
        payload: object,
        key: str | None = None,
        headers: Mapping[str, HeaderValue] | None = None,
        id: uuid.UUID | str | None = None,
        content_type: str | None = None,
    ) -> uuid.UUID:
        """Async twin of :meth:`publish` (psycopg AsyncConnection, SQLAlchemy async)."""
        with self._measure():
            event = self.event(
                topic=topic,
                type=type,
                payload=payload,
                key=key,
                headers=headers,
                id=id,
                content_type=content_type,
            )
            await self._run_async(conn, [event], many=False)
        return event.id

    async def publish_many_async(
        self, conn: Any, events: Iterable[OutboxEvent | Mapping[str, Any]]
    ) -> list[uuid.UUID]:
        """Async twin of :meth:`publish_many`."""
        with self._measure():
            built = self._events(events)
            if built:
                await self._run_async(conn, built, many=True)
        return [e.id for e in built]

    async def _run_async(self, conn: Any, events: Sequence[OutboxEvent], *, many: bool) -> None:
        target = target_of(conn)
        if not target.flavor.endswith("_async"):
            raise UnsupportedConnectionError(
                "conn: this is a sync connection; use publish / publish_many"
            )
        statements = self._statements(target, events, many)
        if target.flavor == "sqlalchemy_async":
            from sqlalchemy import text

            for sql, params in statements:
                await target.handle.execute(text(sql), params)
        elif target.flavor == "psycopg_async":
            import psycopg

            async with psycopg.AsyncCursor(target.handle) as cur:
                for sql, params in statements:
                    await cur.execute(sql, params)
        else:
            for sql, params in statements:
                await target.handle.execute(sql, params)


_default = Outbox()


def publish(
    conn: Any,
    *,
    topic: str,
    type: str,
    payload: object,
    key: str | None = None,
    headers: Mapping[str, HeaderValue] | None = None,
    id: uuid.UUID | str | None = None,
    content_type: str | None = None,
) -> uuid.UUID:
    """Write one event into table ``outbox`` in the caller's transaction; returns its id.

    Use :class:`Outbox` for another table, the table-less mode or other limits.
    """
    return _default.publish(
        conn,
        topic=topic,
        type=type,
        payload=payload,
        key=key,
        headers=headers,
        id=id,
        content_type=content_type,
    )


async def publish_async(
    conn: Any,
    *,
    topic: str,
    type: str,
    payload: object,
    key: str | None = None,
    headers: Mapping[str, HeaderValue] | None = None,
    id: uuid.UUID | str | None = None,
    content_type: str | None = None,
) -> uuid.UUID:
    """Async twin of :func:`publish`."""
    return await _default.publish_async(
        conn,
        topic=topic,
        type=type,
        payload=payload,
        key=key,
        headers=headers,
        id=id,
        content_type=content_type,
    )


def publish_many(conn: Any, events: Iterable[OutboxEvent | Mapping[str, Any]]) -> list[uuid.UUID]:
    """Write several events in one round trip (table ``outbox``); returns their ids."""
    return _default.publish_many(conn, events)


async def publish_many_async(
    conn: Any, events: Iterable[OutboxEvent | Mapping[str, Any]]
) -> list[uuid.UUID]:
    """Async twin of :func:`publish_many`."""
    return await _default.publish_many_async(conn, events)
