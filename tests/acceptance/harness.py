"""Acceptance harness for the relay (WAL and polling modes): the relay as a real process, a load
generator that knows exactly what it committed, and a checker that reads the Kafka topic back.

* :class:`RelayProcess` runs ``python -m outbox_cdc.cli start`` with ``OUTBOX_CDC_*`` settings,
  its stderr in a log file per run (attached to failing tests by ``conftest.py``).
* :class:`Database`: one database the outbox lives in, for the three backends of the relay:
  :class:`PostgresDatabase` (psycopg), :class:`MariaDatabase` (PyMySQL) and
  :class:`SqliteDatabase` (sqlite3, a file in WAL journal mode). It connects producers, creates
  and drops outbox tables with the project's DDL and gives the relay its database URL.
* :class:`LoadGenerator`: N producer threads, each with its own connection, writing
  events with ``Outbox(table).publish`` in transactions of 1..``max_batch`` events, every
  ``rollback_every``-th transaction of a thread rolled back. Keys are assigned to threads
  (``key i`` belongs to thread ``i % threads``), so the commit order of a key is the order of
  one thread's commits and is well defined. With ``tolerate_restarts`` a thread survives a
  database server restart: a transaction that failed before COMMIT did not commit; a COMMIT that
  raised has an unknown outcome, settled after reconnecting by looking its ids up. A
  transaction that did not commit is retried under new ids (the old ids must never appear).
* :func:`read_topic` + :func:`check`: consume the topic from the beginning (no group, every
  partition assigned) and compare with what was written.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pymysql
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewPartitions, NewTopic
from kafka.errors import TopicAlreadyExistsError

from outbox_cdc import Outbox
from outbox_cdc.schema import ddl, statements
from tests.support.postgres import lsn_to_int
from tests.support.services import mysql_connect_kwargs

EVENT_TYPE = "acceptance.event"
CONTENT_TYPE = "application/json"

# ------------------------------------------------------------------------------------------
# the relay process
# ------------------------------------------------------------------------------------------


def relay_env(
    *,
    database_url: str,
    bootstrap: str,
    table: str,
    slot: str,
    **settings: object,
) -> dict[str, str]:
    """``OUTBOX_CDC_*`` variables for ``outbox-cdc start``; ``settings`` by setting name
    (``max_in_flight_events=2000`` -> ``OUTBOX_CDC_MAX_IN_FLIGHT_EVENTS=2000``).

    The message prefix is the slot's name: table-less events are database-wide, and every relay
    on the database with the default prefix would publish those of other tests (and theirs ours).
    """
    env = {
        "OUTBOX_CDC_DATABASE_URL": database_url,
        "OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "OUTBOX_CDC_TABLE": table,
        "OUTBOX_CDC_SLOT": slot,
        "OUTBOX_CDC_MESSAGE_PREFIX": slot,
        "OUTBOX_CDC_KAFKA_TOPIC_PARTITIONS": "4",
        "OUTBOX_CDC_LOG_LEVEL": "INFO",
    }
    for name, value in settings.items():
        env["OUTBOX_CDC_" + name.upper()] = str(value)
    return env


class RelayProcess:
    """One relay (``outbox-cdc start``), possibly started several times; one log per run."""

    def __init__(self, env: Mapping[str, str], log_dir: Path, name: str = "relay") -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.started_at = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, **extra_env: object) -> RelayProcess:
        assert not self.running, f"{self.name} is already running (pid {self.pid})"
        # Only this relay's settings: nothing of the caller's OUTBOX_CDC_* may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_CDC_")}
        env.update(self.env)
        env.update({"OUTBOX_CDC_" + k.upper(): str(v) for k, v in extra_env.items()})
        env["PYTHONUNBUFFERED"] = "1"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.name}-run{len(self.logs) + 1}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "outbox_cdc.cli", "start"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started_at = time.monotonic()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.running:
            self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Exit code; raises subprocess.TimeoutExpired."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if not self.running:
            return self.returncode
        self.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.returncode

    # -- logs -----------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.logs[-1]

    def log_text(self, run: int = -1) -> str:
        if not self.logs:
            return ""
        try:
            return self.logs[run].read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def all_logs(self) -> str:
        return "\n".join(
            f"===== {p} =====\n{p.read_text(errors='replace') if p.exists() else ''}"
            for p in self.logs
        )

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Wait until the current run's log matches ``pattern``; fail if the relay exits."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited with {self.returncode} before logging {pattern!r}:\n"
                    f"{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not log {pattern!r} within {timeout:.0f} s:\n"
                    f"{self.log_text()}"
                )
            time.sleep(0.05)

    def wait_streaming(self, timeout: float = 30.0) -> None:
        self.wait_for_log(r"INFO outbox_cdc\.relay: streaming from", timeout)


# ------------------------------------------------------------------------------------------
# PostgreSQL helpers
# ------------------------------------------------------------------------------------------


def slot_row(admin_url: str, slot: str) -> dict[str, Any] | None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT active_pid, confirmed_flush_lsn::text, restart_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (slot,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        names = [d.name for d in cur.description or ()]
        return dict(zip(names, row, strict=True))


def create_outbox_table(dsn: str, table: str) -> None:
    """The project's outbox DDL (schema v1) for ``table`` in PostgreSQL."""
    PostgresDatabase(dsn).create_table(table)


def drop_outbox_table(dsn: str, table: str) -> None:
    PostgresDatabase(dsn).drop_table(table)


def create_logical_slot(admin_url: str, slot: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))


def write_marker(dsn: str, table: str, topic: str) -> tuple[str, str]:
    """Commit one marker event; returns its id and pg_current_wal_insert_lsn() taken in its
    transaction just before COMMIT (a lower bound of its commit LSN)."""
    with psycopg.connect(dsn) as conn:
        event_id = Outbox(table, capture_trace_context=False).publish(
            conn, topic=topic, type="acceptance.marker", payload=b"marker", key="marker"
        )
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        conn.commit()
    assert row is not None
    return str(event_id), str(row[0])


def marker_commit_end(admin_url: str, slot: str, table: str, event_id: str) -> int:
    """The commit end LSN (what a relay confirms once it is delivered) of the transaction that
    wrote ``event_id`` into ``table``, decoded from ``slot`` (a wal2json slot created before
    that transaction; peeked, not consumed)."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, 'format-version', '2',"
            " 'include-lsn', '1', 'add-tables', %s, 'actions', 'insert')",
            (slot, table),
        ).fetchall()
    found = False
    for (data,) in rows:
        obj = json.loads(data)
        if obj["action"] == "I" and not found:
            found = any(c["name"] == "id" and c["value"] == event_id for c in obj["columns"])
        elif obj["action"] == "C" and found:
            return lsn_to_int(obj["nextlsn"])
    raise AssertionError(f"event {event_id} not found in slot {slot}")


# ------------------------------------------------------------------------------------------
# the databases: PostgreSQL, MariaDB, SQLite
# ------------------------------------------------------------------------------------------


def fetch_all(conn: Any, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` on ``conn`` (psycopg, PyMySQL or sqlite3) in its current transaction."""
    args = tuple(params)
    cur = conn.cursor()
    try:
        if args:
            cur.execute(sql, args)
        else:  # no parameters: the drivers then leave a literal % alone
            cur.execute(sql)
        return [tuple(row) for row in cur.fetchall()]
    finally:
        cur.close()


class Database:
    """A database holding outbox tables, as producers and the relay see it.

    ``dialect`` is the project's DDL dialect (``postgresql``, ``mysql``, ``sqlite``); ``url`` is
    the relay's ``OUTBOX_CDC_DATABASE_URL``; ``param`` the driver's placeholder; ``connect()``
    gives a new producer connection (not in autocommit: the caller commits or rolls back).
    """

    name: str
    dialect: str
    url: str
    param: str = "%s"
    # what a server restart raises on a connection: the server closed it, or it was closed
    connection_lost: tuple[type[BaseException], ...] = ()

    def connect(self) -> Any:
        raise NotImplementedError

    def create_table(self, table: str, *, polling: bool = False) -> None:
        """The project's outbox DDL (schema v1) for ``table``; ``polling`` adds what the polling
        relay reads with (the pending-rows index: on PostgreSQL only with this flag, MariaDB
        and SQLite always have it)."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            for stmt in statements(ddl(self.dialect, table, polling=polling)):
                cur.execute(stmt)
            cur.close()
            conn.commit()
        finally:
            conn.close()

    def drop_table(self, table: str) -> None:
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(f"DELETE FROM outbox_cdc_schema WHERE table_name = {self.param}", (table,))
            cur.close()
            conn.commit()
        finally:
            conn.close()

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` on a connection of its own (so it sees everything committed so far)."""
        conn = self.connect()
        try:
            rows = fetch_all(conn, sql, params)
            conn.rollback()
            return rows
        finally:
            conn.close()

    def ids_in(self, ids: Collection[str]) -> tuple[str, list[str]]:
        """SQL condition ``id IN (...)`` for ``ids`` and its parameters."""
        marks = ", ".join([self.param] * len(ids))
        return f"id IN ({marks})", list(ids)

    def count_ids(self, conn: Any, table: str, ids: Collection[str]) -> int:
        """How many of ``ids`` are rows of ``table``, seen by ``conn`` (then rolled back)."""
        condition, params = self.ids_in(ids)
        rows = fetch_all(conn, f"SELECT count(*) FROM {table} WHERE {condition}", params)
        conn.rollback()
        return int(rows[0][0]) if rows else 0

    def table_state(self, table: str) -> tuple[int, int]:
        """(rows, rows with published_at NULL) of ``table``."""
        rows = self.query(
            f"SELECT count(*), count(*) - count(published_at) FROM {table}",
        )
        return int(rows[0][0]), int(rows[0][1] or 0)

    def row_published(self, table: str, event_id: str) -> tuple[bool, Any]:
        """(the row of ``event_id`` exists, its published_at)."""
        rows = self.query(f"SELECT published_at FROM {table} WHERE id = {self.param}", (event_id,))
        return (True, rows[0][0]) if rows else (False, None)

    def seq_of(self, conn: Any, table: str, event_id: str) -> int | None:
        """The seq of ``event_id``, as ``conn`` sees it (its own uncommitted rows included)."""
        rows = fetch_all(conn, f"SELECT seq FROM {table} WHERE id = {self.param}", (event_id,))
        return int(rows[0][0]) if rows else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class PostgresDatabase(Database):
    name = "postgres"
    dialect = "postgresql"
    connection_lost = (psycopg.OperationalError, psycopg.InterfaceError)

    def __init__(self, dsn: str) -> None:
        self.url = dsn

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.url, connect_timeout=5)

    def create_table(self, table: str, *, polling: bool = False) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            for stmt in statements(ddl("postgresql", table, polling=polling)):
                conn.execute(stmt)

    def drop_table(self, table: str) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=30) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute("DELETE FROM outbox_cdc_schema WHERE table_name = %s", (table,))

    def ids_in(self, ids: Collection[str]) -> tuple[str, list[str]]:
        return "id = ANY(%s::uuid[])", [list(ids)]


class MariaDatabase(Database):
    """MariaDB (or MySQL) through PyMySQL; ``url`` is ``mysql://user:pass@host:port/db``."""

    name = "mariadb"
    dialect = "mysql"
    connection_lost = (pymysql.err.OperationalError, pymysql.err.InterfaceError)

    def __init__(self, url: str) -> None:
        self.url = url

    def connect(self) -> Any:
        return pymysql.connect(
            **mysql_connect_kwargs(self.url), charset="utf8mb4", connect_timeout=5
        )


class SqliteDatabase(Database):
    """One SQLite file; one sqlite3 connection per thread (``timeout=30``: a writer waits for
    the lock instead of failing at once). The relay URL is SQLAlchemy style:
    ``sqlite:////absolute/path``."""

    name = "sqlite"
    dialect = "sqlite"
    param = "?"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path).resolve()
        self.url = f"sqlite:///{self.path}"

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def create_table(self, table: str, *, polling: bool = False) -> None:
        conn = self.connect()
        try:
            # readers (the relay's polls) do not block the writers, nor the writers them
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        super().create_table(table, polling=polling)


def as_database(db: Database | str) -> Database:
    """A :class:`Database`; a plain string is a PostgreSQL DSN (the WAL relay's database)."""
    return db if isinstance(db, Database) else PostgresDatabase(db)


def write_event(
    db: Database,
    table: str,
    topic: str,
    *,
    key: str = "marker",
    payload: bytes = b"marker",
    type: str = "acceptance.marker",
) -> str:
    """Commit one event on a connection of its own; returns its id."""
    conn = db.connect()
    try:
        event_id = Outbox(table, capture_trace_context=False).publish(
            conn, topic=topic, type=type, payload=payload, key=key
        )
        conn.commit()
    finally:
        conn.close()
    return str(event_id)


# ------------------------------------------------------------------------------------------
# the load generator
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    """One committed event, as the checker expects to find it on the topic."""

    id: str
    key: str
    seq: int
    payload: bytes
    headers: tuple[tuple[str, bytes], ...]
    written_at: float  # time.time() just before publish


@dataclass
class LoadResult:
    committed: dict[str, Written] = field(default_factory=dict)
    rolled_back: set[str] = field(default_factory=set)  # rolled back, or did not commit
    order: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # event id -> (number of its transaction, in the order outcomes were recorded; its size)
    txn_of: dict[str, tuple[int, int]] = field(default_factory=dict)
    transactions: int = 0
    rollbacks: int = 0
    unknown_outcomes: int = 0  # COMMIT raised; settled by looking the ids up
    retried: int = 0  # transactions that did not commit because the server went away
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)


class LoadGenerator:
    """Writes ``events`` events (committed + rolled back) over ``keys`` keys with ``threads``
    threads; ``rate`` caps the total events per second (None: as fast as possible).
    ``db`` is a :class:`Database`, or a PostgreSQL DSN."""

    def __init__(
        self,
        db: Database | str,
        table: str,
        topic: str,
        *,
        events: int = 20_000,
        keys: int = 200,
        threads: int = 4,
        rollback_every: int = 10,
        max_batch: int = 3,
        rate: float | None = None,
        tolerate_restarts: bool = False,
        seed: int = 1,
        key_prefix: str = "key",
    ) -> None:
        assert keys >= threads
        self.db, self.topic = as_database(db), topic
        self.outbox = Outbox(table, capture_trace_context=False)
        self.table = table
        self.events, self.keys, self.threads = events, keys, threads
        self.rollback_every, self.max_batch = rollback_every, max_batch
        self.rate = rate
        self.tolerate_restarts = tolerate_restarts
        self.seed = seed
        self.key_prefix = key_prefix
        self.result = LoadResult()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.written = 0  # events committed or rolled back so far
        self.started_at = self.finished_at = 0.0

    # -- control --------------------------------------------------------------------------
    def start(self) -> LoadGenerator:
        self.started_at = time.monotonic()
        per_thread = [self.events // self.threads] * self.threads
        per_thread[0] += self.events - sum(per_thread)
        for t in range(self.threads):
            th = threading.Thread(
                target=self._thread_main, args=(t, per_thread[t]), name=f"load-{t}", daemon=True
            )
            self._threads.append(th)
            th.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float) -> LoadResult:
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))
        if self.running:
            self.stop()
            raise AssertionError(
                f"load generator did not finish within {timeout:.0f} s "
                f"({self.written}/{self.events} written)"
            )
        self.finished_at = time.monotonic()
        if self.result.errors:
            raise AssertionError("load generator failed:\n" + "\n".join(self.result.errors))
        return self.result

    def wait_written(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.written < n:
            if self.result.errors:
                raise AssertionError("load generator failed:\n" + "\n".join(self.result.errors))
            if not self.running:
                raise AssertionError(f"load generator ended after {self.written} < {n} events")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.written}/{n} events written in {timeout:.0f} s")
            time.sleep(0.02)

    # -- one thread -----------------------------------------------------------------------
    def _connect(self) -> Any:
        deadline = time.monotonic() + 90
        while True:
            try:
                return self.db.connect()
            except self.db.connection_lost:
                if not self.tolerate_restarts or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _thread_main(self, t: int, quota: int) -> None:
        try:
            self._write(t, quota)
        except Exception as exc:  # reported by join()
            with self._lock:
                self.result.errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    def _write(self, t: int, quota: int) -> None:
        rng = random.Random(self.seed * 1000 + t)
        my_keys = [f"{self.key_prefix}-{i:04d}" for i in range(t, self.keys, self.threads)]
        next_seq: dict[str, int] = dict.fromkeys(my_keys, 0)
        per_thread_rate = self.rate / self.threads if self.rate else None
        conn = self._connect()
        written = txn_no = 0
        t0 = time.monotonic()
        try:
            while written < quota and not self._stop.is_set():
                size = min(rng.randint(1, self.max_batch), quota - written)
                keys = [rng.choice(my_keys) for _ in range(size)]
                rollback = txn_no % self.rollback_every == self.rollback_every - 1
                txn_no += 1
                conn = self._transaction(conn, t, keys, next_seq, rollback)
                written += size
                with self._lock:
                    self.written += size
                if per_thread_rate:
                    ahead = written / per_thread_rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        finally:
            conn.close()

    def _transaction(
        self,
        conn: Any,
        t: int,
        keys: list[str],
        next_seq: dict[str, int],
        rollback: bool,
    ) -> Any:
        """Write one transaction until its outcome is known; returns the (new) connection."""
        while True:
            seqs = dict(next_seq)
            batch: list[Written] = []
            try:
                for key in keys:
                    seq = seqs[key]
                    seqs[key] = seq + 1
                    w = self._event(t, key, seq, rollback)
                    batch.append(w)
                    self.outbox.publish(
                        conn,
                        topic=self.topic,
                        type=EVENT_TYPE,
                        payload=w.payload,
                        key=key,
                        headers=dict(w.headers),
                        id=w.id,
                        content_type=CONTENT_TYPE,
                    )
                if rollback:
                    conn.rollback()
                    self._record(batch, committed=False, rolled_back_on_purpose=True)
                    return conn
            except self.db.connection_lost:
                if not self.tolerate_restarts:
                    raise
                # The server went away before COMMIT: nothing of this transaction committed.
                self._record(batch, committed=False, retried=True)
                conn = self._reconnect(conn)
                continue
            try:
                conn.commit()
            except self.db.connection_lost:
                if not self.tolerate_restarts:
                    raise
                conn = self._reconnect(conn)
                committed = self._exists([w.id for w in batch], conn)
                with self._lock:
                    self.result.unknown_outcomes += 1
                if not committed:
                    self._record(batch, committed=False, retried=True)
                    continue
            next_seq.update(seqs)
            self._record(batch, committed=True)
            return conn

    def _event(self, t: int, key: str, seq: int, rollback: bool) -> Written:
        event_id = str(uuid.uuid4())
        payload = json.dumps(
            {"key": key, "seq": seq, "thread": t, "id": event_id, "rb": rollback},
            separators=(",", ":"),
        ).encode()
        headers = (("tenant", f"t{t}".encode()), ("seq", str(seq).encode()))
        return Written(event_id, key, seq, payload, headers, time.time())

    def _record(
        self,
        batch: list[Written],
        *,
        committed: bool,
        retried: bool = False,
        rolled_back_on_purpose: bool = False,
    ) -> None:
        with self._lock:
            r = self.result
            r.transactions += 1
            if committed:
                for w in batch:
                    r.committed[w.id] = w
                    r.order[w.key].append(w.id)
                    r.txn_of[w.id] = (r.transactions, len(batch))
            else:
                r.rolled_back.update(w.id for w in batch)
                r.rollbacks += rolled_back_on_purpose
                r.retried += retried

    def _reconnect(self, conn: Any) -> Any:
        with contextlib.suppress(Exception):
            conn.close()
        with self._lock:
            self.result.reconnects += 1
        return self._connect()

    def _exists(self, ids: list[str], conn: Any) -> bool:
        """Did the transaction holding ``ids`` commit? All or none of them exist."""
        found = self.db.count_ids(conn, self.table, ids)
        assert found in (0, len(ids)), f"{found} of {len(ids)} rows of one transaction exist"
        return found == len(ids)


# ------------------------------------------------------------------------------------------
# Kafka: topic, reading back, checking
# ------------------------------------------------------------------------------------------


def ensure_topic(bootstrap: str, topic: str, partitions: int = 4) -> None:
    """Create ``topic`` with ``partitions`` partitions, or grow it to that many."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="outbox-cdc-acceptance")
    try:
        try:
            admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        except TopicAlreadyExistsError:
            described = admin.describe_topics([topic])
            have = len(described[0]["partitions"])
            if have < partitions:
                admin.create_partitions({topic: NewPartitions(total_count=partitions)})
    finally:
        admin.close()
    # wait until the metadata shows every partition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="outbox-cdc-acceptance")
    try:
        deadline = time.monotonic() + 30
        while len(consumer.partitions_for_topic(topic) or ()) < partitions:
            assert time.monotonic() < deadline, f"topic {topic} has no {partitions} partitions"
            time.sleep(0.1)
            consumer.topics()
    finally:
        consumer.close()


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    expect_ids: Collection[str] = (),
    timeout: float = 60.0,
    settle: float = 0.0,
    isolation_level: str = "read_uncommitted",
) -> list[Any]:
    """Every record of ``topic`` from the beginning, partition by partition in offset order.
    ``isolation_level="read_committed"`` hides records of aborted Kafka transactions.

    Reads until every id in ``expect_ids`` (ce_id header) was seen and every partition's end
    offset (taken at that moment) is reached, then ``settle`` seconds more; or until ``timeout``
    (the caller's checks then show what is missing).
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        client_id="outbox-cdc-acceptance-checker",
        max_poll_records=5000,
        isolation_level=isolation_level,
    )
    deadline = time.monotonic() + timeout
    by_partition: dict[int, list[Any]] = defaultdict(list)
    try:
        while not consumer.partitions_for_topic(topic):
            if time.monotonic() > deadline:
                return []
            time.sleep(0.2)
            consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        missing = set(expect_ids)
        ends: dict[TopicPartition, int] | None = None
        settle_until: float | None = None
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for tp, recs in batch.items():
                by_partition[tp.partition].extend(recs)
                if missing:
                    for rec in recs:
                        missing.discard(header(rec, "ce_id"))
            if missing:
                continue
            if ends is None:
                ends = consumer.end_offsets(tps)
            if all(consumer.position(tp) >= ends[tp] for tp in tps):
                if settle_until is None:
                    settle_until = time.monotonic() + settle
                if time.monotonic() >= settle_until:
                    break
    finally:
        consumer.close()
    return [rec for p in sorted(by_partition) for rec in by_partition[p]]


class Arrivals:
    """Tails ``topic`` from the beginning in a thread and records when each event id (ce_id)
    first arrived (``time.time()``): recovery times after a fault."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="arrivals", daemon=True)
        self._ready = threading.Event()

    def start(self) -> Arrivals:
        self._thread.start()
        assert self._ready.wait(30), "the arrivals consumer did not start"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        # a broker restart may break the consumer: start over from the beginning (ids seen
        # before keep their first time)
        while not self._stop.is_set():
            try:
                self._tail()
            except Exception:
                time.sleep(0.5)

    def _tail(self) -> None:
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            client_id="outbox-cdc-acceptance-arrivals",
            fetch_max_wait_ms=50,
            # a broker that lost unacknowledged records in a crash (a full disk) may move its
            # log end below our position: start over rather than jump to the end
            auto_offset_reset="earliest",
            # kafka-python backs off up to 30 s between reconnections: after a broker restart
            # the arrivals would be seen that much late
            reconnect_backoff_max_ms=500,
        )
        try:
            while not consumer.partitions_for_topic(self.topic):
                time.sleep(0.2)
                consumer.topics()
            tps = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            self._ready.set()
            while not self._stop.is_set():
                for recs in consumer.poll(timeout_ms=100).values():
                    now = time.time()
                    for rec in recs:
                        event_id = header(rec, "ce_id")
                        if event_id is not None:
                            self.first_seen.setdefault(event_id, now)
        finally:
            consumer.close()

    def recovered_after(
        self, since: float, written: Iterable[Written], timeout: float = 30.0
    ) -> float | None:
        """Seconds from ``since`` (``time.time()``) until every event of ``written`` had
        arrived (waiting up to ``timeout`` for the tail to see them); None if one never did."""
        written = list(written)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(w.id not in self.first_seen for w in written):
            time.sleep(0.2)
        last = since
        for w in written:
            seen = self.first_seen.get(w.id)
            if seen is None:
                return None
            last = max(last, seen)
        return last - since


def count_records(bootstrap: str, topic: str) -> int:
    """Records on the topic: sum of end offsets minus beginning offsets."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, client_id="outbox-cdc-acceptance")
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not tps:
            return 0
        ends = consumer.end_offsets(tps)
        begins = consumer.beginning_offsets(tps)
        return sum(ends[tp] - begins[tp] for tp in tps)
    finally:
        consumer.close()


def header(record: Any, name: str) -> str | None:
    for k, v in record.headers:
        if k == name:
            return bytes(v).decode() if v is not None else None
    return None


@dataclass
class CheckResult:
    records: int = 0
    unique: int = 0
    duplicates: int = 0
    missing: list[str] = field(default_factory=list)
    rolled_back_seen: list[str] = field(default_factory=list)
    unknown: int = 0  # records with an id the load generator never wrote
    order_violations: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    partitions_used: int = 0
    keys_in_several_partitions: list[str] = field(default_factory=list)
    copies_by_source: Counter[str] = field(default_factory=Counter)  # redeliveries per source
    duplicate_ids: list[str] = field(default_factory=list)  # one entry per extra copy

    def summary(self) -> str:
        return (
            f"records={self.records} unique={self.unique} duplicates={self.duplicates} "
            f"missing={len(self.missing)} rolled_back_seen={len(self.rolled_back_seen)} "
            f"unknown={self.unknown} order_violations={len(self.order_violations)} "
            f"mismatches={len(self.mismatches)} partitions_used={self.partitions_used} "
            f"keys_in_several_partitions={len(self.keys_in_several_partitions)}"
            + (
                f" redeliveries_by_source={dict(self.copies_by_source)}"
                if self.copies_by_source
                else ""
            )
        )

    def assert_complete(self, *, exactly_once: bool = False) -> None:
        """No loss, nothing rolled back, per-key order of first arrivals, exact content."""
        problems = []
        if self.missing:
            problems.append(
                f"{len(self.missing)} committed events missing, e.g. {self.missing[:5]}"
            )
        if self.rolled_back_seen:
            problems.append(
                f"{len(self.rolled_back_seen)} rolled-back events published, e.g. "
                f"{self.rolled_back_seen[:5]}"
            )
        if self.unknown:
            problems.append(f"{self.unknown} records with unknown ids")
        if self.order_violations:
            problems.append(
                f"{len(self.order_violations)} per-key order violations: "
                f"{self.order_violations[:5]}"
            )
        if self.mismatches:
            problems.append(
                f"{len(self.mismatches)} records differ from what was written: "
                f"{self.mismatches[:5]}"
            )
        if self.keys_in_several_partitions:
            problems.append(f"keys in several partitions: {self.keys_in_several_partitions[:5]}")
        if exactly_once and self.duplicates:
            problems.append(f"{self.duplicates} duplicates in a run that should have none")
        assert not problems, self.summary() + "\n" + "\n".join(problems)


def check(
    records: Iterable[Any],
    load: LoadResult,
    *,
    sources: Collection[str] = ("outbox-cdc",),
) -> CheckResult:
    """Compare the topic with what the load generator wrote. ``records`` must be in partition
    offset order (as :func:`read_topic` returns them); ``sources``: accepted ce_source values."""
    res = CheckResult()
    first: dict[str, Any] = {}
    arrival: dict[str, list[str]] = defaultdict(list)  # key -> ids in order of first arrival
    partitions_of_key: dict[str, set[int]] = defaultdict(set)
    partitions: set[int] = set()
    for rec in records:
        res.records += 1
        event_id = header(rec, "ce_id")
        partitions.add(rec.partition)
        if event_id is None:
            res.unknown += 1
            continue
        if event_id in load.rolled_back:
            res.rolled_back_seen.append(event_id)
            continue
        w = load.committed.get(event_id)
        if w is None:
            res.unknown += 1
            continue
        partitions_of_key[w.key].add(rec.partition)
        if event_id in first:
            res.duplicates += 1
            res.duplicate_ids.append(event_id)
            res.copies_by_source[header(rec, "ce_source") or "?"] += 1
            continue
        first[event_id] = rec
        arrival[w.key].append(event_id)
        problem = _compare(rec, w, sources)
        if problem:
            res.mismatches.append(f"{event_id}: {problem}")
    res.unique = len(first)
    res.partitions_used = len(partitions)
    res.missing = [i for i in load.committed if i not in first]
    res.keys_in_several_partitions = sorted(k for k, p in partitions_of_key.items() if len(p) > 1)
    for key, ids in arrival.items():
        position = {event_id: i for i, event_id in enumerate(load.order[key])}
        highest = -1
        for event_id in ids:
            pos = position[event_id]
            if pos < highest:
                res.order_violations.append(
                    f"key {key}: seq {load.committed[event_id].seq} arrived after seq "
                    f"{load.committed[load.order[key][highest]].seq}"
                )
            highest = max(highest, pos)
    return res


def _compare(rec: Any, w: Written, sources: Collection[str]) -> str | None:
    if rec.key != w.key.encode():
        return f"key {rec.key!r} != {w.key!r}"
    if rec.value != w.payload:
        return f"value {rec.value!r} != {w.payload!r}"
    headers = [(k, bytes(v)) for k, v in rec.headers]
    names = [k for k, _ in headers]
    expected_names = [
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_time",
        "content-type",
        *(k for k, _ in w.headers),
    ]
    if names != expected_names:
        return f"header names {names} != {expected_names}"
    h = dict(headers)
    expected = {
        "ce_specversion": b"1.0",
        "ce_id": w.id.encode(),
        "ce_type": EVENT_TYPE.encode(),
        "content-type": CONTENT_TYPE.encode(),
        **dict(w.headers),
    }
    for name, value in expected.items():
        if h[name] != value:
            return f"header {name} = {h[name]!r}, expected {value!r}"
    if h["ce_source"].decode() not in sources:
        return f"ce_source {h['ce_source']!r} not in {sorted(sources)}"
    ce_time = h["ce_time"].decode()
    if not ce_time.endswith("Z"):
        return f"ce_time {ce_time!r} is not RFC 3339 UTC"
    when = datetime.fromisoformat(ce_time.replace("Z", "+00:00"))
    if when.tzinfo is None or abs(when.timestamp() - w.written_at) > 60:
        written = datetime.fromtimestamp(w.written_at, UTC)
        return f"ce_time {ce_time!r} is not the write time {written}"
    return None


# ------------------------------------------------------------------------------------------
# small utilities
# ------------------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def report(name: str, **figures: object) -> None:
    """One line of figures on stdout (shown with -s or -rA) and in the junit properties."""
    text = " ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[acceptance] {name}: {text}", flush=True)
