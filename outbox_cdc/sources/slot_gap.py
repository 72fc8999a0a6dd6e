"""A lost or dropped replication slot, recreated without losing the events of the gap.

When the WAL relay's slot is missing or invalidated while a delivered position is recorded (or
the outbox table holds rows), the transactions committed between the last delivered one and the
new slot's start exist only as outbox rows: no slot will ever stream them. This module finds
exactly those rows, hands them out in pages (``seq`` order) and records the progress, so the
relay (or ``outbox-cdc recover``) publishes them before anything the new slot streams.

Why nothing is lost (and how few duplicates there are):

* ``S``, ``outbox_cdc_offsets.delivered_snapshot``, is a ``txid_current_snapshot()`` taken when
  the WAL insert position was ``W`` and recorded only once the confirmed position had passed
  ``W`` (``wal.WalSource._save_offset``): every transaction visible in ``S`` committed before
  ``W``, so the relay delivered it.
* ``N`` is a snapshot taken right *after* the new slot reached its consistent point ``C``
  (``pg_create_logical_replication_slot`` returns then): every transaction that committed
  before ``C`` is visible in ``N``, and the slot streams every transaction that commits after
  ``C`` (PostgreSQL docs, "Logical Decoding Concepts: Exported Snapshots").
* The gap is the rows whose ``txid`` (the writing transaction's top-level id, the column's
  default ``txid_current()``) is visible in ``N`` and not in ``S``. Duplicates: the events
  delivered after ``S`` was taken (about one offset interval) and those committed between ``C``
  and ``N`` (milliseconds).
* Rows without ``txid`` (written before the column existed), or no ``S`` recorded: the rows
  created at or after the last delivered commit time minus a margin (``outbox-cdc recover``'s
  rule; a transaction open longer than the margin before committing could be missed).

The state lives in ``outbox_cdc_offsets.slot_gap`` (jsonb): ``creating`` is written *before* the
slot is created, so a crash in between is noticed on the next start; ``backfilling`` carries
``N``, ``C`` and the last acknowledged ``seq``; ``done`` stays for ``outbox-cdc status``. One
process at a time works on a gap (a session advisory lock); the others wait as standbys.

What it must not do: delete the recorded delivered position; let the new slot stream before the
gap is published (``WalSource.open`` refuses while the state is not ``done``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg

from outbox_cdc.errors import EventDecodeError, SourceError, SourceInUseError
from outbox_cdc.events import OutboxEvent

log = logging.getLogger(__name__)

OFFSETS_TABLE = "outbox_cdc_offsets"
PENDING = ("creating", "backfilling")
_COLS = 'seq, id::text, created_at, topic, "key", type, content_type, payload, headers::text'

Page = list[tuple[int, OutboxEvent | EventDecodeError]]


class SlotGapError(SourceError):
    """The slot is missing or lost over a gap and automatic recovery is off."""

    retriable = False


class GapPendingError(SourceError):
    """A gap is not published yet: the slot must not stream (retriable: the relay publishes it
    on its next attempt)."""


def lock_key(slot: str) -> str:
    return f"outbox_cdc.slot_gap.{slot}"


def read_marker(conn: psycopg.Connection[Any], slot: str) -> dict[str, Any] | None:
    """The slot's gap record, or None (also for an offsets table of an earlier version)."""
    try:
        row = conn.execute(
            f"SELECT slot_gap FROM {OFFSETS_TABLE} WHERE slot_name = %s", (slot,)
        ).fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
        return None
    return row[0] if row and row[0] else None


def pending(conn: psycopg.Connection[Any], slot: str) -> dict[str, Any] | None:
    marker = read_marker(conn, slot)
    return marker if marker is not None and marker.get("state") in PENDING else None


def gap_reason(
    conn: psycopg.Connection[Any], slot: str, table: str, slot_status: str
) -> str | None:
    """Why creating the (missing or lost) slot now would skip events, or None when it would
    not: nothing was ever delivered through a slot of this name and the table is empty."""
    if pending(conn, slot) is not None:
        return f"a recreation of slot {slot!r} over a gap is not finished"
    try:
        row = conn.execute(
            f"SELECT delivered_lsn::text FROM {OFFSETS_TABLE} WHERE slot_name = %s", (slot,)
        ).fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    what = "was dropped" if slot_status == "missing" else "was invalidated"
    if row is not None:
        return f"replication slot {slot!r} {what} after events were delivered up to {row[0]}"
    if _table_exists(conn, table):
        has_rows = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()
        if has_rows and has_rows[0]:
            return (
                f"replication slot {slot!r} is {slot_status}, no delivered position is "
                f"recorded, and {table} holds rows that may never have been published"
            )
    return None


def _table_exists(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


def _has_txid(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s)"
        " AND attname = 'txid' AND NOT attisdropped)",
        (table,),
    ).fetchone()
    return bool(row and row[0])


def _write_marker(conn: psycopg.Connection[Any], slot: str, marker: dict[str, Any]) -> None:
    conn.execute(
        f"INSERT INTO {OFFSETS_TABLE} (slot_name, delivered_lsn, slot_gap, updated_at)"
        " VALUES (%s, '0/0', %s::jsonb, now()) ON CONFLICT (slot_name) DO UPDATE"
        " SET slot_gap = EXCLUDED.slot_gap, updated_at = now()",
        (slot, json.dumps(marker)),
    )


def _slot_row(conn: psycopg.Connection[Any], slot: str) -> tuple[str, str | None] | None:
    row = conn.execute(
        "SELECT wal_status, confirmed_flush_lsn::text FROM pg_replication_slots"
        " WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None else (str(row[0]), row[1])


def open_gap(
    connect: Callable[[], psycopg.Connection[Any]],
    slot: str,
    table: str,
    *,
    allow: bool,
    margin: float = 600.0,
    page_size: int = 1000,
    refusal: Callable[[str], str] | None = None,
) -> Backfill | None:
    """Detect a gap and, when ``allow``, recreate the slot over it; returns the pages to
    publish, or None when there is no gap (a healthy slot, or a first start). Raises
    ``SlotGapError`` over a gap when not ``allow`` (its message from ``refusal(reason)``), and
    ``SourceInUseError`` while another process works on the gap."""
    conn = connect()
    keep = False
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (lock_key(slot),))
        row = got.fetchone()
        if not (row and row[0]):
            raise SourceInUseError(
                f"another process is re-publishing the gap of replication slot {slot!r}"
            )
        marker = pending(conn, slot)
        slot_row = _slot_row(conn, slot)
        status = "missing" if slot_row is None else slot_row[0]
        if marker is None:
            if status not in ("missing", "lost"):
                return None
            reason = gap_reason(conn, slot, table, status)
            if reason is None:
                return None
            if not allow:
                raise SlotGapError((refusal or _default_refusal)(reason))
            marker = _new_marker(conn, slot, status, reason)
            _write_marker(conn, slot, marker)
            log.warning(
                "%s: recreating it and re-publishing, from %s, the events committed after "
                "the last delivered one before streaming anything newer",
                reason,
                table,
            )
        if marker["state"] == "creating":
            if slot_row is not None and slot_row[0] == "lost":
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                slot_row = None
            if slot_row is None:
                created = conn.execute(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'wal2json')",
                    (slot,),
                ).fetchone()
                to_lsn = str(created[0]) if created else "0/0"
            else:  # created before a crash, never streamed: its consistent point stands
                to_lsn = slot_row[1] or "0/0"
            # A new statement, so a new snapshot, taken after the slot's consistent point.
            snap = conn.execute("SELECT txid_current_snapshot()::text").fetchone()
            marker.update(
                state="backfilling",
                to_lsn=to_lsn,
                to_snapshot=snap[0] if snap else None,
                after_seq=0,
                rows=0,
                txid=_has_txid(conn, table) if _table_exists(conn, table) else False,
            )
            _write_marker(conn, slot, marker)
        keep = True
        return Backfill(conn, slot, table, marker, margin, page_size)
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()
        raise SourceError(
            f"PostgreSQL: recreating slot {slot!r} over a gap: "
            f"{type(exc).__name__}: {text[0] if text else ''}"
        ) from None
    finally:
        if not keep:
            conn.close()


def _default_refusal(reason: str) -> str:
    return (
        f"{reason}; automatic recovery is off (recover_lost_slot): stop the relay and run "
        "'outbox-cdc recover'"
    )


def _new_marker(
    conn: psycopg.Connection[Any], slot: str, status: str, reason: str
) -> dict[str, Any]:
    try:
        row = conn.execute(
            f"SELECT delivered_lsn::text, delivered_commit_time, delivered_snapshot"
            f" FROM {OFFSETS_TABLE} WHERE slot_name = %s",
            (slot,),
        ).fetchone()
    except psycopg.errors.UndefinedColumn as exc:
        raise SourceError(
            f"{OFFSETS_TABLE} is of an earlier version: run 'outbox-cdc init' (it adds the "
            "columns) and start again"
        ) from exc
    from_time: datetime | None = row[1] if row else None
    return {
        "state": "creating",
        "reason": reason,
        "slot_status": status,
        "from_lsn": row[0] if row else None,
        "from_time": from_time.isoformat() if from_time else None,
        "from_snapshot": row[2] if row else None,
        "detected_at": time.time(),
    }


class Backfill:
    """The rows of one gap, page by page, on a connection that holds the gap's lock.

    Use: ``next_page()`` until it returns an empty page, ``acknowledged(page)`` after Kafka
    acknowledged every event of a page (only then is the progress recorded: a restart resends
    at most one page), ``finish()`` at the end, ``close()`` always."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        slot: str,
        table: str,
        marker: dict[str, Any],
        margin: float,
        page_size: int,
    ) -> None:
        self.conn = conn
        self.slot = slot
        self.table = table
        self.marker = marker
        self.page_size = page_size
        self.after = int(marker.get("after_seq") or 0)
        self.rows = int(marker.get("rows") or 0)
        from_time = marker.get("from_time")
        self.since: datetime | None = (
            datetime.fromisoformat(from_time) - timedelta(seconds=margin) if from_time else None
        )
        if not _table_exists(conn, table):
            self._query = ""
        else:
            since = "(%(since)s::timestamptz IS NULL OR created_at >= %(since)s)"
            if marker.get("txid"):
                in_n = "txid_visible_in_snapshot(txid, %(n)s::txid_snapshot)"
                pred = (
                    f"CASE WHEN txid IS NULL THEN {since}"
                    f" WHEN %(s)s::text IS NULL THEN {in_n} AND {since}"
                    f" ELSE {in_n} AND NOT txid_visible_in_snapshot(txid, %(s)s::txid_snapshot)"
                    " END"
                )
            else:
                pred = since
            self._query = (
                f"SELECT {_COLS} FROM {table} WHERE seq > %(after)s AND ({pred})"
                " ORDER BY seq LIMIT %(limit)s"
            )

    def describe(self) -> str:
        m = self.marker
        return (
            f"replication slot {self.slot!r} recreated at {m.get('to_lsn')} over a gap "
            f"({m.get('reason')}); re-publishing from {self.table} the events committed after "
            f"{m.get('from_lsn') or 'the oldest row'} before streaming anything newer"
            + (f" (resuming after seq {self.after}, {self.rows} done)" if self.after else "")
        )

    def next_page(self) -> Page:
        from outbox_cdc.sources.polling import row_to_event

        if not self._query:
            return []
        m = self.marker
        rows = self.conn.execute(
            self._query,
            {
                "after": self.after,
                "limit": self.page_size,
                "since": self.since,
                "n": m.get("to_snapshot"),
                "s": m.get("from_snapshot"),
            },
        ).fetchall()
        return [(int(r[0]), row_to_event(r, self.table)) for r in rows]

    def acknowledged(self, page: Page) -> None:
        if not page:
            return
        self.after = page[-1][0]
        self.rows += len(page)
        self.marker.update(after_seq=self.after, rows=self.rows)
        self.conn.execute(
            f"UPDATE {OFFSETS_TABLE} SET slot_gap = slot_gap || %s::jsonb, updated_at = now()"
            " WHERE slot_name = %s",
            (json.dumps({"after_seq": self.after, "rows": self.rows}), self.slot),
        )

    def finish(self) -> None:
        """Every gap row is acknowledged: the new slot's consistent point and ``N`` become the
        delivered position and snapshot; the slot may stream."""
        m = self.marker
        m.update(state="done", done_at=time.time())
        self.conn.execute(
            f"UPDATE {OFFSETS_TABLE} SET delivered_lsn = GREATEST(delivered_lsn, %s::pg_lsn),"
            " delivered_snapshot = %s, slot_gap = %s::jsonb, updated_at = now()"
            " WHERE slot_name = %s",
            (m.get("to_lsn") or "0/0", m.get("to_snapshot"), json.dumps(m), self.slot),
        )
        log.warning(
            "the gap of replication slot %s is published: %d events re-published; streaming "
            "from %s",
            self.slot,
            self.rows,
            m.get("to_lsn"),
        )

    def close(self) -> None:
        try:
            self.conn.close()  # releases the advisory lock
        except Exception:
            log.debug("closing the gap connection failed", exc_info=True)
