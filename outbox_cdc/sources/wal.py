"""WAL source: streams wal2json v2 from a logical replication slot over psycopg 3.3's COPY_BOTH.

Two connections: a ``replication=database`` one that only streams (START_REPLICATION), and a
normal one for the catalog (slot state, slot creation) and the durable offset record.

What it must not do: confirm (Standby status update ``flushed``) a position the relay did not
hand to :meth:`WalSource.confirm`; start after a position nobody recorded as delivered; create a
slot over a gap (a missing or lost slot while events were delivered: see :mod:`slot_gap`, the only
place that drops a slot, and only an invalidated one).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import select
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerr

from outbox_cdc.errors import (
    ConfigurationError,
    SlotInUseError,
    SlotInvalidatedError,
    SourceError,
)
from outbox_cdc.protocol import wal2json
from outbox_cdc.protocol.lsn import format_lsn, parse_lsn
from outbox_cdc.protocol.replication import (
    KEEPALIVE_TAG,
    XLOGDATA_HEADER_SIZE,
    XLOGDATA_TAG,
    parse_keepalive,
    parse_xlogdata_header,
    status_update,
)
from outbox_cdc.sources import slot_gap
from outbox_cdc.sources.base import Begin, CleanupObserver, Commit, Item
from outbox_cdc.sources.keepalive import tcp_timeouts

log = logging.getLogger(__name__)

_SLOT_RE = re.compile(r"[a-z0-9_]{1,63}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_$]*"
_TABLE_RE = re.compile(rf"(?:{_IDENT}\.)?{_IDENT}")

OFFSETS_TABLE = "outbox_cdc_offsets"


@dataclass(frozen=True)
class WalSourceOptions:
    dsn: str
    slot: str = "outbox_cdc"
    table: str = "public.outbox"
    message_prefix: str | None = None
    create_slot: bool = True
    status_interval: float = 10.0
    confirm_interval: float = 0.1
    offset_interval: float = 1.0
    connect_timeout: float = 10.0
    # Like PostgreSQL's own wal_receiver_timeout: after half of it without a message from the
    # server, ask for a reply; after the other half, the connection is taken for dead. 0: never.
    replication_timeout: float = 60.0
    application_name: str = "outbox-cdc"
    heartbeat_interval: float = 0.0  # 0: no heartbeat messages
    retention: float | None = None  # None: never delete rows; 0: once delivered
    cleanup_interval: float = 10.0
    cleanup_window: int = 1000
    cleanup_budget: float = 0.2
    # a missing or lost slot over a gap: recreate it and re-publish the gap from the table
    # (sources/slot_gap.py); False: stop with an error that says to run 'outbox-cdc recover'
    recover_lost_slot: bool = True
    gap_margin: float = 600.0  # created_at margin for rows without txid (see slot_gap)

    def __post_init__(self) -> None:
        if not _SLOT_RE.fullmatch(self.slot):
            raise ConfigurationError(
                f"slot: {self.slot!r} is not a valid slot name; use 1-63 characters of a-z, 0-9, _"
            )
        if not _TABLE_RE.fullmatch(self.table):
            raise ConfigurationError(
                f"table: {self.table!r} must be 'schema.table' or 'table' of plain identifiers"
            )

    @property
    def qualified_table(self) -> str:
        return self.table if "." in self.table else f"public.{self.table}"

    @property
    def heartbeat_prefix(self) -> str:
        # never equal to the message prefix: wal2json's add-msg-prefixes drops it, only the
        # transaction's B/C (with its commit time) reaches the relay
        return f"{self.message_prefix or 'outbox-cdc'}.heartbeat"


def _describe(exc: BaseException) -> str:
    """One line about a driver error, without the connection string."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


class WalSource:
    """See :class:`outbox_cdc.sources.base.Source` for the contract."""

    name = "PostgreSQL"

    def __init__(self, options: WalSourceOptions, cleanup_observer: CleanupObserver | None = None):
        self.options = options
        self.cleanup_observer = cleanup_observer
        self._next_heartbeat = 0.0
        self._next_cleanup = 0.0
        self._cleanup_failing = False
        self._heartbeat_failing = False
        self._commit_times: collections.deque[tuple[int, float]] = collections.deque()
        self.confirmed_commit_time: float | None = None  # of the last confirmed transaction
        self._decoder = wal2json.Wal2JsonDecoder(options.message_prefix)
        self._repl: psycopg.Connection[Any] | None = None
        self._ctl: psycopg.Connection[Any] | None = None
        self._pgconn: Any = None
        self._sock = -1
        self._received = 0  # highest walEnd seen: reported as "written"
        self._flushed = 0  # what we confirm: reported as "flushed" and "applied"
        self._delivered = 0
        self._saved_offset = 0
        self._sent_flushed = -1
        self._last_status = 0.0
        self._last_offset_save = 0.0
        self._reply_requested = False
        self._last_heard = 0.0  # monotonic time of the last message from the server
        self._ping_at: float | None = None  # a reply was asked for then, none came yet
        self._idle_pos: int | None = None
        self._txn_time: float | None = None  # commit time of the transaction being read
        self.started_at_lsn = 0
        # (txid snapshot, WAL insert LSN) taken at an offset record: it becomes the delivered
        # snapshot once the confirmed position passed that LSN (see slot_gap)
        self._snapshot_candidate: tuple[str, int] | None = None

    @staticmethod
    def describe(position: int) -> str:
        return format_lsn(position)

    # -- exactly-once mode ----------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise SlotInUseError while another relay streams the slot (before fencing it)."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                (self.options.slot,),
            ).fetchone()
        if row is not None and row[0] is not None:
            raise SlotInUseError(self.options.slot, int(row[0]))

    def progress_key(self) -> str:
        """Names this source in the progress topic: system identifier, database, slot."""
        try:
            with self._connect() as conn:
                row = conn.execute(
                    "SELECT system_identifier::text, current_database() FROM pg_control_system()"
                ).fetchone()
        except psycopg.Error as exc:
            raise SourceError(f"PostgreSQL: {_describe(exc)}") from None
        assert row is not None
        return f"postgresql/{row[0]}/{row[1]}/{self.options.slot}"

    # -- connection -----------------------------------------------------------------------------

    def _connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self.options.dsn,
                autocommit=True,
                connect_timeout=max(1, int(self.options.connect_timeout)),
                application_name=self.options.application_name,
                **tcp_timeouts(self.options.dsn),
                **kwargs,
            )
        except psycopg.OperationalError as exc:
            raise SourceError(f"cannot connect to PostgreSQL: {_describe(exc)}") from None

    def slot_state(self) -> dict[str, Any] | None:
        assert self._ctl is not None
        row = self._ctl.execute(
            "SELECT plugin, slot_type, database, active_pid, wal_status,"
            " confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.options.slot,),
        ).fetchone()
        if row is None:
            return None
        keys = ("plugin", "slot_type", "database", "active_pid", "wal_status", "confirmed_flush")
        return dict(zip(keys, row, strict=True))

    # -- a missing or lost slot over a gap --------------------------------------------------

    def backfill(self) -> slot_gap.Backfill | None:
        """Called by the relay before :meth:`open`: when the slot is missing or lost over a gap
        (or a recreation is unfinished), recreate it and return the gap's rows to publish first.
        None when there is nothing to do. Raises ``SlotGapError`` over a gap when automatic
        recovery is off, ``SourceInUseError`` while another relay works on the gap."""
        opts = self.options
        return slot_gap.open_gap(
            self._connect,
            opts.slot,
            opts.qualified_table,
            allow=opts.recover_lost_slot and opts.create_slot,
            margin=opts.gap_margin,
            refusal=self._gap_refusal,
        )

    def _gap_refusal(self, reason: str) -> str:
        opts = self.options
        if not opts.create_slot:
            why = "slot creation is off (create_slot)"
        else:
            why = "automatic recovery is off (recover_lost_slot)"
        return (
            f"{reason}; the events committed since then were not streamed and {why}: stop "
            "every relay of this slot and run 'outbox-cdc recover' (it recreates the slot and "
            "re-publishes only the gap; docs/operations.md, 'A lost or dropped slot')"
        )

    def _check_slot(self) -> int:
        """Create the slot if allowed and safe; return its confirmed_flush LSN. Raises what
        waiting cannot fix, SlotInUseError, or GapPendingError (the relay then calls
        :meth:`backfill` first)."""
        assert self._ctl is not None
        slot = self.options.slot
        state = self.slot_state()
        if state is None or state["wal_status"] == "lost":
            status = "missing" if state is None else "lost"
            reason = slot_gap.gap_reason(self._ctl, slot, self.options.qualified_table, status)
            if reason is not None:
                if not (self.options.recover_lost_slot and self.options.create_slot):
                    raise slot_gap.SlotGapError(self._gap_refusal(reason))
                raise slot_gap.GapPendingError(reason)
        elif slot_gap.pending(self._ctl, slot) is not None:
            raise slot_gap.GapPendingError(f"the gap of replication slot {slot!r} is not published")
        if state is None:
            if not self.options.create_slot:
                raise ConfigurationError(
                    f"replication slot {slot!r} does not exist: run 'outbox-cdc init' or enable "
                    "slot creation (--create-slot / OUTBOX_CDC_CREATE_SLOT=true)"
                )
            create_slot(self._ctl, slot)
            state = self.slot_state()
            assert state is not None
        if state["slot_type"] != "logical" or state["plugin"] != "wal2json":
            raise ConfigurationError(
                f"replication slot {slot!r} uses plugin {state['plugin']!r} "
                f"({state['slot_type']}); outbox-cdc needs a logical slot with wal2json: "
                "drop it or choose another slot name"
            )
        if state["wal_status"] == "lost":
            raise SlotInvalidatedError(invalidated_message(slot))
        if state["active_pid"] is not None:
            raise SlotInUseError(slot, int(state["active_pid"]))
        return parse_lsn(state["confirmed_flush"]) if state["confirmed_flush"] else 0

    def _warn_if_table_missing(self) -> None:
        assert self._ctl is not None
        row = self._ctl.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (self.options.qualified_table,)
        ).fetchone()
        if not (row and row[0]):
            log.warning(
                "table %s does not exist: no table events will be streamed until it is "
                "created ('outbox-cdc init' creates it; check OUTBOX_CDC_TABLE)",
                self.options.qualified_table,
            )

    def open(self, resume_from: int) -> int:
        self.close()
        try:
            self._ctl = self._connect()
            confirmed = self._check_slot()
            stored = load_offset(self._ctl, self.options.slot)
            self._warn_if_table_missing()
            self._repl = self._connect(replication="database")
        except (SourceError, ConfigurationError):
            self.close()
            raise
        except psycopg.Error as exc:
            self.close()
            raise SourceError(f"PostgreSQL: {_describe(exc)}") from None
        start = max(resume_from, stored, confirmed)
        opts = ", ".join(
            f"\"{k}\" '{v}'"
            for k, v in wal2json.plugin_options(
                self.options.qualified_table, self.options.message_prefix
            ).items()
        )
        query = f'START_REPLICATION SLOT "{self.options.slot}" LOGICAL {format_lsn(start)} ({opts})'
        try:
            self._repl.execute(query.encode())
        except pgerr.ObjectInUse:
            pid = (self.slot_state() or {}).get("active_pid")
            self.close()
            raise SlotInUseError(self.options.slot, pid) from None
        except pgerr.ObjectNotInPrerequisiteState as exc:
            self.close()
            if "invalidated" in str(exc):
                raise SlotInvalidatedError(invalidated_message(self.options.slot)) from None
            raise SourceError(f"START_REPLICATION failed: {_describe(exc)}") from None
        except psycopg.Error as exc:
            self.close()
            raise SourceError(f"START_REPLICATION failed: {_describe(exc)}") from None
        self._pgconn = self._repl.pgconn
        self._sock = self._pgconn.socket
        self._flushed = self._delivered = self._saved_offset = start
        self._received = start
        self._sent_flushed = -1
        self._idle_pos = None
        self._last_heard = time.monotonic()
        self._ping_at = None
        self.started_at_lsn = start
        log.info(
            "streaming slot %s from %s (slot confirmed %s, recorded delivered %s)",
            self.options.slot,
            format_lsn(start),
            format_lsn(confirmed),
            format_lsn(stored),
        )
        return start

    # -- reading --------------------------------------------------------------------------------

    def read(self, timeout: float, wake_fd: int, max_items: int) -> list[Item]:
        pgconn = self._pgconn
        if pgconn is None:
            raise SourceError("the replication stream is not open")
        out: list[Item] = []
        deadline = time.monotonic() + timeout
        decode = self._decoder.decode
        drained = False
        try:
            while len(out) < max_items:
                nbytes, data = pgconn.get_copy_data(1)
                if nbytes > 0:
                    self._last_heard = time.monotonic()
                    self._ping_at = None
                    tag = data[0]
                    if tag == XLOGDATA_TAG:
                        start, wal_end = parse_xlogdata_header(data)
                        if wal_end > self._received:
                            self._received = wal_end
                        payload = data[XLOGDATA_HEADER_SIZE:]
                        item = decode(payload, start)
                        if item is wal2json.BEGIN:
                            self._txn_time = wal2json.commit_time(payload)
                            out.append(Begin(self._txn_time))
                        elif item is wal2json.COMMIT:
                            # Coalesce an empty transaction into the commit before it: both
                            # positions become confirmable at the same moment.
                            prev = out[-2] if len(out) >= 2 else None
                            last = out[-1] if out else None
                            if isinstance(prev, Commit) and type(last) is Begin:
                                out.pop()
                                prev.end = start
                                prev.commit_time = self._txn_time
                            else:
                                out.append(Commit(start, self._txn_time))
                            if self._txn_time is not None:
                                self._commit_times.append((start, self._txn_time))
                        elif item is not wal2json.IGNORED:
                            out.append(item)  # type: ignore[arg-type]
                        self._idle_pos = None
                    elif tag == KEEPALIVE_TAG:
                        ka = parse_keepalive(data)
                        if ka.wal_end > self._received:
                            self._received = ka.wal_end
                        self._idle_pos = ka.wal_end
                        if ka.reply_requested:
                            self._reply_requested = True
                    drained = False
                    continue
                if nbytes == -1:
                    raise SourceError(self._stream_end_reason())
                if out:
                    # Take whatever else already arrived (libpq's socket is non-blocking, so
                    # this never waits): a batch per wake-up, not a message per wake-up.
                    if not drained:
                        drained = True
                        pgconn.consume_input()
                        continue
                    break
                now = time.monotonic()
                remaining = deadline - now
                if remaining <= 0:
                    break
                self.tick()  # replies, throttled confirmations, periodic status
                wait = remaining
                if self._flushed != self._sent_flushed:  # a confirmation is waiting its turn
                    wait = min(
                        wait, max(0.0, self._last_status + self.options.confirm_interval - now)
                    )
                ready, _, _ = select.select([self._sock, wake_fd], [], [], wait)
                if self._sock in ready:
                    pgconn.consume_input()
                elif ready:
                    break  # woken up by the relay
                else:
                    self._check_alive()
        except psycopg.Error as exc:
            raise SourceError(f"replication stream lost: {_describe(exc)}") from None
        self.tick()
        return out

    def _check_alive(self) -> None:
        """Called after waiting on an empty socket: a reply asked for half a timeout ago that
        never came means the connection is dead, even if TCP has not noticed (a network
        partition leaves it half-open; the kernel would only give up after ~15 minutes)."""
        timeout = self.options.replication_timeout
        now = time.monotonic()
        if timeout and self._ping_at is not None and now - self._ping_at >= timeout / 2:
            raise SourceError(
                f"no message from PostgreSQL for {now - self._last_heard:.0f} s, not even the"
                " reply to a keepalive request: the replication connection is taken for dead"
                f" (replication_timeout={timeout:g}s); reconnecting"
            )

    def _stream_end_reason(self) -> str:
        try:
            res = self._pgconn.get_result()
            msg = res.error_message.decode(errors="replace").strip() if res is not None else ""
        except Exception:
            msg = ""
        return f"the server ended the replication stream{': ' + msg if msg else ''}"

    def idle_position(self) -> int | None:
        return self._idle_pos

    # -- confirming -----------------------------------------------------------------------------

    def confirm(self, confirmed: int, delivered: int) -> None:
        if confirmed > self._flushed:
            self._flushed = confirmed
            times = self._commit_times
            while times and times[0][0] <= confirmed:
                self.confirmed_commit_time = times.popleft()[1]
        if delivered > self._delivered:
            self._delivered = delivered
        self.tick()

    def tick(self) -> None:
        if self._pgconn is None:
            return
        now = time.monotonic()
        timeout = self.options.replication_timeout
        if timeout and self._ping_at is None and now - self._last_heard >= timeout / 2:
            self._ping_at = now
            self._send_status(force=True, reply=True)
        if (
            self._reply_requested
            or now - self._last_status >= self.options.status_interval
            or (
                self._flushed != self._sent_flushed
                and now - self._last_status >= self.options.confirm_interval
            )
        ):
            self._send_status(force=True)
        if now - self._last_offset_save >= self.options.offset_interval and (
            self._delivered > self._saved_offset
            or (
                self._snapshot_candidate is not None
                and self._flushed >= self._snapshot_candidate[1]
            )
        ):
            self._save_offset()
        if self.options.heartbeat_interval and now >= self._next_heartbeat:
            self._heartbeat(now)
        if self.options.retention is not None and now >= self._next_cleanup:
            self._cleanup(now)

    def _heartbeat(self, now: float) -> None:
        """A transactional logical-decoding message the relay never publishes: its transaction
        comes back through the slot with a commit time, so lag is measured while idle."""
        self._next_heartbeat = now + self.options.heartbeat_interval
        if self._ctl is None:
            return
        try:
            self._ctl.execute(
                "SELECT pg_logical_emit_message(true, %s, '')", (self.options.heartbeat_prefix,)
            )
            if self._heartbeat_failing:
                log.info("heartbeats work again")
            self._heartbeat_failing = False
        except psycopg.Error as exc:
            if self._heartbeat_failing:
                return
            self._heartbeat_failing = True
            log.warning(
                "heartbeat failed (retrying in %gs): %s",
                self.options.heartbeat_interval,
                _describe(exc),
            )

    def _cleanup(self, now: float) -> None:
        """Delete outbox rows older than the retention, and never rows created after the last
        confirmed transaction committed (the rows are only the copy for ``outbox-cdc recover``:
        delivery reads the WAL). A window of the lowest seqs at a time, for a bounded time."""
        opts = self.options
        self._next_cleanup = now + opts.cleanup_interval
        confirmed_at = self.confirmed_commit_time
        if self._ctl is None or confirmed_at is None or opts.retention is None:
            return
        # created_at is the application's clock when the event was built, before its
        # transaction committed: counting the retention from the last confirmed commit keeps
        # the rows of transactions still open then (if shorter than the retention) for recover.
        cutoff = min(time.time(), confirmed_at) - opts.retention
        t = opts.qualified_table
        started = time.monotonic()
        deleted, failed = 0, False
        try:
            while time.monotonic() - started < opts.cleanup_budget:
                cur = self._ctl.execute(
                    f"DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE seq <= (SELECT"
                    f" max(seq) FROM (SELECT seq FROM {t} ORDER BY seq LIMIT %s) w)"
                    " AND created_at < to_timestamp(%s))",
                    (opts.cleanup_window, cutoff),
                )
                if not cur.rowcount:
                    break
                deleted += cur.rowcount
            if self._cleanup_failing:
                log.info("clean-up of old outbox rows works again")
            self._cleanup_failing = False
        except psycopg.Error as exc:
            failed = True
            if not self._cleanup_failing:
                log.warning(
                    "clean-up of old outbox rows failed (retrying every %gs; delivery is not "
                    "affected): %s",
                    opts.cleanup_interval,
                    _describe(exc),
                )
            self._cleanup_failing = True
        if self.cleanup_observer is not None:
            self.cleanup_observer.cleanup(time.monotonic() - started, deleted, failed)

    def _send_status(self, force: bool, reply: bool = False) -> None:
        pgconn = self._pgconn
        flushed = self._flushed
        msg = status_update(max(self._received, flushed), flushed, flushed, time.time(), reply)
        try:
            pgconn.put_copy_data(msg)
            pgconn.flush()
        except psycopg.Error as exc:
            raise SourceError(f"replication stream lost: {_describe(exc)}") from None
        self._sent_flushed = flushed
        self._last_status = time.monotonic()
        self._reply_requested = False

    def _save_offset(self) -> None:
        self._last_offset_save = time.monotonic()
        if self._ctl is None:
            return
        candidate = self._snapshot_candidate
        promote = candidate[0] if candidate and self._flushed >= candidate[1] else None
        advanced = self._delivered > self._saved_offset
        try:
            taken = save_offset(
                self._ctl, self.options.slot, self._delivered, self.confirmed_commit_time, promote
            )
            self._saved_offset = self._delivered
            if promote is not None or candidate is None:
                # a new candidate only while events flow: an idle relay writes nothing
                self._snapshot_candidate = taken if advanced else None
        except psycopg.Error as exc:
            # Only a duplicate-avoidance aid: the slot itself never runs ahead of delivery.
            log.warning("could not record the delivered position: %s", _describe(exc))

    @property
    def flushed(self) -> int:
        return self._flushed

    @property
    def received(self) -> int:
        return self._received

    def close(self) -> None:
        if self._pgconn is not None:
            with contextlib.suppress(SourceError):
                self._send_status(force=True)
        if self._delivered > self._saved_offset:
            self._save_offset()
        for conn in (self._repl, self._ctl):
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    log.debug("closing a PostgreSQL connection failed", exc_info=True)
        self._repl = self._ctl = self._pgconn = None
        self._sock = -1


# -- catalog helpers (normal connection) ---------------------------------------------------------


def invalidated_message(slot: str) -> str:
    return (
        f"replication slot {slot!r} was invalidated: it retained more WAL than "
        "max_slot_wal_keep_size allows and PostgreSQL removed WAL it still needed. Events "
        "committed since the last delivered one were not streamed. Stop every relay of this "
        "slot, then run 'outbox-cdc recover': it recreates the slot and re-publishes the "
        "outbox rows written since the last delivered event (docs/operations.md); consider a "
        "larger max_slot_wal_keep_size"
    )


def create_slot(conn: psycopg.Connection[Any], slot: str) -> str:
    """Create the wal2json slot. Never deletes the recorded offset: over a gap it is where
    re-publishing starts (see slot_gap); callers check for a gap first."""
    try:
        row = conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'wal2json')", (slot,)
        ).fetchone()
    except pgerr.DuplicateObject:
        return ""
    lsn = row[0] if row else ""
    log.info("created replication slot %s (wal2json) at %s", slot, lsn)
    return str(lsn)


def load_offset(conn: psycopg.Connection[Any], slot: str) -> int:
    try:
        row = conn.execute(
            f"SELECT delivered_lsn::text FROM {OFFSETS_TABLE} WHERE slot_name = %s", (slot,)
        ).fetchone()
    except pgerr.UndefinedTable:
        return 0
    return parse_lsn(row[0]) if row else 0


def save_offset(
    conn: psycopg.Connection[Any],
    slot: str,
    lsn: int,
    commit_time: float | None = None,
    snapshot: str | None = None,
) -> tuple[str, int] | None:
    """Record the delivered position (and, when given, a snapshot every transaction visible
    in which is delivered). Returns this moment's (txid snapshot, WAL insert LSN): the next
    snapshot candidate."""
    try:
        row = conn.execute(
            f"INSERT INTO {OFFSETS_TABLE} (slot_name, delivered_lsn, delivered_commit_time,"
            " delivered_snapshot, updated_at)"
            " VALUES (%s, %s::pg_lsn, to_timestamp(%s), %s, now())"
            " ON CONFLICT (slot_name) DO UPDATE"
            " SET delivered_lsn = GREATEST(EXCLUDED.delivered_lsn,"
            f" {OFFSETS_TABLE}.delivered_lsn), delivered_commit_time = GREATEST("
            f"EXCLUDED.delivered_commit_time, {OFFSETS_TABLE}.delivered_commit_time),"
            f" delivered_snapshot = COALESCE(EXCLUDED.delivered_snapshot,"
            f" {OFFSETS_TABLE}.delivered_snapshot), updated_at = now()"
            " RETURNING txid_current_snapshot()::text, pg_current_wal_insert_lsn()::text",
            (slot, format_lsn(lsn), commit_time, snapshot),
        ).fetchone()
        return (str(row[0]), parse_lsn(row[1])) if row else None
    except pgerr.UndefinedColumn:
        # an offsets table of an earlier version: 'outbox-cdc init' adds the column
        conn.execute(
            f"INSERT INTO {OFFSETS_TABLE} (slot_name, delivered_lsn, updated_at)"
            " VALUES (%s, %s::pg_lsn, now()) ON CONFLICT (slot_name) DO UPDATE"
            " SET delivered_lsn = GREATEST(EXCLUDED.delivered_lsn,"
            f" {OFFSETS_TABLE}.delivered_lsn), updated_at = now()",
            (slot, format_lsn(lsn)),
        )
        return None
    except pgerr.UndefinedTable:
        log.warning(
            "table %s is missing (run 'outbox-cdc init'): restarts may redeliver "
            "recently delivered events",
            OFFSETS_TABLE,
        )
        raise
