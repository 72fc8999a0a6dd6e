"""The polling relay against the WAL relay on the same PostgreSQL and Kafka, in one run; and the
polling relay's figures on MariaDB and SQLite.

    scripts/services.sh up && . ./.services.env && .venv/bin/python benchmarks/polling.py

Built on relay.py (same relay subprocess, consumer process, paced producer, backlog watcher and
/proc figures); see benchmarks/README.md, "Polling vs WAL". One run, one variant after the
other (never two at once: they would compete for the CPUs), each with its own table and topic
(``bench_<random>``, created with ``outbox-cdc init`` and removed at the end):

=========================== ======== ========================================= ================
variant                     database relay                                     measured
=========================== ======== ========================================= ================
postgresql-wal              PG       WAL (wal2json slot)                       latency, backlog
postgresql-polling-mark     PG       polling, default retention (rows marked)  latency, backlog
postgresql-polling-delete   PG       polling, retention 0 (rows deleted)       backlog
postgresql-polling-notify   PG       polling, init --notify, poll_notify=true  latency
mariadb-polling-mark        MariaDB  polling, default retention                latency, backlog
mariadb-polling-delete      MariaDB  polling, retention 0                      backlog
sqlite-polling-mark         SQLite   polling, default retention                latency, backlog
sqlite-polling-delete       SQLite   polling, retention 0                      backlog
=========================== ======== ========================================= ================

latency: commit -> consume at a paced rate (500 events/s, 20 s, one event per transaction);
backlog: drain rate of a backlog of one-row transactions (100,000) committed while the relay is
stopped, the relay's CPU per 1,000 events and peak RSS. Every variant is compared with
postgresql-wal (polling / WAL), which is a like-for-like comparison only for the PostgreSQL
variants. Output: a table and benchmarks/results/polling.json (polling.failed.json if a variant
failed or was disturbed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import psycopg
import relay as rb

from outbox_cdc.sources.polling_databases import lock_key, mysql_connect_args

POLLING_ENV_DROPPED = ("OUTBOX_CDC_SLOT", "OUTBOX_CDC_CREATE_SLOT")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    dialect: str  # postgresql | mysql | sqlite
    mode: str = "polling"  # wal | polling
    retention: float | None = None  # None: the relay's default (7 days: rows are marked)
    latency: bool = True  # the latency run
    backlog: bool = True  # the backlog run
    notify: bool = False  # PostgreSQL polling: init --notify and poll_notify = true


VARIANTS = [
    Variant("postgresql-wal", "PostgreSQL WAL", "postgresql", mode="wal"),
    Variant("postgresql-polling-mark", "PostgreSQL polling, mark", "postgresql"),
    Variant("postgresql-polling-delete", "PostgreSQL polling, delete", "postgresql", retention=0,
            latency=False),
    Variant("postgresql-polling-notify", "PostgreSQL polling, NOTIFY", "postgresql", notify=True,
            backlog=False),
    Variant("mariadb-polling-mark", "MariaDB polling, mark", "mysql"),
    Variant("mariadb-polling-delete", "MariaDB polling, delete", "mysql", retention=0,
            latency=False),
    Variant("sqlite-polling-mark", "SQLite polling, mark", "sqlite"),
    Variant("sqlite-polling-delete", "SQLite polling, delete", "sqlite", retention=0,
            latency=False),
]  # fmt: skip
BASELINE = "postgresql-wal"


class ClosingSqliteConnection(sqlite3.Connection):
    """``with conn:`` closes it (a plain sqlite3 connection only commits)."""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> Literal[False]:
        super().__exit__(exc_type, exc, tb)
        self.close()
        return False


@dataclass
class PollingBench(rb.Bench):
    """relay.Bench with the polling relay on PostgreSQL, MariaDB/MySQL or SQLite."""

    dialect: str = "postgresql"
    retention: float | None = None
    notify: bool = False
    workdir: str | None = None  # SQLite: the directory holding the database file

    @classmethod
    def create(cls, a: argparse.Namespace, v: Variant) -> PollingBench:
        if v.dialect == "sqlite":
            workdir = tempfile.mkdtemp(prefix="outbox-cdc-bench-")
            url = f"sqlite:///{workdir}/bench.db"  # absolute path: sqlite:////tmp/...
            return cls(a, url, url, a.bootstrap_servers, dialect="sqlite",
                       retention=v.retention, workdir=workdir)  # fmt: skip
        url = a.mysql_url if v.dialect == "mysql" else a.database_url
        admin = a.mysql_url if v.dialect == "mysql" else a.admin_url
        return cls(a, url, admin, a.bootstrap_servers, dialect=v.dialect,
                   retention=v.retention, notify=v.notify)  # fmt: skip

    @property
    def table(self) -> str:
        return f"public.{self.name}" if self.dialect == "postgresql" else self.name

    @property
    def sqlite_path(self) -> str:
        return self.db_url.split(":///", 1)[1]

    # -- setup and cleanup --------------------------------------------------------------------

    def init_args(self) -> list[str]:
        if self.dialect != "postgresql":
            return []
        return ["--polling", "--notify"] if self.notify else ["--polling"]

    def setup(self) -> None:
        super().setup()
        if self.dialect == "sqlite":
            # recommended for the polling relay (docs/polling.md): the relay reads while the
            # application writes; the mode is stored in the file
            with contextlib.closing(sqlite3.connect(self.sqlite_path)) as conn:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.results["sqlite_settings"] = {
                "journal_mode": mode,
                "file": self.sqlite_path,
                "synchronous": "FULL (default) for the latency run's producer; OFF for the "
                "backlog load; the relay's connection: default",
            }

    def database_objects(self) -> str:
        if self.dialect == "sqlite":
            return f"nothing (the file goes with {self.workdir})"
        return f"table {self.table}"

    def _cleanup_database(self) -> None:
        if self.dialect == "postgresql":
            super()._cleanup_database()  # no slot to drop; the table and its schema row
        elif self.dialect == "mysql":
            with contextlib.closing(self.connect(autocommit=True)) as conn, conn.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {self.name}")
                cur.execute("DELETE FROM outbox_cdc_schema WHERE table_name = %s", (self.name,))

    def cleanup(self) -> None:
        super().cleanup()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            rb.log(f"cleanup: removed {self.workdir}")

    def _cleanup_failed(self, exc: BaseException) -> None:
        if self.dialect == "postgresql":
            super()._cleanup_failed(exc)
        else:
            rb.log(f"cleanup failed: {exc!r}. By hand: DROP TABLE {self.table};")

    # -- relay and connections ------------------------------------------------------------------

    def relay_env(self) -> dict[str, str]:
        env = {k: v for k, v in super().relay_env().items() if k not in POLLING_ENV_DROPPED}
        if self.dialect == "postgresql":
            env["OUTBOX_CDC_MODE"] = "polling"
        if self.notify:
            env["OUTBOX_CDC_POLL_NOTIFY"] = "true"
        if self.retention is not None:
            env["OUTBOX_CDC_RETENTION"] = f"{self.retention:g}"
        env.update(self.args.relay_env)
        return env

    def connect(self, **kwargs: Any) -> Any:
        if self.dialect == "postgresql":
            return super().connect(**kwargs)
        if self.dialect == "mysql":
            import pymysql

            return pymysql.connect(
                **mysql_connect_args(self.db_url),
                autocommit=kwargs.get("autocommit", False),
                charset="utf8mb4",
            )
        conn = sqlite3.connect(self.sqlite_path, timeout=30, factory=ClosingSqliteConnection)
        if kwargs.get("autocommit"):
            conn.isolation_level = None
        return conn

    def epochs(self) -> dict[str, str | None]:
        if self.dialect == "postgresql":
            return super().epochs()
        out = rb.service_epochs(None)
        out["database"] = "MariaDB" if self.dialect == "mysql" else "SQLite"
        if self.dialect == "mysql":
            pid = self._mariadb_pid()
            out["database_started"] = rb.process_epoch(pid) if pid else None
        return out

    def _mariadb_pid(self) -> int | None:
        try:
            with contextlib.closing(self.connect(autocommit=True)) as conn, conn.cursor() as cur:
                cur.execute("SELECT @@pid_file")
                return int(Path(cur.fetchone()[0]).read_text().strip())
        except Exception:
            return None

    relay_session = "the relay's PostgreSQL session"

    def relay_session_pid(self, conn: psycopg.Connection[Any]) -> int | None:
        """The backend holding the table's poller lock (an advisory lock)."""
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND"
            " ((classid::bigint << 32) | objid::bigint) = %s",
            (lock_key(self.table),),
        ).fetchone()
        return row[0] if row else None

    def database_cpu_mark(self) -> Any:
        if self.dialect != "mysql":
            return None
        pid = self._mariadb_pid()
        stats = rb.proc_stats(pid) if pid else None
        return (pid, stats["cpu_s"]) if stats else None

    def database_cpu(self, mark: Any) -> dict[str, Any]:
        if self.dialect == "postgresql":
            return super().database_cpu(mark)
        if self.dialect == "mysql" and mark:
            stats = rb.proc_stats(mark[0])
            if stats:
                return {
                    "database_cpu_s": round(stats["cpu_s"] - mark[1], 2),
                    "database_cpu_what": "the whole mariadbd process while the relay ran "
                    "(every client, not only the relay)",
                }
        return {}  # SQLite: the relay does the database's work itself (in its CPU)

    def database_environment(self) -> dict[str, Any]:
        if self.dialect == "postgresql":
            return super().database_environment()
        if self.dialect == "mysql":
            import pymysql

            names = (
                "version",
                "innodb_flush_log_at_trx_commit",
                "sync_binlog",
                "log_bin",
                "innodb_buffer_pool_size",
                "tx_isolation",
            )
            with contextlib.closing(self.connect(autocommit=True)) as conn, conn.cursor() as cur:
                cur.execute("SELECT " + ", ".join(f"@@{n}" for n in names))
                settings = dict(zip(names, cur.fetchone(), strict=True))
            self.results["mariadb_settings"] = settings
            return {"mariadb": settings["version"], "pymysql": pymysql.__version__}
        return {"sqlite": sqlite3.sqlite_version}  # its settings: see setup()

    # -- backlog load ---------------------------------------------------------------------------

    def load_method(self) -> str:
        if self.dialect == "mysql":
            return f"{self.args.backlog_writers} writers, server-side loop, COMMIT per row"
        if self.dialect == "sqlite":
            return "1 writer, an autocommit INSERT per row, synchronous=OFF"
        return super().load_method()

    def load_backlog(self, count: int, writers: int) -> dict[str, Any]:
        if self.dialect == "postgresql":
            return super().load_backlog(count, writers)
        a = self.args
        t0 = time.monotonic()
        if self.dialect == "mysql":
            self._load_mysql(count, writers)
        else:
            self._load_sqlite(count)
        load_s = time.monotonic() - t0
        with contextlib.closing(self.connect(autocommit=True)) as conn:
            cur = conn.cursor()
            cur.execute(f"SELECT count(*) FROM {self.name} WHERE type = 'bench.backlog'")
            rows = cur.fetchone()[0]
        return {
            "load_s": round(load_s, 2),
            "load_rate_per_s": round(count / load_s, 1),
            "rows": rows,
            # not checkable here as on PostgreSQL (xmin): each row is its own autocommit
            # statement followed by COMMIT
            "distinct_transactions": None,
            "method": self.load_method(),
            "payload_pad": a.payload_pad,
        }  # fmt: skip

    def _load_mysql(self, count: int, writers: int) -> None:
        a = self.args
        shares = [count // writers + (1 if i < count % writers else 0) for i in range(writers)]
        errors: list[BaseException] = []

        def write(share: int, start: int) -> None:
            try:
                with contextlib.closing(self.connect(autocommit=True)) as conn:
                    topic = conn.escape(self.topic)
                    # one row, one transaction: MariaDB's anonymous block, COMMIT after each
                    stmt = (
                        f"BEGIN NOT ATOMIC DECLARE i BIGINT DEFAULT {start}; "
                        f"WHILE i < {start + share} DO "
                        f"INSERT INTO {self.name} (id, topic, `key`, type, content_type, "
                        "payload, headers) VALUES (UUID(), "
                        f"{topic}, CONCAT('k', i % {a.keys}), 'bench.backlog', "
                        "'application/json', CONCAT('{\"n\":', i, ',\"pad\":\"', "
                        f"REPEAT('x', {a.payload_pad}), '\"}}'), '{{}}'); "
                        "COMMIT; SET i = i + 1; END WHILE; END"
                    )
                    conn.cursor().execute(stmt)
            except BaseException as exc:
                errors.append(exc)

        threads = []
        start = 0
        for share in shares:
            threads.append(threading.Thread(target=write, args=(share, start)))
            start += share
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"backlog load failed: {errors[0]!r}") from errors[0]

    def _load_sqlite(self, count: int) -> None:
        # SQLite has one writer at a time: one connection
        a = self.args
        pad = "x" * a.payload_pad
        stmt = (
            f'INSERT INTO {self.name} (id, topic, "key", type, content_type, payload, headers)'
            " VALUES (?, ?, ?, 'bench.backlog', 'application/json', ?, '{}')"
        )
        with self.connect(autocommit=True) as conn:
            conn.execute("PRAGMA synchronous=OFF")
            for i in range(count):
                payload = f'{{"n":{i},"pad":"{pad}"}}'.encode()
                conn.execute(stmt, (str(uuid.uuid4()), self.topic, f"k{i % a.keys}", payload))


# -- comparison ------------------------------------------------------------------------------------


def div(x: Any, y: Any) -> float | None:
    return round(x / y, 2) if x and y else None


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    lat = r.get("latency") or {}
    c = lat.get("commit_to_consume") or {}
    b = r.get("backlog") or {}

    def per_1000(us_per_event: Any) -> float | None:
        # us per event * 1000 events = ms per 1,000 events; / 1000 = seconds
        return None if us_per_event is None else round(us_per_event / 1000, 3)

    return {
        "status": r.get("status"),
        "latency": None
        if not lat
        else {
            "achieved_rate_per_s": lat.get("achieved_rate_per_s"),
            "events_measured": lat.get("events_measured"),
            "missing_after_settle": lat.get("missing_after_settle"),
            "duplicates": lat.get("duplicates"),
            "p50_ms": c.get("p50_ms"),
            "p90_ms": c.get("p90_ms"),
            "p99_ms": c.get("p99_ms"),
            "max_ms": c.get("max_ms"),
            "relay_cpu_percent_of_one_core": lat.get("relay_cpu_percent_of_one_core"),
            "machine_cpu_busy_percent": lat.get("machine_cpu_busy_percent"),
            "disturbed": lat.get("disturbed"),
        },
        "backlog": None
        if not b
        else {
            "events": b.get("events"),
            "completed": b.get("completed"),
            "delivered": b.get("delivered"),
            "load_rate_per_s": (b.get("load") or {}).get("load_rate_per_s"),
            "seconds_spawn_to_all_in_kafka": b.get("seconds_spawn_to_all_in_kafka"),
            "drain_events_per_s": b.get("events_per_s_incl_startup"),
            "drain_events_per_s_after_first": b.get("events_per_s_after_first"),
            "peak_1s_events_per_s": b.get("peak_1s_events_per_s"),
            "relay_cpu_s": b.get("relay_cpu_s"),
            "relay_cpu_s_per_1000_events": per_1000(b.get("relay_cpu_us_per_event")),
            "relay_cpu_s_per_1000_events_after_first": per_1000(
                b.get("relay_cpu_us_per_event_after_first")
            ),
            "database_cpu_s_per_1000_events": per_1000(b.get("database_cpu_us_per_event")),
            "database_cpu_what": b.get("database_cpu_what"),
            "relay_peak_rss_mib": b.get("relay_peak_rss_mib"),
            "machine_cpu_busy_percent": b.get("machine_cpu_busy_percent"),
            "disturbed": b.get("disturbed"),
        },
    }


def ratios(s: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    """This variant / the WAL relay on PostgreSQL."""
    lat, blat = s.get("latency") or {}, base.get("latency") or {}
    b, bb = s.get("backlog") or {}, base.get("backlog") or {}
    return {
        "drain_rate": div(b.get("drain_events_per_s"), bb.get("drain_events_per_s")),
        "drain_rate_after_first": div(
            b.get("drain_events_per_s_after_first"), bb.get("drain_events_per_s_after_first")
        ),
        "relay_cpu_per_event": div(
            b.get("relay_cpu_s_per_1000_events"), bb.get("relay_cpu_s_per_1000_events")
        ),
        "latency_p50": div(lat.get("p50_ms"), blat.get("p50_ms")),
        "latency_p99": div(lat.get("p99_ms"), blat.get("p99_ms")),
    }


def f3(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_tables(result: dict[str, Any], out: Path) -> None:
    f = rb.fmt
    summary, ratio = result["summary"], result["ratio_to_postgresql_wal"]
    labels = {v.key: v.label for v in VARIANTS}
    p = result["parameters"]
    print(
        f"\nbacklog: {p['backlog']:,} one-row transactions, ~{p['payload_pad'] + 20}-byte "
        f"payloads, {p['keys']:,} keys; kafka client {p['kafka_client']}; relay started after "
        "the load"
    )
    head = (
        f"{'':28} {'drain/s':>9} {'after 1st':>9} {'x WAL':>6} {'CPU s/1k':>9} "
        f"{'x WAL':>6} {'DB s/1k':>8} {'RSS MiB':>8} {'all in':>7}"
    )
    print(head)
    for key, s in summary.items():
        b = s.get("backlog")
        if not b:
            continue
        rt = ratio.get(key) or {}
        print(
            f"{labels[key]:28} {f(b.get('drain_events_per_s')):>9} "
            f"{f(b.get('drain_events_per_s_after_first')):>9} {f(rt.get('drain_rate')):>6} "
            f"{f3(b.get('relay_cpu_s_per_1000_events')):>9} "
            f"{f(rt.get('relay_cpu_per_event')):>6} "
            f"{f3(b.get('database_cpu_s_per_1000_events')):>8} "
            f"{f(b.get('relay_peak_rss_mib')):>8} "
            f"{f(b.get('seconds_spawn_to_all_in_kafka'), ' s'):>7}"
        )
    print(
        f"\nlatency: commit -> consume, {p['rate']:g} events/s for {p['seconds']:g} s "
        f"(first {p['warmup']:g} s not measured)"
    )
    print(
        f"{'':28} {'rate/s':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'p50 xWAL':>8} {'p99 xWAL':>8} {'relay CPU':>9} {'missing':>7}"
    )
    for key, s in summary.items():
        lat = s.get("latency")
        if not lat:
            continue
        rt = ratio.get(key) or {}
        print(
            f"{labels[key]:28} {f(lat.get('achieved_rate_per_s')):>7} "
            f"{f(lat.get('p50_ms')):>7} {f(lat.get('p90_ms')):>7} {f(lat.get('p99_ms')):>7} "
            f"{f(lat.get('max_ms')):>7} {f(rt.get('latency_p50')):>8} "
            f"{f(rt.get('latency_p99')):>8} "
            f"{f(lat.get('relay_cpu_percent_of_one_core'), '%'):>9} "
            f"{f(lat.get('missing_after_settle')):>7}"
        )
    print(
        "\nx WAL = this / PostgreSQL WAL, same run (like for like only for PostgreSQL rows). "
        "CPU s/1k = relay CPU seconds per 1,000 events (incl. startup); DB s/1k = the "
        "database server's (PostgreSQL: the relay's session; MariaDB: the whole server; "
        "SQLite: in the relay)."
    )
    for key, s in summary.items():
        for phase in ("latency", "backlog"):
            for d in (s.get(phase) or {}).get("disturbed") or []:
                print(f"! {key} {phase} disturbed: {d[:200]}")
        if s["status"] != "ok":
            print(f"! {key}: {s['status']}")
    print(f"\nJSON: {out}")


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[Variant]]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--variants",
        default=",".join(v.key for v in VARIANTS),
        help="comma-separated, in this order; postgresql-wal is the baseline of the ratios",
    )
    p.add_argument("--seconds", type=float, default=20, help="latency run length (0 = skip)")
    p.add_argument("--rate", type=float, default=500, help="latency run: events/s")
    p.add_argument("--backlog", type=int, default=100_000, help="backlog: one-row transactions")
    p.add_argument("--backlog-writers", type=int, default=2, help="backlog: writer connections")
    p.add_argument("--keys", type=int, default=10_000, help="distinct record keys")
    p.add_argument(
        "--payload-pad",
        type=int,
        default=236,
        help='padding in the JSON payload; 236 makes {"n":12345,"pad":"x..."} 256 bytes',
    )
    p.add_argument("--kafka-client", choices=rb.BACKENDS, default="kafka-python")
    p.add_argument("--drain-timeout", type=float, default=300)
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a disturbed variant again (a database or Kafka restart, relay errors) up "
        "to this many times; the disturbed attempts stay in the JSON",
    )
    p.add_argument(
        "--relay-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra OUTBOX_CDC_* setting for every relay (repeatable), e.g. "
        "OUTBOX_CDC_POLL_INTERVAL=0.05",
    )
    p.add_argument(
        "--relay-command",
        default="",
        help="run the relays with this command instead of `outbox-cdc start` (see relay.py)",
    )
    p.add_argument("--mysql-url", default=os.environ.get("OUTBOX_CDC_TEST_MYSQL_URL"))
    p.add_argument("--database-url", default=os.environ.get("OUTBOX_CDC_TEST_POSTGRES_URL"))
    p.add_argument("--admin-url", default=os.environ.get("OUTBOX_CDC_TEST_POSTGRES_ADMIN_URL"))
    p.add_argument(
        "--bootstrap-servers", default=os.environ.get("OUTBOX_CDC_TEST_KAFKA_BOOTSTRAP_SERVERS")
    )
    p.add_argument("--output", type=Path, default=rb.RESULTS / "polling.json")
    p.add_argument("--log", type=Path, default=rb.RESULTS / "polling.log")
    o = p.parse_args(argv)
    by_key = {v.key: v for v in VARIANTS}
    chosen = []
    for key in filter(None, (k.strip() for k in o.variants.split(","))):
        if key not in by_key:
            p.error(f"--variants: unknown {key!r}; known: {', '.join(by_key)}")
        chosen.append(by_key[key])
    if any(v.dialect == "mysql" for v in chosen) and not o.mysql_url:
        p.error("MariaDB variants need --mysql-url (or OUTBOX_CDC_TEST_MYSQL_URL)")
    # relay.py's options (its defaults for everything not set here)
    base = [
        *("--seconds", str(o.seconds), "--rate", str(o.rate), "--warmup", "2"),
        *("--backlog", str(o.backlog), "--backlog-writers", str(o.backlog_writers)),
        *("--burst", "0", "--keys", str(o.keys), "--payload-pad", str(o.payload_pad)),
        *("--kafka-client", o.kafka_client, "--drain-timeout", str(o.drain_timeout)),
        *("--log", str(o.log), "--output", str(o.output)),
    ]
    for opt in ("database_url", "admin_url", "bootstrap_servers"):
        if getattr(o, opt):
            base += [f"--{opt.replace('_', '-')}", getattr(o, opt)]
    if o.relay_command:
        base += ["--relay-command", o.relay_command]
    for item in o.relay_env:
        base += ["--relay-env", item]
    a = rb.parse_args(base)
    a.mysql_url = o.mysql_url
    a.retries = o.retries
    a.variants = [v.key for v in chosen]
    return a, chosen


def run_variant(a: argparse.Namespace, v: Variant) -> tuple[dict[str, Any], int]:
    """One variant, on its own table and topic: its results and status (0 ok, 1 failed, 2
    disturbed)."""
    rb.log(f"=== {v.key} ===")
    args = argparse.Namespace(**vars(a))
    if not v.latency:
        args.seconds = 0
    if not v.backlog:
        args.backlog = 0
    bench = (
        PollingBench.create(args, v)
        if v.mode == "polling"
        else rb.Bench(args, a.database_url, a.admin_url, a.bootstrap_servers)
    )
    r, st, _ = rb.run_bench(args, write=False, bench=bench)
    r["variant"] = {"key": v.key, "label": v.label, "dialect": v.dialect, "mode": v.mode,
                    "retention": v.retention, "notify": v.notify}  # fmt: skip
    if v.mode == "polling":
        r["names"].pop("slot", None)
        r["benchmark"] = f"outbox-cdc polling relay, end to end ({v.label} -> Kafka)"
        env = bench.relay_env()
        r["relay_settings"] = {
            k: env[k] for k in sorted(env) if k.startswith("OUTBOX_CDC_") and "URL" not in k
        }
    return r, st


def main(argv: list[str] | None = None) -> int:
    a, variants = parse_args(argv)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    status = 0
    t_start = time.monotonic()
    for v in variants:
        r, st = run_variant(a, v)
        disturbed_attempts: list[dict[str, Any]] = []
        while st == 2 and len(disturbed_attempts) < a.retries:
            # a restart of a service (other people's fault-injection tests) or relay errors:
            # these figures are not comparable; keep what happened, and measure again
            disturbed_attempts.append({"date": r.get("date"), **summarize(r)})
            rb.log(f"{v.key} disturbed: again ({len(disturbed_attempts)}/{a.retries})")
            r, st = run_variant(a, v)
        if disturbed_attempts:
            r["disturbed_attempts"] = disturbed_attempts
        runs[v.key] = r
        status = max(status, st)
    summary = {key: summarize(r) for key, r in runs.items()}
    base = summary.get(BASELINE) or {}
    ratio = {key: ratios(s, base) for key, s in summary.items() if key != BASELINE}
    first = next(iter(runs.values()), {})
    versions = dict(first.get("versions") or {})
    for r in runs.values():
        for k, val in (r.get("versions") or {}).items():
            versions.setdefault(k, val)
    result = {
        "benchmark": "outbox-cdc polling relay vs WAL relay (same PostgreSQL, same Kafka); "
        "polling on MariaDB and SQLite",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": "ok" if status == 0 else ("disturbed" if status == 2 else "failed (see runs)"),
        "total_seconds": round(time.monotonic() - t_start, 1),
        "host": first.get("host"),
        "versions": versions,
        "parameters": {**(first.get("parameters") or {}), "variants": a.variants},
        "summary": summary,
        "ratio_to_postgresql_wal": ratio,
        "runs": runs,
    }
    out = a.output if status == 0 else a.output.with_name(a.output.stem + ".failed.json")
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_tables(result, out)
    if status:
        print(f"status: {result['status']}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
