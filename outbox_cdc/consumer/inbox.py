"""The inbox: idempotent processing in the consumer's own database.

The handler claims the event in its transaction before its own writes::

    with conn.transaction():
        if inbox.claim(conn, event):      # INSERT (consumer, event id) if absent
            conn.execute("INSERT INTO invoices ...")

The claim and the writes commit together or not at all, so an event delivered again (a
duplicate from the relay, or a redelivery after a crash between the database commit and the
offset commit) finds its id and is skipped. Concurrent claims of one id (two group members during
a rebalance) are serialized by the primary key: the second waits for the first transaction and
then sees the id (PostgreSQL ``ON CONFLICT DO NOTHING``, MariaDB ``INSERT IGNORE``, SQLite
``INSERT OR IGNORE``).

Like the insert API it runs on the caller's connection and never begins, commits or rolls back.
Connections: psycopg 3 (sync/async), SQLAlchemy 2 (sync/async), sqlite3, PyMySQL. The DDL is
package data (``outbox_cdc/sql/inbox-<dialect>.sql``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from importlib import resources
from typing import Any

from outbox_cdc.connections import Target, target_of
from outbox_cdc.consumer.events import ConsumedEvent
from outbox_cdc.consumer.observer import ConsumerObserver, NullObserver
from outbox_cdc.errors import ConfigurationError, EventValidationError, UnsupportedConnectionError
from outbox_cdc.schema import DIALECTS, statements, validate_table

DEFAULT_TABLE = "outbox_cdc_inbox"
MAX_ID_LENGTH = 255  # the MariaDB columns are VARCHAR(255); the same limit everywhere


def inbox_ddl(dialect: str, table: str = DEFAULT_TABLE) -> str:
    """The inbox DDL script for ``dialect`` (postgresql, mysql, sqlite), table name filled in."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    validate_table(table)
    text = resources.files("outbox_cdc").joinpath("sql", f"inbox-{dialect}.sql").read_text("utf-8")
    return text.replace("{table_name}", table.rsplit(".", 1)[-1]).replace("{table}", table)


def _params(style: str, values: list[Any]) -> tuple[list[str], Any]:
    if style == "named":
        return [f":p{i}" for i in range(len(values))], {f"p{i}": v for i, v in enumerate(values)}
    mark = "?" if style == "qmark" else "%s"
    return [mark] * len(values), values


@lru_cache(maxsize=64)
def _claim_sql(dialect: str, table: str, marks: tuple[str, ...]) -> str:
    values = ", ".join(marks)
    columns = "(consumer, event_id, processed_at)"
    if dialect == "postgresql":
        return f"INSERT INTO {table} {columns} VALUES ({values}) ON CONFLICT DO NOTHING"
    if dialect == "mysql":
        return f"INSERT IGNORE INTO {table} {columns} VALUES ({values})"
    return f"INSERT OR IGNORE INTO {table} {columns} VALUES ({values})"


def _time_param(dialect: str, ts: datetime) -> Any:
    utc = ts.astimezone(UTC)
    if dialect == "mysql":
        return utc.replace(tzinfo=None)  # DATETIME(6) in UTC
    if dialect == "sqlite":
        return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return utc


def _run(cursor: Any, sql: str, params: Any) -> Any:
    return cursor.execute(sql) if params is None else cursor.execute(sql, params)


def _execute(target: Target, sql: str, params: Any) -> int:
    """Run one statement on the caller's connection; its rowcount."""
    h = target.handle
    if target.flavor == "sqlalchemy":
        from sqlalchemy import text

        return int(h.execute(text(sql), params).rowcount)
    if target.flavor == "psycopg":
        import psycopg

        with psycopg.Cursor(h) as cur:
            _run(cur, sql, params)
            return int(cur.rowcount)
    if target.flavor == "psycopg_cursor" or isinstance(h, sqlite3.Cursor):
        _run(h, sql, params)
        return int(h.rowcount)
    if hasattr(h, "cursor"):  # DB-API connection: a cursor of our own
        cur = h.cursor()
        try:
            _run(cur, sql, params)
            return int(cur.rowcount)
        finally:
            cur.close()
    _run(h, sql, params)  # DB-API cursor (PyMySQL)
    return int(h.rowcount)


async def _execute_async(target: Target, sql: str, params: Any) -> int:
    h = target.handle
    if target.flavor == "sqlalchemy_async":
        from sqlalchemy import text

        result = await h.execute(text(sql), params)
        return int(result.rowcount)
    if target.flavor == "psycopg_async":
        import psycopg

        async with psycopg.AsyncCursor(h) as cur:
            await _run(cur, sql, params)
            return int(cur.rowcount)
    await _run(h, sql, params)  # psycopg AsyncCursor
    return int(h.rowcount)


def _sync_target(conn: Any) -> Target:
    target = target_of(conn)
    if target.flavor.endswith("_async"):
        raise UnsupportedConnectionError(
            "conn: this is an async connection; use the *_async method"
        )
    return target


def _async_target(conn: Any) -> Target:
    target = target_of(conn)
    if not target.flavor.endswith("_async"):
        raise UnsupportedConnectionError("conn: this is a sync connection; use the sync method")
    return target


class Inbox:
    """Processed event ids of one consumer (usually its consumer group) in ``table``.

    ``observer`` counts the duplicates skipped (:meth:`ConsumerObserver.duplicate`); ``clock``
    gives the ``processed_at`` time (UTC).
    """

    def __init__(
        self,
        consumer: str,
        *,
        table: str = DEFAULT_TABLE,
        observer: ConsumerObserver | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not isinstance(consumer, str) or not consumer or len(consumer) > MAX_ID_LENGTH:
            raise ConfigurationError(
                f"inbox consumer: a non-empty name of at most {MAX_ID_LENGTH} characters"
            )
        self.consumer = consumer
        self.table = validate_table(table)
        self.observer: ConsumerObserver = observer if observer is not None else NullObserver()
        self.clock = clock

    # -- DDL ------------------------------------------------------------------------------------

    def ddl(self, dialect: str) -> str:
        return inbox_ddl(dialect, self.table)

    def create_table(self, conn: Any) -> None:
        """Run the DDL on ``conn`` (idempotent). It does not commit; note that MariaDB commits
        DDL implicitly."""
        target = _sync_target(conn)
        for stmt in statements(self.ddl(target.dialect)):
            _execute(target, stmt, {} if target.style == "named" else None)

    async def create_table_async(self, conn: Any) -> None:
        target = _async_target(conn)
        for stmt in statements(self.ddl(target.dialect)):
            await _execute_async(target, stmt, {} if target.style == "named" else None)

    # -- claim ----------------------------------------------------------------------------------

    def _claim_statement(self, target: Target, event: ConsumedEvent | str) -> tuple[str, Any]:
        event_id = event.id if isinstance(event, ConsumedEvent) else event
        if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_ID_LENGTH:
            raise EventValidationError(
                "event_id", f"must be a non-empty str of at most {MAX_ID_LENGTH} characters"
            )
        marks, params = _params(
            target.style,
            [self.consumer, event_id, _time_param(target.dialect, self.clock())],
        )
        return _claim_sql(target.dialect, self.table, tuple(marks)), params

    def _claimed(self, event: ConsumedEvent | str, rowcount: int) -> bool:
        if rowcount > 0:
            return True
        self.observer.duplicate(event.topic if isinstance(event, ConsumedEvent) else "")
        return False

    def claim(self, conn: Any, event: ConsumedEvent | str) -> bool:
        """Record the event (or event id) as processed in the caller's transaction. True: first
        time, go on with the handler's writes; False: already processed, skip it."""
        target = _sync_target(conn)
        sql, params = self._claim_statement(target, event)
        return self._claimed(event, _execute(target, sql, params))

    async def claim_async(self, conn: Any, event: ConsumedEvent | str) -> bool:
        target = _async_target(conn)
        sql, params = self._claim_statement(target, event)
        return self._claimed(event, await _execute_async(target, sql, params))

    # -- retention ------------------------------------------------------------------------------

    def _purge_statement(self, target: Target, older_than: timedelta) -> tuple[str, Any]:
        if older_than <= timedelta(0):
            raise ConfigurationError("inbox retention: older_than must be positive")
        cutoff = _time_param(target.dialect, self.clock() - older_than)
        marks, params = _params(target.style, [self.consumer, cutoff])
        sql = f"DELETE FROM {self.table} WHERE consumer = {marks[0]} AND processed_at < {marks[1]}"
        return sql, params

    def purge(self, conn: Any, *, older_than: timedelta) -> int:
        """Delete this consumer's ids processed more than ``older_than`` ago; the count. Keep
        ``older_than`` well above the longest redelivery you can have (topic retention, or the
        age of the oldest uncommitted offset): an id purged and then delivered again is
        processed again. The caller commits."""
        target = _sync_target(conn)
        sql, params = self._purge_statement(target, older_than)
        return _execute(target, sql, params)

    async def purge_async(self, conn: Any, *, older_than: timedelta) -> int:
        target = _async_target(conn)
        sql, params = self._purge_statement(target, older_than)
        return await _execute_async(target, sql, params)
