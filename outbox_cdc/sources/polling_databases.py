"""The per-database half of the polling source: one connection, the poller lock, and the four
statements polling needs (fetch pending rows, mark or delete delivered rows, clean up old rows).

Each class here does IO and nothing else: no decisions about what to read or when, which live
in :mod:`outbox_cdc.sources.polling`. Driver errors leave as :class:`SourceError` (retriable)
with a one-line message and never the URL (it may hold a password).

Reading rules shared by every database (the reasoning is in docs/polling.md):

* The relay's connection runs in autocommit with READ COMMITTED semantics, so each poll sees
  every transaction committed before it started (a REPEATABLE READ snapshot kept open would
  hide later commits forever).
* Pending rows are found by ``published_at IS NULL``, never by "seq greater than the last one
  read": a transaction that took a lower seq and commits late is still found.
* One poller per table: a lock tied to the connection (advisory lock, ``GET_LOCK``, file lock),
  released by the server or the OS when the relay dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from outbox_cdc.errors import ConfigurationError, SourceError

# seq, id, created_at, topic, key, type, content_type, payload, headers
Row = tuple[Any, ...]

# Mark/delete at most this many seqs per statement (SQLite before 3.32 allows 999 parameters).
_CHUNK = 500


def _describe(exc: BaseException) -> str:
    """One line about a driver error, without the connection string."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def dialect_of(url: str) -> str:
    scheme = url.split(":", 1)[0].split("+", 1)[0].lower()
    dialect = {
        "postgresql": "postgresql",
        "postgres": "postgresql",
        "mysql": "mysql",
        "mariadb": "mysql",
        "sqlite": "sqlite",
    }.get(scheme)
    if dialect is None:
        raise ConfigurationError(
            f"database_url: unsupported scheme {scheme!r}; use postgresql://, mysql://, "
            "mariadb:// or sqlite:///path"
        )
    return dialect


def mysql_connect_args(url: str) -> dict[str, Any]:
    """PyMySQL ``connect()`` arguments from ``mysql://user:password@host:port/db``."""
    u = urlsplit(url)
    database = u.path.lstrip("/")
    if not database:
        raise ConfigurationError(
            "database_url: a MySQL/MariaDB URL needs a database name: mysql://user:pw@host:3306/db"
        )
    return {
        "host": u.hostname or "127.0.0.1",
        "port": u.port or 3306,
        "user": unquote(u.username or ""),
        "password": unquote(u.password or ""),
        "database": unquote(database),
    }


def sqlite_path(url: str) -> str:
    """``sqlite:///relative.db`` -> ``relative.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``
    (SQLAlchemy's form)."""
    path = url.split(":///", 1)[1] if ":///" in url else ""
    if not path or path == ":memory:":
        raise ConfigurationError(
            "database_url: the polling relay needs an SQLite file, e.g. sqlite:////var/lib/app.db "
            "(an in-memory database cannot be shared with the application)"
        )
    return path


class PollingDatabase(Protocol):
    """One connection of the polling source. Contract:

    * ``connect()`` opens the connection (autocommit, READ COMMITTED); ``close()`` releases it
      and with it the lock. Both are idempotent.
    * ``try_lock()`` takes the table's poller lock without waiting: True when this connection
      holds it. ``lock_holder()`` says who holds it, for the standby's log line.
    * ``fetch(limit)`` returns up to ``limit`` rows with ``published_at IS NULL``, in seq order,
      as committed when the statement started.
    * ``mark(seqs)`` sets ``published_at`` on those rows; ``delete(seqs)`` deletes them. Each is
      committed when it returns.
    * ``cleanup(retention, window)`` deletes, among the ``window`` lowest seqs, the rows
      published more than ``retention`` seconds ago; returns how many; committed.
    * ``wake_fd()``: a file descriptor that becomes readable when new rows may be pending
      (PostgreSQL with LISTEN), or None; ``drain_wake()`` consumes what made it readable and
      says whether a new row was announced.
    * ``pending()``: how many rows wait for publication, and the age in seconds of the oldest
      (None when there is none); for ``status`` and metrics, not for the relay's decisions.
    * Every method raises ``SourceError`` when the database fails.
    """

    name: str
    table: str

    def connect(self) -> None: ...

    def try_lock(self) -> bool: ...

    def lock_holder(self) -> str: ...

    def check_table(self) -> list[str]: ...

    def fetch(self, limit: int) -> list[Row]: ...

    def mark(self, seqs: Sequence[int]) -> None: ...

    def delete(self, seqs: Sequence[int]) -> None: ...

    def cleanup(self, retention: float, window: int) -> int: ...

    def pending(self) -> tuple[int, float | None]: ...

    def wake_fd(self) -> int | None: ...

    def drain_wake(self) -> bool: ...

    def close(self) -> None: ...


def lock_key(table: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``table`` (PostgreSQL bigint)."""
    digest = hashlib.blake2b(f"outbox-cdc polling {table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _chunks(seqs: Sequence[int]) -> list[Sequence[int]]:
    return [seqs[i : i + _CHUNK] for i in range(0, len(seqs), _CHUNK)]


class _SqlDatabase:
    """What the three databases share: the statements differ, the steps do not. Subclasses set
    the statements (``{}`` in ``_mark``/``_delete`` is the list of placeholders), ``_ph``, and
    ``_run``, which maps driver errors to SourceError."""

    name = ""
    table = ""
    _ph = "%s"
    _fetch = _mark = _delete = _window = _cleanup = _pending = ""

    def _run(self, what: str, query: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _cleanup_params(self, hi: int, retention: float) -> tuple[Any, ...]:
        return (hi, retention)

    def _age(self, value: Any) -> float:
        return float(value)

    def fetch(self, limit: int) -> list[Row]:
        return list(self._run("reading the outbox", self._fetch, (limit,)).fetchall())

    def _each_chunk(self, what: str, template: str, seqs: Sequence[int]) -> None:
        for chunk in _chunks(seqs):
            self._run(what, template.format(",".join([self._ph] * len(chunk))), chunk)

    def mark(self, seqs: Sequence[int]) -> None:
        self._each_chunk("marking published rows", self._mark, seqs)

    def delete(self, seqs: Sequence[int]) -> None:
        self._each_chunk("deleting published rows", self._delete, seqs)

    def cleanup(self, retention: float, window: int) -> int:
        hi = self._run("cleaning up", self._window, (window,)).fetchone()
        if hi is None or hi[0] is None:
            return 0
        cur = self._run("cleaning up", self._cleanup, self._cleanup_params(hi[0], retention))
        return int(cur.rowcount or 0)

    def pending(self) -> tuple[int, float | None]:
        row = self._run("counting pending rows", self._pending).fetchone()
        return int(row[0]), (None if row[1] is None else max(0.0, self._age(row[1])))

    def wake_fd(self) -> int | None:
        return None

    def drain_wake(self) -> bool:
        return False


# -- PostgreSQL ----------------------------------------------------------------------------------


NOTIFY_CHANNEL = "outbox_cdc"


class PostgresDatabase(_SqlDatabase):
    """``listen``: LISTEN on ``outbox_cdc``, where the trigger of ``outbox-cdc init --polling
    --notify`` sends the table's name after each INSERT statement (sql/postgresql-notify.sql)."""

    name = "PostgreSQL"

    def __init__(
        self, dsn: str, table: str, connect_timeout: float = 10.0, listen: bool = False
    ) -> None:
        self.dsn = dsn
        self.listen = listen
        self.table = table if "." in table else f"public.{table}"
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._key = lock_key(self.table)
        t = self.table
        cols = 'seq, id::text, created_at, topic, "key", type, content_type, payload, headers::text'
        self._fetch = f"SELECT {cols} FROM {t} WHERE published_at IS NULL ORDER BY seq LIMIT %s"
        self._mark = f"UPDATE {t} SET published_at = now() WHERE seq = ANY(%s)"
        self._delete = f"DELETE FROM {t} WHERE seq = ANY(%s)"
        self._window = f"SELECT max(seq) FROM (SELECT seq FROM {t} ORDER BY seq LIMIT %s) w"
        self._cleanup = (
            f"DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE seq <= %s"
            " AND published_at < now() - make_interval(secs => %s) FOR UPDATE SKIP LOCKED)"
        )
        self._pending = (
            "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8"
            f" FROM {t} WHERE published_at IS NULL"
        )

    def _run(self, what: str, query: str, params: Sequence[Any] = ()) -> Any:
        import psycopg

        if self._conn is None:
            raise SourceError("PostgreSQL: not connected")
        try:
            return self._conn.execute(query, params)
        except psycopg.Error as exc:
            raise SourceError(f"{what} failed: {_describe(exc)}") from None

    def connect(self) -> None:
        import psycopg

        from outbox_cdc.sources.keepalive import tcp_timeouts

        self.close()
        try:
            self._conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, int(self.connect_timeout)),
                application_name="outbox-cdc-poller",
                **tcp_timeouts(self.dsn),
            )
        except psycopg.Error as exc:
            raise SourceError(f"cannot connect to PostgreSQL: {_describe(exc)}") from None
        if self.listen:
            self._run("LISTEN", f"LISTEN {NOTIFY_CHANNEL}")

    def wake_fd(self) -> int | None:
        if not self.listen or self._conn is None:
            return None
        return int(self._conn.pgconn.socket)

    def drain_wake(self) -> bool:
        """Read the notifications that arrived while idle (libpq buffers them until asked)."""
        import psycopg

        if self._conn is None:
            return False
        pgconn = self._conn.pgconn
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise SourceError(f"PostgreSQL connection lost: {_describe(exc)}") from None
        ours = False
        while (n := pgconn.notifies()) is not None:
            ours = ours or n.extra.decode(errors="replace") == self.table
        return ours

    def try_lock(self) -> bool:
        row = self._run("taking the poller lock", "SELECT pg_try_advisory_lock(%s)", (self._key,))
        return bool(row.fetchone()[0])

    def lock_holder(self) -> str:
        row = self._run(
            "looking up the poller lock",
            "SELECT l.pid, a.application_name, a.client_addr::text FROM pg_locks l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory'"
            " AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
            (self._key,),
        ).fetchone()
        if row is None:
            return "another relay"
        return f"PID {row[0]} ({row[1] or '?'} from {row[2] or 'local socket'})"

    def check_table(self) -> list[str]:
        row = self._run(
            "looking up the outbox table", "SELECT to_regclass(%s)::oid", (self.table,)
        ).fetchone()
        if row is None or row[0] is None:
            raise SourceError(
                f"table {self.table} does not exist: run 'outbox-cdc init --polling' "
                "(or check OUTBOX_CDC_TABLE); retrying"
            )
        found = self._run(
            "looking up the polling index",
            "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = i.indkey[0] WHERE i.indrelid = %s AND a.attname = 'seq'"
            " AND i.indpred IS NOT NULL",
            (row[0],),
        ).fetchone()
        if found is None:
            return [
                f"table {self.table} has no partial index on seq WHERE published_at IS NULL: "
                "each poll reads the whole table; 'outbox-cdc init --polling' creates it"
            ]
        return []

    def mark(self, seqs: Sequence[int]) -> None:  # one array parameter, whatever the count
        self._run("marking published rows", self._mark, (list(seqs),))

    def delete(self, seqs: Sequence[int]) -> None:
        self._run("deleting published rows", self._delete, (list(seqs),))

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # the server releases the advisory lock with the session
            self._conn = None


# -- MySQL / MariaDB -----------------------------------------------------------------------------


class MySqlDatabase(_SqlDatabase):
    name = "MySQL/MariaDB"

    def __init__(self, url: str, table: str, connect_timeout: float = 10.0) -> None:
        self.args = mysql_connect_args(url)
        self.table = table
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        # GET_LOCK names are at most 64 characters and server-wide: include the database.
        name = f"outbox-cdc:{self.args['database']}.{table}"
        self.lock_name = name if len(name) <= 64 else f"outbox-cdc:{lock_key(name):x}"
        t = table
        cols = "seq, id, created_at, topic, `key`, type, content_type, payload, headers"
        self._fetch = f"SELECT {cols} FROM {t} WHERE published_at IS NULL ORDER BY seq LIMIT %s"
        self._mark = f"UPDATE {t} SET published_at = UTC_TIMESTAMP(6) WHERE seq IN ({{}})"
        self._delete = f"DELETE FROM {t} WHERE seq IN ({{}})"
        self._window = f"SELECT max(seq) FROM (SELECT seq FROM {t} ORDER BY seq LIMIT %s) w"
        self._cleanup = (
            f"DELETE FROM {t} WHERE seq <= %s AND published_at IS NOT NULL"
            " AND published_at < UTC_TIMESTAMP(6) - INTERVAL %s MICROSECOND"
        )
        self._pending = (
            "SELECT count(*), TIMESTAMPDIFF(MICROSECOND, min(created_at), UTC_TIMESTAMP(6))"
            f" FROM {t} WHERE published_at IS NULL"
        )

    def _cleanup_params(self, hi: int, retention: float) -> tuple[Any, ...]:
        return (hi, int(retention * 1_000_000))

    def _age(self, value: Any) -> float:
        return int(value) / 1e6

    def _run(self, what: str, query: str, params: Sequence[Any] = ()) -> Any:
        import pymysql

        if self._conn is None:
            raise SourceError("MySQL/MariaDB: not connected")
        try:
            cur = self._conn.cursor()
            cur.execute(query, tuple(params))
            return cur
        except pymysql.err.Error as exc:
            raise SourceError(f"{what} failed: {_describe(exc)}") from None

    def connect(self) -> None:
        try:
            import pymysql
        except ImportError:
            raise ConfigurationError(
                "database_url: a MySQL/MariaDB database needs the mysql extra: "
                "pip install 'outbox-cdc[mysql]'"
            ) from None
        self.close()
        try:
            self._conn = pymysql.connect(
                **self.args,
                autocommit=True,
                connect_timeout=max(1, int(self.connect_timeout)),
                read_timeout=120,
                write_timeout=120,
                charset="utf8mb4",
                # READ COMMITTED: each statement sees what committed before it, and the
                # clean-up's DELETE takes no gap locks that would block producers' INSERTs.
                init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            )
        except pymysql.err.Error as exc:
            raise SourceError(f"cannot connect to MySQL/MariaDB: {_describe(exc)}") from None

    def try_lock(self) -> bool:
        row = self._run("taking the poller lock", "SELECT GET_LOCK(%s, 0)", (self.lock_name,))
        return bool(row.fetchone()[0] == 1)

    def lock_holder(self) -> str:
        row = self._run(
            "looking up the poller lock", "SELECT IS_USED_LOCK(%s)", (self.lock_name,)
        ).fetchone()
        return f"connection {row[0]}" if row and row[0] is not None else "another relay"

    def check_table(self) -> list[str]:
        row = self._run(
            "looking up the outbox table",
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = DATABASE()"
            " AND table_name = %s",
            (self.table.split(".")[-1],),
        ).fetchone()
        if not row or not row[0]:
            raise SourceError(
                f"table {self.table} does not exist: run 'outbox-cdc init' (or check "
                "OUTBOX_CDC_TABLE); retrying"
            )
        return []

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()  # the server releases GET_LOCK locks with the connection
            self._conn = None


# -- SQLite --------------------------------------------------------------------------------------

_SQLITE_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"


class SqliteDatabase(_SqlDatabase):
    """SQLite has one writer at a time, so commit order is seq order; the poller lock is an
    ``flock`` on ``<database>.outbox-cdc.lock`` (released by the OS when the process dies)."""

    name = "SQLite"
    _ph = "?"

    def __init__(self, path: str, table: str, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.table = table
        self.busy_timeout = busy_timeout
        self.lock_path = f"{path}.outbox-cdc.lock"
        self._conn: sqlite3.Connection | None = None
        self._lock_fd = -1
        t = table
        cols = 'seq, id, created_at, topic, "key", type, content_type, payload, headers'
        self._fetch = f"SELECT {cols} FROM {t} WHERE published_at IS NULL ORDER BY seq LIMIT ?"
        self._mark = f"UPDATE {t} SET published_at = {_SQLITE_NOW} WHERE seq IN ({{}})"
        self._delete = f"DELETE FROM {t} WHERE seq IN ({{}})"
        self._window = f"SELECT max(seq) FROM (SELECT seq FROM {t} ORDER BY seq LIMIT ?)"
        self._cleanup = (
            f"DELETE FROM {t} WHERE seq <= ? AND published_at IS NOT NULL"
            " AND published_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?)"
        )
        self._pending = (
            "SELECT count(*), (julianday('now') - julianday(min(created_at))) * 86400.0"
            f" FROM {t} WHERE published_at IS NULL"
        )

    def _cleanup_params(self, hi: int, retention: float) -> tuple[Any, ...]:
        return (hi, f"-{retention:.3f} seconds")

    def _run(self, what: str, query: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        if self._conn is None:
            raise SourceError("SQLite: not connected")
        try:
            return self._conn.execute(query, tuple(params))
        except sqlite3.Error as exc:
            raise SourceError(f"{what} failed: {_describe(exc)}") from None

    def connect(self) -> None:
        self.close()
        if not os.path.exists(self.path):
            raise SourceError(
                f"SQLite database {self.path} does not exist: run 'outbox-cdc init'; retrying"
            )
        try:
            # isolation_level=None: autocommit, each statement is its own transaction
            self._conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            # SQLite lets invalid UTF-8 into TEXT; sqlite3 would fail the whole fetch on it.
            # Such a value comes back as bytes and makes its row undecodable (a poison row).
            self._conn.text_factory = _text_or_bytes
        except sqlite3.Error as exc:
            raise SourceError(f"cannot open SQLite database: {_describe(exc)}") from None

    def try_lock(self) -> bool:
        import fcntl

        if self._lock_fd < 0:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            return False
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())
        return True

    def lock_holder(self) -> str:
        try:
            with open(self.lock_path) as f:
                pid = f.read().strip()
        except OSError:
            pid = ""
        return f"PID {pid}" if pid else "another relay"

    def check_table(self) -> list[str]:
        row = self._run(
            "looking up the outbox table",
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?",
            (self.table.split(".")[-1],),
        ).fetchone()
        if not row or not row[0]:
            raise SourceError(
                f"table {self.table} does not exist in {self.path}: run 'outbox-cdc init'; retrying"
            )
        return []

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


def _text_or_bytes(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def open_database(
    url: str, table: str, connect_timeout: float = 10.0, listen: bool = False
) -> PollingDatabase:
    """The adapter for ``url``'s database (not connected yet). ``listen``: PostgreSQL only."""
    dialect = dialect_of(url)
    if listen and dialect != "postgresql":
        raise ConfigurationError(
            f"poll_notify: LISTEN/NOTIFY exists on PostgreSQL only, not {dialect}; unset it"
        )
    if dialect == "postgresql":
        scheme, rest = url.split(":", 1)
        dsn = "postgresql:" + rest if "+" in scheme else url
        return PostgresDatabase(dsn, table, connect_timeout, listen)
    if dialect == "mysql":
        return MySqlDatabase(url, table, connect_timeout)
    return SqliteDatabase(sqlite_path(url), table, busy_timeout=max(5.0, connect_timeout * 3))
