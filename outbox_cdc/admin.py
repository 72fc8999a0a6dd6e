"""Administrative operations behind ``init``, ``status`` and ``check``: schema and slot creation,
slot health, preflight checks. Each check that fails says how to fix it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg

from outbox_cdc.errors import ConfigurationError, OutboxError
from outbox_cdc.schema import ddl, statements
from outbox_cdc.sources.polling_databases import dialect_of, mysql_connect_args
from outbox_cdc.sources.wal import create_slot

if TYPE_CHECKING:
    from outbox_cdc.sinks.base import Sink

# -- init ----------------------------------------------------------------------------------------


def slot_sql(slot: str) -> str:
    """Idempotent SQL that creates the wal2json slot (for ``--print-sql``)."""
    return (
        f"SELECT pg_create_logical_replication_slot('{slot}', 'wal2json')\n"
        f"    WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}');\n"
    )


def init_sql(
    dialect: str, table: str, slot: str | None, polling: bool = False, notify: bool = False
) -> str:
    script = ddl(dialect, table, polling=polling, notify=notify)
    if dialect == "postgresql" and slot:
        script += "\n-- the WAL relay's logical replication slot (wal2json)\n" + slot_sql(slot)
    return script


def _mysql_connect(url: str) -> Any:
    import pymysql

    return pymysql.connect(**mysql_connect_args(url), autocommit=True)


def _pg_dsn(url: str) -> str:
    scheme, rest = url.split(":", 1)
    return "postgresql:" + rest if "+" in scheme else url


def init(
    url: str, table: str, slot: str | None, polling: bool = False, notify: bool = False
) -> list[str]:
    """Create what is missing: outbox table, bookkeeping tables, and (PostgreSQL) the slot.
    Idempotent. Returns what it did, for the user."""
    dialect = dialect_of(url)
    done: list[str] = []
    if dialect == "postgresql":
        with psycopg.connect(_pg_dsn(url), autocommit=True) as conn:
            existed = _pg_table_exists(conn, table)
            for stmt in statements(ddl(dialect, table, polling=polling, notify=notify)):
                conn.execute(stmt)
            if notify:
                done.append(f"trigger {table.rsplit('.', 1)[-1]}_notify: present")
            done.append(f"table {table}: {'already present' if existed else 'created'}")
            if slot:
                row = conn.execute(
                    "SELECT plugin FROM pg_replication_slots WHERE slot_name = %s", (slot,)
                ).fetchone()
                from outbox_cdc.sources.slot_gap import gap_reason

                gap = gap_reason(conn, slot, table, "missing") if row is None else None
                if gap is not None:
                    # Creating it here would let the relay stream past the gap's events.
                    done.append(
                        f"slot {slot}: not created: {gap}; the relay recreates it and "
                        "re-publishes the gap (recover_lost_slot), or run 'outbox-cdc recover'"
                    )
                elif row is None:
                    lsn = create_slot(conn, slot)
                    done.append(f"slot {slot}: created (wal2json) at {lsn}")
                elif row[0] != "wal2json":
                    raise ConfigurationError(
                        f"slot {slot!r} exists with plugin {row[0]!r}; choose another --slot"
                    )
                else:
                    done.append(f"slot {slot}: already present")
    elif dialect == "mysql":
        conn = _mysql_connect(url)
        try:
            with conn.cursor() as cur:
                for stmt in statements(ddl(dialect, table)):
                    cur.execute(stmt)
        finally:
            conn.close()
        done.append(f"table {table}: present")
    else:
        path = url.split(":///", 1)[1] if ":///" in url else url.split(":", 1)[1]
        sconn = sqlite3.connect(path)
        try:
            for stmt in statements(ddl(dialect, table)):
                sconn.execute(stmt)
            sconn.commit()
        finally:
            sconn.close()
        done.append(f"table {table}: present")
    return done


def _pg_table_exists(conn: psycopg.Connection[Any], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
    return bool(row and row[0])


# -- status --------------------------------------------------------------------------------------


def describe_gap(gap: dict[str, Any]) -> str:
    """One line about a slot recreated over a gap (``outbox_cdc_offsets.slot_gap``)."""
    state = gap.get("state")
    what = {
        "creating": "being recreated over a gap: not streaming until its events are re-published",
        "backfilling": "recreated over a gap; re-publishing its events (not streaming yet)",
        "done": "recreated over a gap; its events were re-published",
    }.get(str(state), str(state))
    when = gap.get("done_at") or gap.get("detected_at")
    at = (
        f" at {datetime.fromtimestamp(float(when)).astimezone().isoformat(timespec='seconds')}"
        if when
        else ""
    )
    return (
        f"{what}{at}: after {gap.get('from_lsn') or 'the oldest row'} up to "
        f"{gap.get('to_lsn') or '?'}, {gap.get('rows', 0)} events re-published"
        f" ({gap.get('reason')})"
    )


def slot_status(url: str, slot: str) -> dict[str, Any]:
    with psycopg.connect(_pg_dsn(url), autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT s.plugin, s.active, s.active_pid, s.wal_status,
                   s.confirmed_flush_lsn::text, s.restart_lsn::text,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint,
                   pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                   pg_current_wal_lsn()::text, s.safe_wal_size,
                   a.application_name, a.client_addr::text, a.backend_start::text
            FROM pg_replication_slots s
            LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid
            WHERE s.slot_name = %s
            """,
            (slot,),
        ).fetchone()
        delivered = None
        try:
            d = conn.execute(
                "SELECT delivered_lsn::text, updated_at::text FROM "
                "outbox_cdc_offsets WHERE slot_name = %s",
                (slot,),
            ).fetchone()
            delivered = {"lsn": d[0], "updated_at": d[1]} if d else None
        except psycopg.errors.UndefinedTable:
            pass
        from outbox_cdc.sources.slot_gap import read_marker

        gap = read_marker(conn, slot)
    if row is None:
        return {"slot": slot, "exists": False, "slot_gap": gap, "recorded_delivered": delivered}
    return {
        "slot_gap": gap,
        "slot": slot,
        "exists": True,
        "plugin": row[0],
        "active": row[1],
        "active_pid": row[2],
        "wal_status": row[3],
        "confirmed_flush_lsn": row[4],
        "restart_lsn": row[5],
        "retained_wal_bytes": row[6],
        "lag_bytes": row[7],
        "current_wal_lsn": row[8],
        "safe_wal_size": row[9],
        "active_process": {
            "application_name": row[10],
            "client_addr": row[11],
            "backend_start": row[12],
        }
        if row[2] is not None
        else None,
        "recorded_delivered": delivered,
    }


# -- check ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def preflight_postgres(url: str, table: str, slot: str) -> list[Check]:
    checks: list[Check] = []
    try:
        conn = psycopg.connect(_pg_dsn(url), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [
            Check(
                "database reachable",
                False,
                first,
                "check OUTBOX_CDC_DATABASE_URL (host, port, user, password) and pg_hba.conf",
            )
        ]
    with conn:
        version = conn.execute("SHOW server_version").fetchone()
        checks.append(
            Check("database reachable", True, f"PostgreSQL {version[0] if version else '?'}")
        )
        wal_level = conn.execute("SHOW wal_level").fetchone()
        ok = bool(wal_level and wal_level[0] == "logical")
        checks.append(
            Check(
                "wal_level",
                ok,
                f"wal_level = {wal_level[0] if wal_level else '?'}",
                "set wal_level = logical in postgresql.conf and restart PostgreSQL",
            )
        )
        role = conn.execute(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        ok = bool(role and role[0])
        checks.append(
            Check(
                "replication role",
                ok,
                "current role has REPLICATION" if ok else "current role lacks REPLICATION",
                "ALTER ROLE <relay role> REPLICATION;",
            )
        )
        checks.append(_check_wal2json(conn, slot))
        exists = _pg_table_exists(conn, table)
        checks.append(
            Check(
                "outbox table",
                exists,
                f"{table} {'exists' if exists else 'is missing'}",
                "run 'outbox-cdc init' (or apply 'outbox-cdc init --print-sql')",
            )
        )
        state = conn.execute(
            "SELECT plugin, wal_status, active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
        if state is None:
            checks.append(
                Check(
                    "replication slot",
                    True,
                    f"{slot} does not exist yet; 'init' or 'start' creates it",
                    warning=True,
                )
            )
        elif state[0] != "wal2json":
            checks.append(
                Check(
                    "replication slot",
                    False,
                    f"{slot} uses plugin {state[0]}",
                    "drop it or choose another slot name (--slot)",
                )
            )
        elif state[1] == "lost":
            checks.append(
                Check(
                    "replication slot",
                    False,
                    f"{slot} was invalidated (wal_status lost)",
                    "drop and recreate the slot; see docs/operations.md",
                )
            )
        else:
            active = f", active in PID {state[2]}" if state[2] else ""
            checks.append(Check("replication slot", True, f"{slot}: wal_status {state[1]}{active}"))
        keep = conn.execute("SHOW max_slot_wal_keep_size").fetchone()
        unlimited = bool(keep and keep[0] in ("-1", "-1kB"))
        checks.append(
            Check(
                "max_slot_wal_keep_size",
                True,
                f"max_slot_wal_keep_size = {keep[0] if keep else '?'}",
                "set max_slot_wal_keep_size so a stuck slot cannot fill the disk",
                warning=unlimited,
            )
        )
    return checks


def _check_wal2json(conn: psycopg.Connection[Any], slot: str) -> Check:
    probe = f"{slot[:40]}_check_{conn.info.backend_pid}"
    try:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json', true)", (probe,))
        conn.execute("SELECT pg_drop_replication_slot(%s)", (probe,))
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0]
        return Check(
            "wal2json",
            False,
            first,
            "install wal2json (Debian/Ubuntu: apt-get install postgresql-15-wal2json) "
            "and check wal_level and max_replication_slots; or, where logical decoding is not "
            "available, relay by polling: --mode polling (docs/polling.md)",
        )
    return Check("wal2json", True, "wal2json output plugin loads")


def polling_status(url: str, table: str) -> dict[str, Any]:
    """Pending rows, age of the oldest, and which relay holds the poller lock."""
    from outbox_cdc.sources.polling_databases import open_database

    db = open_database(url, table)
    db.connect()
    try:
        warnings = db.check_table()
        count, oldest = db.pending()
        free = db.try_lock()
        holder = None if free else db.lock_holder()
    finally:
        db.close()  # also releases the lock if we took it
    return {
        "mode": "polling",
        "database": db.name,
        "table": table,
        "pending_rows": count,
        "oldest_pending_age_seconds": oldest,
        "active_poller": holder,
        "warnings": warnings,
    }


def preflight_polling(url: str, table: str) -> list[Check]:
    from outbox_cdc.errors import OutboxError

    try:
        info = polling_status(url, table)
    except OutboxError as exc:
        missing = "does not exist" in str(exc)
        return [
            Check(
                "outbox table" if missing else "database reachable",
                False,
                str(exc).removesuffix("; retrying"),
                "run 'outbox-cdc init'"
                if missing
                else "check OUTBOX_CDC_DATABASE_URL (host, port, user, password, path)",
            )
        ]
    checks = [
        Check("database reachable", True, info["database"]),
        Check("outbox table", True, f"{table} exists"),
    ]
    for warning in info["warnings"]:
        checks.append(
            Check("polling index", True, warning, "outbox-cdc init --polling", warning=True)
        )
    age = info["oldest_pending_age_seconds"]
    checks.append(
        Check(
            "pending rows",
            True,
            f"{info['pending_rows']} pending"
            + (f", oldest {age:.1f} s old" if age is not None else ""),
        )
    )
    holder = info["active_poller"]
    checks.append(
        Check("poller", True, f"active: {holder}" if holder else "no relay polls this table now")
    )
    return checks


def preflight_kafka(bootstrap_servers: str, client_config: dict[str, Any]) -> Check:
    import kafka.errors as kerr
    from kafka.admin import KafkaAdminClient

    from outbox_cdc.sinks.security import kafka_python_failures, scrub, secrets_of

    try:
        with kafka_python_failures() as failures:
            admin = KafkaAdminClient(
                bootstrap_servers=bootstrap_servers.split(","),
                client_id="outbox-cdc-check",
                request_timeout_ms=10_000,
                bootstrap_timeout_ms=10_000,
                **client_config,
            )
        try:
            topics = admin.list_topics()
        finally:
            admin.close()
    except kerr.KafkaError as exc:
        return Check(
            "kafka reachable",
            False,
            scrub(f"{type(exc).__name__}: {exc}", secrets_of(client_config))
            + failures.describe(client_config),
            f"check OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS ({bootstrap_servers}) and the "
            "Kafka security settings (OUTBOX_CDC_KAFKA_SECURITY_PROTOCOL, "
            "OUTBOX_CDC_KAFKA_SASL_*, OUTBOX_CDC_KAFKA_SSL_*)",
        )
    return Check("kafka reachable", True, f"{bootstrap_servers}: {len(topics)} topics visible")


# -- recover -------------------------------------------------------------------------------------


@dataclass
class Recovery:
    slot: str
    slot_state: str  # lost, missing, or (with force) the state it had
    new_slot_lsn: str
    since: str | None  # created_at cutoff of the re-published rows (None: all rows)
    rows: int
    published: int
    dry_run: bool
    gap: bool = False  # the slot gap path (sources/slot_gap.py), not the created_at rule
    gap_from: str | None = None  # the recorded delivered position the gap starts after


def recover(
    url: str,
    table: str,
    slot: str,
    sink_factory: Callable[[], Sink],
    *,
    source_name: str,
    margin: float = 600.0,
    since: datetime | None = None,
    force: bool = False,
    dry_run: bool = False,
    timeout: float = 300.0,
) -> Recovery:
    """Recreate a lost slot and re-publish the outbox rows it may not have delivered.

    Order matters: the new slot is created *before* the rows are read, so every transaction
    committed before the slot's consistent point is visible to the read, and every later one
    is streamed by the slot (some events twice: duplicates, never losses). The rows re-published
    are those created at or after ``since``, by default the commit time of the last
    confirmed transaction (``outbox_cdc_offsets``) minus ``margin`` seconds: ``created_at`` is
    the transaction's start, so a transaction that ran longer than ``margin`` before committing
    could be missed; without a recorded time, every retained row is re-published.
    """
    dsn = _pg_dsn(url)
    if since is None and not force:
        gap = _recover_gap(dsn, table, slot, sink_factory, source_name, margin, dry_run, timeout)
        if gap is not None:
            return gap
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        state = conn.execute(
            "SELECT plugin, wal_status, active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
        if state is not None and state[2] is not None:
            raise ConfigurationError(
                f"slot {slot!r} is in use by PID {state[2]}: stop every relay of this slot first"
            )
        status = "missing" if state is None else str(state[1])
        if status not in ("lost", "missing") and not force:
            raise ConfigurationError(
                f"slot {slot!r} is healthy (wal_status {status}): nothing to recover. --force "
                "recreates it and re-publishes anyway (duplicates)"
            )
        if since is None:
            try:
                row = conn.execute(
                    "SELECT delivered_commit_time FROM outbox_cdc_offsets WHERE slot_name = %s",
                    (slot,),
                ).fetchone()
            except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn):
                row = None
            if row is not None and row[0] is not None:
                since = row[0] - timedelta(seconds=margin)
        cutoff = "" if since is None else " WHERE created_at >= %s"
        params: tuple[Any, ...] = () if since is None else (since,)
        count_row = conn.execute(f"SELECT count(*) FROM {table}{cutoff}", params).fetchone()
        rows = int(count_row[0]) if count_row else 0
        if dry_run:
            return Recovery(slot, status, "", _iso(since), rows, 0, True)
        if state is not None:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        lsn = create_slot(conn, slot)
        try:
            published = _republish(conn, table, cutoff, params, sink_factory, source_name, timeout)
        except Exception as exc:
            # The slot is healthy now, so a plain rerun would find nothing to recover.
            again = f" --since '{since.isoformat()}'" if since is not None else ""
            raise OutboxError(
                f"slot {slot!r} was recreated at {lsn}, but re-publishing failed: {exc}. Fix "
                f"the cause, then run: outbox-cdc recover --force{again}"
            ) from None
    return Recovery(slot, status, lsn, _iso(since), rows, published, False)


def _recover_gap(
    dsn: str,
    table: str,
    slot: str,
    sink_factory: Callable[[], Sink],
    source_name: str,
    margin: float,
    dry_run: bool,
    timeout: float,
) -> Recovery | None:
    """The relay's own gap path (sources/slot_gap.py): a missing or lost slot over a recorded
    delivered position, or an unfinished recreation, re-publishes exactly the gap. None when
    this is not such a case (a healthy slot; or nothing was ever delivered: the older rule)."""
    from outbox_cdc.sources import slot_gap

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT wal_status, active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        ).fetchone()
        if row is not None and row[1] is not None:
            raise ConfigurationError(
                f"slot {slot!r} is in use by PID {row[1]}: stop every relay of this slot first"
            )
        status = "missing" if row is None else str(row[0])
        marker = slot_gap.pending(conn, slot)
        if marker is None:
            if status not in ("missing", "lost"):
                return None
            if slot_gap.gap_reason(conn, slot, table, status) is None:
                return None
        if dry_run:
            rows = _gap_rows_now(conn, table, slot, marker, margin)
            return Recovery(slot, status, "", None, rows, 0, True, gap=True)
    try:
        gap = slot_gap.open_gap(
            lambda: psycopg.connect(dsn, autocommit=True, connect_timeout=10),
            slot,
            table,
            allow=True,
            margin=margin,
        )
    except OutboxError as exc:
        raise OutboxError(f"recover: {exc}") from None
    if gap is None:  # a relay recovered it meanwhile
        return Recovery(slot, status, "", None, 0, 0, False, gap=True)
    try:
        published = _publish_gap(gap, sink_factory, source_name, timeout)
    except Exception as exc:
        raise OutboxError(
            f"re-publishing the gap of slot {slot!r} failed: {exc}. What was acknowledged is "
            "recorded: fix the cause and run 'outbox-cdc recover' again (or start the relay: it "
            "continues the gap by itself)"
        ) from None
    finally:
        gap.close()
    lsn = str(gap.marker.get("to_lsn") or "")
    since = gap.marker.get("from_lsn")
    return Recovery(slot, status, lsn, None, published, published, False, True, since)


def _gap_rows_now(
    conn: psycopg.Connection[Any],
    table: str,
    slot: str,
    marker: dict[str, Any] | None,
    margin: float,
) -> int:
    """How many rows the gap would have if the slot were recreated now (for --dry-run)."""
    from outbox_cdc.sources import slot_gap

    if marker is None or marker.get("state") == "creating":
        row = conn.execute(
            f"SELECT delivered_commit_time, delivered_snapshot FROM {slot_gap.OFFSETS_TABLE}"
            " WHERE slot_name = %s",
            (slot,),
        ).fetchone()
        snap = conn.execute("SELECT txid_current_snapshot()::text").fetchone()
        marker = {
            "from_time": row[0].isoformat() if row and row[0] else None,
            "from_snapshot": row[1] if row else None,
            "to_snapshot": snap[0] if snap else None,
            "txid": slot_gap._has_txid(conn, table),
        }
    gap = slot_gap.Backfill(conn, slot, table, marker, margin, 10**9)
    return len(gap.next_page())


def _publish_gap(
    gap: Any, sink_factory: Callable[[], Sink], source_name: str, timeout: float
) -> int:
    from outbox_cdc.errors import EventDecodeError, SinkError
    from outbox_cdc.events import to_record

    sink = sink_factory()
    failures: list[BaseException] = []
    acked = [0]
    lock = threading.Lock()

    def on_done(exc: BaseException | None) -> None:
        with lock:
            if exc is None:
                acked[0] += 1
            else:
                failures.append(exc)

    total = 0
    try:
        while True:
            page = gap.next_page()
            if not page:
                break
            acked[0] = 0
            for _seq, event in page:
                if isinstance(event, EventDecodeError):
                    raise event
                sink.send(to_record(event, source_name), on_done)
            deadline = time.monotonic() + timeout
            while acked[0] + len(failures) < len(page) and time.monotonic() < deadline:
                sink.flush(min(5.0, max(0.1, deadline - time.monotonic())))
            if failures:
                raise SinkError(f"{len(failures)} events were not published: {failures[0]}")
            if acked[0] < len(page):
                raise SinkError(f"events were not acknowledged within {timeout:.0f}s")
            gap.acknowledged(page)
            total += len(page)
        gap.finish()
    finally:
        sink.close(10.0)
    return int(gap.rows) if gap.rows else total


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def _republish(
    conn: psycopg.Connection[Any],
    table: str,
    cutoff: str,
    params: tuple[Any, ...],
    sink_factory: Callable[[], Sink],
    source_name: str,
    timeout: float,
) -> int:
    from outbox_cdc.errors import EventDecodeError, SinkError
    from outbox_cdc.events import to_record
    from outbox_cdc.sources.polling import row_to_event

    sink = sink_factory()
    failures: list[BaseException] = []
    acked = [0]
    lock = threading.Lock()

    def on_done(exc: BaseException | None) -> None:
        with lock:
            if exc is None:
                acked[0] += 1
            else:
                failures.append(exc)

    sent = 0
    cols = 'seq, id::text, created_at, topic, "key", type, content_type, payload, headers::text'
    try:
        with conn.transaction(), conn.cursor(name="outbox_cdc_recover") as cur:
            cur.itersize = 1000
            cur.execute(f"SELECT {cols} FROM {table}{cutoff} ORDER BY seq", params)
            for row in cur:
                event = row_to_event(row, table)
                if isinstance(event, EventDecodeError):
                    raise event
                sink.send(to_record(event, source_name), on_done)
                sent += 1
        deadline = time.monotonic() + timeout
        while acked[0] + len(failures) < sent and time.monotonic() < deadline:
            sink.flush(min(5.0, max(0.1, deadline - time.monotonic())))
    finally:
        sink.close(10.0)
    if failures:
        raise SinkError(f"{len(failures)} of {sent} events were not published: {failures[0]}")
    if acked[0] < sent:
        raise SinkError(f"only {acked[0]} of {sent} events were acknowledged within {timeout:.0f}s")
    return sent
