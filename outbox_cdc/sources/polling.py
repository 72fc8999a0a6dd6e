"""Polling source: reads pending outbox rows (``published_at IS NULL``) in seq order, for
databases without logical decoding (MySQL/MariaDB, SQLite, PostgreSQL without wal2json).

One batch is in flight at a time: a batch is read, handed to the relay as one transaction
(``BEGIN``, events, ``Commit(batch number)``), and its rows are marked published (or deleted)
only once the relay confirms the batch, that is, once Kafka acknowledged every event of it.
The next poll happens after that, so it can never see a row that is still in flight, and every
poll sees every committed pending row: a row whose transaction took a lower seq and committed
late is found by the next poll, never skipped (docs/polling.md gives the reasoning per
database).

What it must not do: mark or delete a row before the relay confirmed its batch; read rows past a
seq that is still in flight; hold the poller lock on a connection other than the one it marks
rows with.
"""

from __future__ import annotations

import logging
import select
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from outbox_cdc.errors import (
    ConfigurationError,
    EventDecodeError,
    EventValidationError,
    OutboxError,
    SourceError,
    SourceInUseError,
)
from outbox_cdc.events import (
    OutboxEvent,
    check_decoded,
    headers_from_json,
    parse_time,
    validate_topic,
)
from outbox_cdc.schema import validate_table
from outbox_cdc.sources.base import BEGIN, CleanupObserver, Commit, Item
from outbox_cdc.sources.polling_databases import (
    PollingDatabase,
    Row,
    open_database,
    sqlite_path,
)

log = logging.getLogger(__name__)

DEFAULT_RETENTION = 7 * 24 * 3600.0


@dataclass(frozen=True)
class PollingSourceOptions:
    url: str
    table: str = "outbox"
    poll_interval: float = 0.1
    batch_size: int = 1000
    batch_max_bytes: int = 16 * 1024 * 1024
    retention: float = DEFAULT_RETENTION  # seconds a published row is kept; 0: delete it
    notify: bool = False  # PostgreSQL: wake up on the NOTIFY of init --polling --notify
    cleanup_interval: float = 10.0
    cleanup_window: int = 1000
    cleanup_budget: float = 0.5  # seconds of clean-up per round, so polling is never held up
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        validate_table(self.table)
        if self.batch_size < 1:
            raise ConfigurationError("poll_batch_size: must be at least 1")
        if self.poll_interval <= 0:
            raise ConfigurationError("poll_interval: must be more than 0 seconds")
        if self.retention < 0:
            raise ConfigurationError("retention: must be 0 (delete once published) or more")

    def __repr__(self) -> str:  # the URL may hold a password
        return f"PollingSourceOptions(table={self.table!r}, batch_size={self.batch_size})"


def row_to_event(row: Row, table: str) -> OutboxEvent | EventDecodeError:
    """An outbox row (as :meth:`PollingDatabase.fetch` returns it) as an event, or the reason
    it cannot be published (rows written by other tools may hold anything)."""
    seq, id_, created_at, topic, key, type_, content_type, payload, headers = row
    try:
        event_id = id_ if isinstance(id_, uuid.UUID) else uuid.UUID(str(id_))
        if isinstance(created_at, datetime):
            created = created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
        elif isinstance(created_at, str):
            created = parse_time(created_at)
        else:
            raise ValueError(f"created_at is {type(created_at).__name__}, not a timestamp")
        if isinstance(payload, bytes | bytearray | memoryview):
            value = bytes(payload)
        elif isinstance(payload, str):  # a TEXT value in SQLite's BLOB column
            value = payload.encode("utf-8")
        else:
            raise ValueError("payload is NULL" if payload is None else "payload is not bytes")
        if headers is None or headers == "":
            user_headers: tuple[tuple[str, bytes], ...] = ()
        elif isinstance(headers, str):
            user_headers = headers_from_json(headers)
        else:
            raise ValueError(f"headers is {type(headers).__name__}, not JSON text")
        if key is not None and not isinstance(key, str):
            key = bytes(key).decode("utf-8") if isinstance(key, bytes | bytearray) else str(key)
        if not isinstance(type_, str) or not type_:
            raise ValueError("type is empty or NULL")
        return check_decoded(
            OutboxEvent(
                id=event_id,
                created_at=created,
                topic=validate_topic(topic),
                type=type_,
                payload=value,
                content_type=content_type or "application/octet-stream",
                key=key,
                headers=user_headers,
            )
        )
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, EventValidationError) as exc:
        return EventDecodeError(
            f"outbox row of {table} cannot be published: {exc}",
            event_id=str(id_) if id_ is not None else None,
            seq=int(seq),
        )


def _payload_size(item: OutboxEvent | EventDecodeError) -> int:
    return len(item.payload) if isinstance(item, OutboxEvent) else 64


class PollingSource:
    """See :class:`outbox_cdc.sources.base.Source` for the contract. Positions are batch
    numbers of this process; the durable record of delivery is the rows' ``published_at`` (or
    their absence)."""

    def __init__(
        self,
        options: PollingSourceOptions,
        database: PollingDatabase | None = None,
        cleanup_observer: CleanupObserver | None = None,
    ):
        self.options = options
        self.cleanup_observer = cleanup_observer
        self.db = database or open_database(
            options.url, options.table, options.connect_timeout, options.notify
        )
        self.name = self.db.name
        self._open = False
        self._position = 0  # number of the last batch handed to the relay
        self._in_flight: tuple[int, list[int]] | None = None  # (batch number, its seqs)
        self._acked: list[int] = []  # delivered, not yet marked: kept across reconnects
        self._next_poll = 0.0
        self._next_cleanup = 0.0
        self._limit = options.batch_size  # lowered while payloads are large (batch_max_bytes)
        self.marked = 0  # rows marked or deleted by this process (for tests and metrics)
        self._claimed = False  # check_available() took the lock for the next open()

    def describe(self, position: int) -> str:
        return f"batch {position} of {self.options.table}"

    # -- connection -----------------------------------------------------------------------------

    # -- exactly-once mode ----------------------------------------------------------------------

    def check_available(self) -> None:
        """Take the poller lock now (kept for :meth:`open`), or raise SourceInUseError: the
        relay fences older Kafka producers only once it holds the table."""
        self._claim()
        self._claimed = True

    def progress_key(self) -> str:
        """Names this table in the progress topic (database location, never credentials)."""
        parts = urlsplit(self.options.url)
        where = (
            sqlite_path(self.options.url)
            if parts.scheme.startswith("sqlite")
            else f"{parts.hostname or 'local'}:{parts.port or ''}{parts.path}"
        )
        return f"polling/{self.db.name}/{where}/{self.options.table}"

    def progress_state(self, position: int) -> dict[str, Any] | None:
        """The seqs of the batch ending at ``position`` (the one in flight)."""
        in_flight = self._in_flight
        if in_flight is None or in_flight[0] != position:
            return None
        return {"seqs": list(in_flight[1])}

    def restore(self, state: dict[str, Any]) -> None:
        """The rows of the last batch Kafka committed: marked before the first poll, so a crash
        between the Kafka commit and the UPDATE does not publish them again."""
        seqs = state.get("seqs")
        if isinstance(seqs, list):
            self._acked.extend(int(s) for s in seqs if isinstance(s, int))

    # -- connection -----------------------------------------------------------------------------

    def _claim(self) -> None:
        self.close()
        try:
            self.db.connect()
            if not self.db.try_lock():
                raise SourceInUseError(
                    f"table {self.options.table} is polled by {self.db.lock_holder()}: its "
                    "poller lock is active"
                )
        except OutboxError:
            self.close()
            raise

    def open(self, resume_from: int) -> int:
        try:
            if not self._claimed:
                self._claim()
            self._claimed = False
            for warning in self.db.check_table():
                log.warning("%s", warning)
            # rows Kafka acknowledged before the connection was lost: mark them first
            self._flush_acked()
        except OutboxError:
            self.close()
            raise
        self._open = True
        self._in_flight = None  # the relay dropped what was in flight; those rows are re-read
        self._position = max(self._position, resume_from)
        self._next_poll = 0.0
        kept = (
            "deleted once published"
            if self.options.retention == 0
            else f"kept {self.options.retention:g}s after publication"
        )
        log.info(
            "polling %s on %s every %gs%s, batches of up to %d rows; rows are %s",
            self.options.table,
            self.name,
            self.options.poll_interval,
            " and on NOTIFY" if self.options.notify else "",
            self.options.batch_size,
            kept,
        )
        return self._position

    def close(self) -> None:
        self._open = False
        self._claimed = False
        self._in_flight = None
        self.db.close()

    # -- reading --------------------------------------------------------------------------------

    def read(self, timeout: float, wake_fd: int, max_items: int) -> list[Item]:
        if not self._open:
            raise SourceError(f"{self.name}: the outbox is not open")
        if self._in_flight is not None:
            # one batch at a time: wait for its acknowledgments (they wake us up)
            _wait(wake_fd, timeout)
            return []
        self._flush_acked()
        now = time.monotonic()
        if self.options.retention > 0 and now >= self._next_cleanup:
            self._cleanup()
            now = time.monotonic()
        if now < self._next_poll:
            db_fd = self.db.wake_fd()
            fds = (wake_fd,) if db_fd is None else (wake_fd, db_fd)
            ready = _wait_any(fds, min(timeout, self._next_poll - now))
            if db_fd in ready and self.db.drain_wake():
                self._next_poll = 0.0  # a new row was announced: poll now
            now = time.monotonic()
            if now < self._next_poll:
                return []
        limit = max(1, min(self._limit, max_items - 2))
        rows = self.db.fetch(limit)
        if not rows:
            self._next_poll = now + self.options.poll_interval
            self._limit = self.options.batch_size
            return []
        events: list[Item] = []
        seqs: list[int] = []
        nbytes = 0
        for row in rows:
            item = row_to_event(row, self.options.table)
            events.append(item)
            seqs.append(int(row[0]))
            nbytes += _payload_size(item)
            if nbytes >= self.options.batch_max_bytes:
                break
        truncated = len(seqs) < len(rows)
        # Large payloads: read fewer rows next time instead of fetching and dropping them.
        self._limit = len(seqs) if truncated else self.options.batch_size
        full = truncated or len(rows) == limit
        self._next_poll = now if full else now + self.options.poll_interval
        self._position += 1
        self._in_flight = (self._position, seqs)
        return [BEGIN, *events, Commit(self._position)]

    def idle_position(self) -> int | None:
        return None  # nothing to confirm between batches

    # -- confirming -----------------------------------------------------------------------------

    def confirm(self, confirmed: int, delivered: int) -> None:
        in_flight = self._in_flight
        if in_flight is not None and confirmed >= in_flight[0]:
            self._acked.extend(in_flight[1])
            self._in_flight = None
            if self._open:
                self._flush_acked()

    def _flush_acked(self) -> None:
        """Mark (or delete) the rows Kafka acknowledged; on failure keep them for next time."""
        if not self._acked:
            return
        if self.options.retention == 0:
            self.db.delete(self._acked)
        else:
            self.db.mark(self._acked)
        self.marked += len(self._acked)
        self._acked = []

    def tick(self) -> None:
        pass  # a plain SQL connection needs no keepalive messages

    # -- clean-up -------------------------------------------------------------------------------

    def _cleanup(self) -> None:
        """Delete rows published more than ``retention`` seconds ago, a window of the lowest
        seqs at a time, each its own short transaction, for at most ``cleanup_budget``."""
        opts = self.options
        self._next_cleanup = time.monotonic() + opts.cleanup_interval
        started = time.monotonic()
        deadline = started + opts.cleanup_budget
        total = 0
        failed = False
        try:
            while time.monotonic() < deadline:
                deleted = self.db.cleanup(opts.retention, opts.cleanup_window)
                total += deleted
                if deleted == 0:
                    break
        except SourceError as exc:
            # clean-up is not delivery: never let it stop publishing
            failed = True
            log.warning("clean-up of published rows failed (retrying later): %s", exc)
        if self.cleanup_observer is not None:
            self.cleanup_observer.cleanup(time.monotonic() - started, total, failed)
        if total:
            log.debug("clean-up deleted %d published rows of %s", total, opts.table)

    @property
    def in_flight_seqs(self) -> list[int]:
        return list(self._in_flight[1]) if self._in_flight else []


def _wait(fd: int, timeout: float) -> None:
    if timeout > 0:
        select.select([fd], [], [], timeout)


def _wait_any(fds: tuple[int, ...], timeout: float) -> list[int]:
    return select.select(fds, [], [], max(0.0, timeout))[0]
