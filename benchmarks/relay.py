"""End-to-end benchmark of the WAL relay on a real PostgreSQL and a real Kafka.

    scripts/services.sh up && . ./.services.env && .venv/bin/python benchmarks/relay.py

Three measurements, each against its own table, slot and topic (``bench_<random>``, created with
``outbox-cdc init`` and removed at the end, also on failure), with ``outbox-cdc start`` running
as a subprocess exactly as in production:

1. latency: a paced producer commits one event per transaction at a steady rate (1,000/s) while
   a consumer reads the topic; per event: commit-to-consume latency and relay pickup
   (the record's Kafka timestamp minus the commit time).
2. backlog: with the relay stopped, commit a backlog of one-row transactions, then start the
   relay and time how long until all of them are in Kafka; the relay's peak RSS and CPU time.
3. burst: while the relay runs, commit a burst of events from several threads as fast as they
   go; time until all of them are in Kafka.

Figures are printed as a table and written as JSON to benchmarks/results/relay.json (a failed
run goes to relay.failed.json instead). See benchmarks/README.md for what each figure means.

``--compare-backends`` runs the backlog drain once per Kafka client (kafka-python, then
confluent-kafka; each with its own table, slot and topic) and writes the drain rates, the relay's
CPU per 1,000 events and their ratios to benchmarks/results/relay-backends.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, UnknownTopicOrPartitionError
from psycopg import sql

from outbox_cdc import Outbox

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
BACKENDS = ("kafka-python", "confluent")
CLIENT_ENV = "OUTBOX_CDC_KAFKA_CLIENT"
STREAMING_RE = re.compile(r"\bstreaming (?:slot \S+ )?from\b")


# -- small helpers --------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(values_s: list[float]) -> dict[str, Any]:
    v = sorted(values_s)
    if not v:
        return {"count": 0}
    return {
        "count": len(v),
        "min_ms": round(v[0] * 1000, 2),
        "avg_ms": round(sum(v) / len(v) * 1000, 2),
        "p50_ms": round(percentile(v, 50) * 1000, 2),
        "p90_ms": round(percentile(v, 90) * 1000, 2),
        "p99_ms": round(percentile(v, 99) * 1000, 2),
        "max_ms": round(v[-1] * 1000, 2),
    }


def proc_stats(pid: int) -> dict[str, float] | None:
    """CPU seconds (user+system, all threads) and memory of a live process, from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    utime, stime = int(fields[11]), int(fields[12])
    mem = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            mem[name] = int(value.split()[0]) / 1024  # kB -> MiB
    return {
        "cpu_user_s": utime / CLK_TCK,
        "cpu_system_s": stime / CLK_TCK,
        "cpu_s": (utime + stime) / CLK_TCK,
        "peak_rss_mib": round(mem.get("VmHWM", math.nan), 1),
        "rss_mib": round(mem.get("VmRSS", math.nan), 1),
    }


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of all CPUs busy between two cpu_times() (everyone: relay, services, others)."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total * 100, 1) if total > 0 else None


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pkg_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def librdkafka_version() -> str:
    try:
        import confluent_kafka
    except ImportError:
        return "not installed"
    return str(confluent_kafka.libversion()[0])


def kafka_home() -> Path:
    cache = Path(os.environ.get("OUTBOX_CDC_CACHE", Path.home() / ".cache" / "outbox-cdc"))
    return cache / "kafka"


def process_epoch(pid: int) -> str | None:
    """``pid N, start T`` (T: its start time in clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"pid {pid}, start {stat[stat.rindex(')') + 2 :].split()[19]}"


def service_epochs(db_url: str | None) -> dict[str, str | None]:
    """What identifies the running PostgreSQL and Kafka: a change between the start and the end
    of a phase means a restart in between (other people's fault-injection tests do that).
    ``db_url`` None: only Kafka (the caller fills in its own database)."""
    out: dict[str, str | None] = {
        "database": "PostgreSQL",
        "database_started": None,
        "kafka_process": None,
    }
    if db_url is not None:
        try:
            with psycopg.connect(db_url, connect_timeout=5) as conn:
                row = conn.execute("SELECT pg_postmaster_start_time()::text").fetchone()
                out["database_started"] = row[0] if row else None
        except psycopg.Error:
            pass
    with contextlib.suppress(OSError, ValueError):
        out["kafka_process"] = process_epoch(int((kafka_home() / "kafka.pid").read_text()))
    return out


def disturbances(
    before: dict[str, str | None], after: dict[str, str | None], relay_errors: list[str]
) -> list[str]:
    found = []
    if before["database_started"] != after["database_started"]:
        found.append(
            f"{before['database']} restarted (server start {before['database_started']} -> "
            f"{after['database_started']})"
        )
    if before["kafka_process"] != after["kafka_process"]:
        found.append(
            f"Kafka broker restarted ({before['kafka_process']} -> {after['kafka_process']})"
        )
    if relay_errors:
        found.append(f"relay logged {len(relay_errors)} error lines, first: {relay_errors[0]}")
    return found


def kafka_version(api_version: Any) -> str:
    """The broker's release, from the jars scripts/services.sh installed (the protocol does not
    tell it); else kafka-python's guess from the API versions."""
    for pattern in ("kafka-server-[0-9]*.jar", "kafka_2.*-[0-9]*.jar", "kafka-clients-[0-9]*.jar"):
        for jar in sorted((kafka_home() / "lib").glob(pattern)):
            m = re.search(r"-(\d+\.\d+\.\d+[^/]*?)\.jar$", jar.name)
            if m:
                return m.group(1)
    return f"unknown (API version {api_version})"


def git_info() -> dict[str, Any]:
    def run(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in run("status", "--porcelain", "--", "outbox_cdc").splitlines()]
    return {"commit": run("rev-parse", "HEAD"), "outbox_cdc_uncommitted_changes": dirty}


def relay_executable() -> str:
    exe = Path(sys.executable).parent / "outbox-cdc"
    if exe.exists():
        return str(exe)
    found = shutil.which("outbox-cdc")
    if not found:
        raise SystemExit("outbox-cdc executable not found: run with .venv/bin/python")
    return found


# -- the relay subprocess -------------------------------------------------------------------------


@dataclass
class RelayProcess:
    """One ``outbox-cdc start`` subprocess, its log appended to a file."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    label: str
    proc: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    log_offset: int = 0
    exit_code: int | None = None
    stop_seconds: float | None = None
    last_stats: dict[str, float] | None = None

    def start(self) -> None:
        with self.log_path.open("a") as f:
            f.write(f"\n===== {self.label}: {datetime.now(UTC).isoformat()} =====\n")
        self.log_offset = self.log_path.stat().st_size
        logf = self.log_path.open("ab")
        self.started_mono = time.monotonic()
        # Own session: a Ctrl-C on the benchmark does not reach the relay; we stop it ourselves.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logf.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        with self.log_path.open("rb") as f:
            f.seek(self.log_offset)
            return f.read().decode(errors="replace")

    def wait_streaming(self, timeout: float) -> float:
        """Seconds from spawn until the relay logs that it streams."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if STREAMING_RE.search(self.log_text()):
                return time.monotonic() - self.started_mono
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with {self.proc.returncode} before streaming:\n"
                    + tail(self.log_text())
                )
            time.sleep(0.02)
        raise RuntimeError(f"relay not streaming after {timeout}s:\n" + tail(self.log_text()))

    def stats(self) -> dict[str, float] | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.last_stats
        s = proc_stats(self.proc.pid)
        if s is not None:
            self.last_stats = s
        return s

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.stats()  # last look at /proc before it goes
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                self.stop_seconds = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                log(f"{self.label}: no exit {timeout:.0f}s after SIGTERM; sending SIGKILL")
                self.proc.kill()
                self.proc.wait(10)
        self.exit_code = self.proc.returncode

    def mark(self) -> int:
        return len(self.log_text())

    def errors_since(self, mark: int) -> list[str]:
        return [
            ln
            for ln in self.log_text()[mark:].splitlines()
            if " ERROR " in ln or "Traceback" in ln or " CRITICAL " in ln
        ]

    def log_summary(self) -> dict[str, Any]:
        text = self.log_text()
        lines = text.splitlines()
        errors = [ln for ln in lines if " ERROR " in ln or "Traceback" in ln]
        warnings = [ln for ln in lines if " WARNING " in ln]
        return {
            "lines": len(lines),
            "errors": len(errors),
            "warnings": len(warnings),
            "first_errors": errors[:5],
            "first_warnings": warnings[:5],
            "exit_code": self.exit_code,
            "stop_seconds": None if self.stop_seconds is None else round(self.stop_seconds, 2),
        }


def tail(text: str, n: int = 20) -> str:
    return "\n".join(text.splitlines()[-n:])


# -- Kafka helpers --------------------------------------------------------------------------------


class Offsets:
    """End offsets of the topic's partitions: how many records are in Kafka."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            client_id="bench-offsets",
            # exactly-once runs: the end is the last stable offset (committed transactions)
            isolation_level="read_committed",
        )
        parts = None
        deadline = time.monotonic() + 30
        while not parts and time.monotonic() < deadline:
            parts = self.consumer.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.2)
        if not parts:
            raise RuntimeError(f"topic {topic} has no partitions visible")
        self.partitions = [TopicPartition(topic, p) for p in sorted(parts)]
        self.last = -1

    def total(self) -> int:
        """Sum of the end offsets; during a broker outage, the last value seen."""
        try:
            self.last = sum(self.consumer.end_offsets(self.partitions).values())
        except KafkaError as exc:
            if self.last < 0:
                raise
            log(f"end offsets unavailable ({exc!r}); still waiting")
            time.sleep(1)
        return self.last

    def close(self) -> None:
        self.consumer.close()


def watch_until(
    offsets: Offsets,
    target: int,
    timeout: float,
    interval: float,
    relay: RelayProcess,
    on_first: Any = None,
) -> tuple[list[tuple[float, int]], bool]:
    """Poll the end offsets (sum over partitions) until they reach ``target``, the timeout
    passes or the relay process exits.

    Returns the (monotonic time, end offsets) series and whether the target was reached;
    ``on_first(t)`` is called when the end offsets first move."""
    series: list[tuple[float, int]] = []
    deadline = time.monotonic() + timeout
    first_seen = False
    base = None
    while True:
        now_total = offsets.total()
        t = time.monotonic()
        series.append((t, now_total))
        if base is None:
            base = now_total
        if not first_seen and now_total > base and on_first is not None:
            first_seen = True
            on_first(t)
        if now_total >= target:
            return series, True
        if t >= deadline:
            return series, False
        if not relay.alive():
            log(f"{relay.label}: the relay exited (code {relay.proc and relay.proc.returncode})")
            return series, False
        time.sleep(max(0.0, interval - (time.monotonic() - t)))


def progress(series: list[tuple[float, int]], t0: float, base: int) -> list[list[float]]:
    """The end-offset series thinned to about one [seconds since t0, records] point a second."""
    out: list[list[float]] = []
    for t, c in series:
        if not out or t - t0 - out[-1][0] >= 1.0 or (t, c) == series[-1]:
            out.append([round(t - t0, 1), c - base])
    return out


def peak_rate(series: list[tuple[float, int]], window: float = 1.0) -> float:
    """Highest records/s over any ``window`` seconds of the end-offset series."""
    best = 0.0
    j = 0
    for i in range(len(series)):
        while j < i and series[i][0] - series[j][0] > window:
            j += 1
        k = max(0, j - 1)
        dt = series[i][0] - series[k][0]
        if dt >= window * 0.8:
            best = max(best, (series[i][1] - series[k][1]) / dt)
    return best


def consume_arrivals(
    bootstrap: str,
    topic: str,
    ready: Any,
    stop: Any,
    expected: Any,
    settle_timeout: float,
    out_path: str,
) -> None:
    """Consumer process: the wall-clock arrival time and Kafka timestamp of each record, by
    event id (ce_id header). Assigned to all partitions at their end before ``ready``; after
    ``stop``, keeps reading until ``expected`` records arrived or ``settle_timeout`` passed."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        client_id="bench-consumer",
        fetch_max_wait_ms=100,
        # exactly-once runs: a record counts when its Kafka transaction committed
        isolation_level="read_committed",
    )
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)  # resolve now, before anything is produced
    consumer.poll(timeout_ms=200)
    ready.set()
    arrivals: dict[str, tuple[float, int, int]] = {}
    duplicates = 0
    deadline = None
    while True:
        batches = consumer.poll(timeout_ms=100)
        now = time.time()
        for records in batches.values():
            for rec in records:
                eid = next((v.decode() for k, v in rec.headers if k == "ce_id"), None)
                if eid is None:
                    continue
                if eid in arrivals:
                    duplicates += 1
                else:
                    arrivals[eid] = (now, rec.timestamp, rec.timestamp_type)
        if stop.is_set():
            if deadline is None:
                deadline = time.monotonic() + settle_timeout
            if len(arrivals) >= expected.value or time.monotonic() > deadline:
                break
    consumer.close()
    Path(out_path).write_text(json.dumps({"arrivals": arrivals, "duplicates": duplicates}))


# -- the benchmark --------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    db_url: str
    admin_url: str
    bootstrap: str
    name: str = field(default_factory=lambda: "bench_" + secrets.token_hex(4))
    relays: list[RelayProcess] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    created_table: bool = False
    created_topic: bool = False

    @property
    def table(self) -> str:
        return f"public.{self.name}"

    @property
    def slot(self) -> str:
        return self.name

    @property
    def topic(self) -> str:
        return self.name

    # -- setup and cleanup --------------------------------------------------------------------

    def init_args(self) -> list[str]:
        """``outbox-cdc init`` arguments after the URL and the table."""
        return ["--slot", self.slot]

    def setup(self) -> None:
        log(
            f"init: table {self.table} {' '.join(self.init_args())}".rstrip()
            + f", topic {self.topic}"
        )
        self.created_table = True  # from here on, cleanup tries to drop them
        out = subprocess.run(
            [
                relay_executable(),
                "init",
                "--database-url",
                self.db_url,
                "--table",
                self.table,
                *self.init_args(),
            ],
            env=self.base_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"outbox-cdc init failed ({out.returncode}): {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            log(f"  {line}")
        # Create the topic here so that the consumer can be assigned before anything is sent.
        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap.split(","), client_id="bench-admin"
        )
        try:
            configs = {}
            if self.args.log_append_time:
                configs["message.timestamp.type"] = "LogAppendTime"
            admin.create_topics(
                [
                    NewTopic(
                        self.topic,
                        num_partitions=self.args.partitions,
                        replication_factor=1,
                        topic_configs=configs,
                    )
                ]
            )
            self.created_topic = True
        finally:
            admin.close()

    def cleanup(self) -> None:
        for r in self.relays:
            if r.alive():
                r.stop(timeout=30)
        if self.created_table:
            # PostgreSQL may be restarting (other people's fault-injection tests): retry a while
            deadline = time.monotonic() + 60
            while True:
                try:
                    self._cleanup_database()
                    log(f"cleanup: dropped {self.database_objects()}")
                    break
                except psycopg.OperationalError as exc:
                    if time.monotonic() > deadline:
                        self._cleanup_failed(exc)
                        break
                    log(f"cleanup: PostgreSQL unavailable ({exc!r}); retrying")
                    time.sleep(2)
                except Exception as exc:
                    self._cleanup_failed(exc)
                    break
        if self.created_topic:
            deadline = time.monotonic() + 60
            while True:
                try:
                    admin = KafkaAdminClient(
                        bootstrap_servers=self.bootstrap.split(","), client_id="bench-admin"
                    )
                    try:
                        admin.delete_topics([self.topic])
                    finally:
                        admin.close()
                    log(f"cleanup: deleted topic {self.topic}")
                    break
                except UnknownTopicOrPartitionError:
                    break
                except Exception as exc:
                    if time.monotonic() > deadline:
                        log(f"cleanup of Kafka failed: {exc!r}; delete topic {self.topic} by hand")
                        break
                    log(f"cleanup: Kafka unavailable ({exc!r}); retrying")
                    time.sleep(2)

    def database_objects(self) -> str:
        """What cleanup drops from the database, for its log line."""
        return f"slot {self.slot} and table {self.table}"

    def _cleanup_database(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
            for _ in range(100):
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                ).fetchone()
                if row is None or row[0] is None:
                    break
                time.sleep(0.1)
            else:
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM "
                    "pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                )
                time.sleep(1)
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM "
                "pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            )
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier("public", self.name))
            )
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                conn.execute("DELETE FROM outbox_cdc_offsets WHERE slot_name = %s", (self.slot,))
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                conn.execute(
                    "DELETE FROM outbox_cdc_schema WHERE table_name IN (%s, %s)",
                    (self.table, self.name),
                )

    def _cleanup_failed(self, exc: BaseException) -> None:
        log(
            f"cleanup of PostgreSQL failed: {exc!r}. By hand: SELECT pg_drop_replication_slot("
            f"'{self.slot}'); DROP TABLE {self.table}; DELETE FROM outbox_cdc_offsets WHERE "
            f"slot_name = '{self.slot}'; DELETE FROM outbox_cdc_schema WHERE table_name = "
            f"'{self.table}';"
        )

    # -- relay ----------------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_CDC_")}

    def relay_env(self) -> dict[str, str]:
        env = self.base_env()
        env.update(
            OUTBOX_CDC_DATABASE_URL=self.db_url,
            OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            OUTBOX_CDC_TABLE=self.table,
            OUTBOX_CDC_SLOT=self.slot,
            OUTBOX_CDC_CREATE_SLOT="false",  # init made it; a missing slot is an error here
        )
        env.update(self.args.relay_env)
        return env

    def new_relay(self, label: str) -> RelayProcess:
        argv = shlex.split(self.args.relay_command) or [relay_executable(), "start"]
        r = RelayProcess(argv, self.relay_env(), self.args.log, label)
        self.relays.append(r)
        r.start()
        return r

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.db_url, application_name="outbox-cdc-bench", **kwargs)

    def epochs(self) -> dict[str, str | None]:
        """What identifies the running database server and Kafka broker (see disturbances)."""
        return service_epochs(self.db_url)

    relay_session = "the walsender of the relay's slot"

    def relay_session_pid(self, conn: psycopg.Connection[Any]) -> int | None:
        """The server process serving the relay: the walsender of its slot."""
        row = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
        ).fetchone()
        return row[0] if row else None

    def database_cpu_mark(self) -> Any:
        """Called before the relay starts; passed to :meth:`database_cpu`."""
        return None

    def database_cpu(self, mark: Any) -> dict[str, Any]:
        """The database server's CPU spent for the relay so far, read while the relay runs:
        here the CPU seconds of its PostgreSQL session (a new process per connection, so its
        whole life), when /proc shows it (same host)."""
        try:
            with psycopg.connect(self.admin_url, connect_timeout=5) as conn:
                pid = self.relay_session_pid(conn)
        except psycopg.Error:
            pid = None
        stats = proc_stats(pid) if pid else None
        if stats is None:
            return {}
        return {
            "database_cpu_s": round(stats["cpu_s"], 2),
            "database_cpu_what": f"{self.relay_session} (pid {pid})",
        }

    # -- 1. latency -----------------------------------------------------------------------------

    def run_latency(self) -> None:
        a = self.args
        log(f"latency: starting relay; then {a.rate}/s for {a.seconds}s")
        epochs = self.epochs()
        machine0 = cpu_times()
        relay = self.new_relay("latency")
        startup = relay.wait_streaming(60)
        log(f"latency: relay streaming {startup:.2f}s after spawn")

        # The consumer runs in its own process: in a thread it would share the GIL with the
        # paced producer, and each would delay the other's timestamps.
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Event(), ctx.Event()
        expected = ctx.Value("q", 0)
        with tempfile.NamedTemporaryFile(prefix="bench-arrivals-", suffix=".json") as tmp:
            consumer = ctx.Process(
                target=consume_arrivals,
                args=(
                    self.bootstrap,
                    self.topic,
                    ready,
                    stop,
                    expected,
                    a.settle_timeout,
                    tmp.name,
                ),
                name="bench-consumer",
                daemon=True,
            )
            consumer.start()
            try:
                if not ready.wait(60):
                    raise RuntimeError("the consumer process did not get ready within 60 s")
                commits, wall0, produce_s, late, cpu_before, cpu_after = self._paced_producer(relay)
                expected.value = len(commits)
                stop.set()
                consumer.join(a.settle_timeout + 30)
                if consumer.is_alive():
                    raise RuntimeError("the consumer process did not finish")
                if consumer.exitcode != 0:
                    raise RuntimeError(f"the consumer process failed (exit {consumer.exitcode})")
            finally:
                # never leave it polling: it would outlive the topic's deletion at cleanup
                if consumer.is_alive():
                    consumer.kill()
                    consumer.join(10)
            got = json.loads(Path(tmp.name).read_text())
        arrivals: dict[str, list[Any]] = got["arrivals"]
        duplicates: int = got["duplicates"]
        measured = [(eid, t) for eid, t in commits if t >= wall0 + a.warmup]
        consume_lat: list[float] = []
        pickup: list[float] = []
        ts_types: set[int] = set()
        missing = 0
        for eid, t in measured:
            got = arrivals.get(eid)
            if got is None:
                missing += 1
                continue
            consume_lat.append(got[0] - t)
            # Kafka timestamps are whole milliseconds (floored): take the middle of the ms
            pickup.append((got[1] + 0.5) / 1000 - t)
            ts_types.add(got[2])
        missing_total = sum(1 for eid, _ in commits if eid not in arrivals)
        achieved = (len(commits) - 1) / (commits[-1][1] - commits[0][1]) if len(commits) > 1 else 0
        machine = busy_percent(machine0, cpu_times())
        relay.stop()
        disturbed = disturbances(epochs, self.epochs(), relay.errors_since(0))
        cpu = None
        if cpu_before and cpu_after:
            cpu = cpu_after["cpu_s"] - cpu_before["cpu_s"]
        second = "broker_append" if ts_types == {1} else "relay_pickup"
        self.results["latency"] = {
            "disturbed": disturbed,
            "machine_cpu_busy_percent": machine,
            "target_rate_per_s": a.rate,
            "seconds": a.seconds,
            "warmup_s": a.warmup,
            "events_committed": len(commits),
            "events_measured": len(measured),
            "achieved_rate_per_s": round(achieved, 1),
            "producer_wall_s": round(produce_s, 2),
            "events_started_late_over_10ms": late,
            "missing_after_settle": missing_total,
            "missing_measured": missing,
            "duplicates": duplicates,
            "commit_to_consume": summary_ms(consume_lat),
            # CreateTime = when the relay's producer.send() appended the record; with
            # --log-append-time it is the broker's append time instead. Whole milliseconds:
            # +0.5 ms is added to each (middle of the millisecond).
            "kafka_timestamp_type": sorted(ts_types),
            "second_figure": second,
            "commit_to_kafka_timestamp": summary_ms(pickup),
            "relay_startup_s": round(startup, 2),
            "relay_cpu_s_during_run": None if cpu is None else round(cpu, 2),
            "relay_cpu_percent_of_one_core": None
            if cpu is None
            else round(cpu / produce_s * 100, 1),
            "relay_cpu_us_per_event": None if cpu is None else round(cpu / len(commits) * 1e6, 1),
            "relay_peak_rss_mib": (relay.last_stats or {}).get("peak_rss_mib"),
            "relay_log": relay.log_summary(),
        }

    def _paced_producer(
        self, relay: RelayProcess
    ) -> tuple[list[tuple[str, float]], float, float, int, Any, Any]:
        """One connection, one event per transaction, on a fixed monotonic schedule; the
        wall-clock time right after each commit returns."""
        a = self.args
        outbox = Outbox(self.table)
        total = int(a.rate * a.seconds)
        commits: list[tuple[str, float]] = []
        late = 0
        pad = "x" * a.payload_pad
        interval = 1.0 / a.rate
        txn_s: list[float] = []
        cpu_before = relay.stats()
        with self.connect() as conn:
            t0 = time.monotonic()
            wall0 = time.time()
            for i in range(total):
                target = t0 + i * interval
                now = time.monotonic()
                if now < target:
                    time.sleep(target - now)
                elif now - target > 0.010:
                    late += 1  # behind schedule: sent at once, the schedule is not moved
                t_begin = time.monotonic()
                eid = outbox.publish(
                    conn,
                    topic=self.topic,
                    type="bench.latency",
                    payload={"n": i, "pad": pad},
                    key=f"k{i % a.keys}",
                )
                conn.commit()
                commits.append((str(eid), time.time()))
                txn_s.append(time.monotonic() - t_begin)
            produce_s = time.monotonic() - t0
        cpu_after = relay.stats()
        self.results.setdefault("latency_producer", {})["publish_and_commit"] = summary_ms(txn_s)
        return commits, wall0, produce_s, late, cpu_before, cpu_after

    # -- 2. backlog -----------------------------------------------------------------------------

    def load_method(self) -> str:
        return f"{self.args.backlog_writers} writers, method {self.args.backlog_method}"

    def load_backlog(self, count: int, writers: int) -> dict[str, Any]:
        """Commit ``count`` one-row transactions with the relay stopped."""
        a = self.args
        shares = [count // writers + (1 if i < count % writers else 0) for i in range(writers)]
        errors: list[BaseException] = []

        def write_api(share: int, start: int) -> None:
            # Outbox.publish in explicit BEGIN/COMMIT, pipelined: one transaction per event
            outbox = Outbox(self.table)
            pad = "x" * a.payload_pad
            with self.connect(autocommit=True) as conn:
                conn.execute("SET synchronous_commit = off")
                with conn.pipeline() as p:
                    for i in range(start, start + share):
                        conn.execute("BEGIN")
                        outbox.publish(
                            conn,
                            topic=self.topic,
                            type="bench.backlog",
                            payload={"n": i, "pad": pad},
                            key=f"k{i % a.keys}",
                        )
                        conn.execute("COMMIT")
                        if i % 500 == 499:
                            p.sync()

        def write_sql(share: int, start: int) -> None:
            # the same rows from a server-side loop, COMMIT after each row
            stmt = sql.SQL(
                "DO $bench$ BEGIN FOR i IN {lo}..{hi} LOOP "
                "INSERT INTO {table} (topic, key, type, content_type, payload) VALUES "
                "({topic}, 'k' || (i % {keys}), 'bench.backlog', 'application/json', "
                'convert_to(format(\'{{"n":%s,"pad":"%s"}}\', i, repeat(\'x\', {pad})), '
                "'UTF8')); COMMIT; END LOOP; END $bench$"
            ).format(
                lo=sql.Literal(start),
                hi=sql.Literal(start + share - 1),
                table=sql.Identifier("public", self.name),
                topic=sql.Literal(self.topic),
                pad=sql.Literal(a.payload_pad),
                keys=sql.Literal(a.keys),
            )
            with self.connect(autocommit=True) as conn:
                conn.execute("SET synchronous_commit = off")
                conn.execute(stmt)

        target = write_api if a.backlog_method == "api" else write_sql

        def run(share: int, start: int) -> None:
            try:
                target(share, start)
            except BaseException as exc:
                errors.append(exc)

        threads = []
        start = 0
        t0 = time.monotonic()
        for share in shares:
            threads.append(threading.Thread(target=run, args=(share, start)))
            start += share
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load_s = time.monotonic() - t0
        if errors:
            raise RuntimeError(f"backlog load failed: {errors[0]!r}") from errors[0]
        with self.connect() as conn:
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*), count(DISTINCT xmin::text) FROM {}"
                    " WHERE type = 'bench.backlog'"
                ).format(sql.Identifier("public", self.name))
            ).fetchone()
        assert row is not None
        return {
            "load_s": round(load_s, 2),
            "load_rate_per_s": round(count / load_s, 1),
            "rows": row[0],
            "distinct_transactions": row[1],
        }

    def run_backlog(self, offsets: Offsets) -> RelayProcess:
        a = self.args
        n = a.backlog
        log(f"backlog: relay stopped; committing {n} one-row transactions ({self.load_method()})")
        epochs = self.epochs()
        base = offsets.total()
        load = self.load_backlog(n, a.backlog_writers)
        log(
            f"backlog: loaded in {load['load_s']}s ({load['load_rate_per_s']}/s, "
            f"{load['distinct_transactions'] or '?'} transactions); starting the relay"
        )
        if load["distinct_transactions"] not in (None, n):  # None: not checkable
            log("backlog: WARNING: not one transaction per row")

        machine0 = cpu_times()
        db_mark = self.database_cpu_mark()
        relay = self.new_relay("backlog")
        first: dict[str, Any] = {}

        def on_first(t: float) -> None:
            first["t"] = t
            first["stats"] = relay.stats()

        series, done = watch_until(offsets, base + n, a.drain_timeout, 0.2, relay, on_first)
        t_done = series[-1][0]
        stats = relay.stats()  # before SIGTERM: peak RSS, CPU
        db_cpu = self.database_cpu(db_mark) if relay.alive() else {}
        streaming = bool(STREAMING_RE.search(relay.log_text()))
        disturbed = disturbances(epochs, self.epochs(), relay.errors_since(0))
        delivered = series[-1][1] - base
        total_s = t_done - relay.started_mono
        first_s = first["t"] - relay.started_mono if "t" in first else None
        steady_s = t_done - first["t"] if "t" in first else None
        cpu_first = (first.get("stats") or {}).get("cpu_s")
        res: dict[str, Any] = {
            "disturbed": disturbed,
            "machine_cpu_busy_percent": busy_percent(machine0, cpu_times()),
            "events": n,
            "load": load,
            "completed": done,
            "delivered": delivered,
            "extra_records_in_kafka": max(0, delivered - n),
            "seconds_spawn_to_all_in_kafka": round(total_s, 2),
            "seconds_spawn_to_first_in_kafka": None if first_s is None else round(first_s, 2),
            "events_per_s_incl_startup": round(delivered / total_s, 1),
            "events_per_s_after_first": (
                round((delivered - 1) / steady_s, 1) if steady_s else None
            ),
            "peak_1s_events_per_s": round(peak_rate(series), 1),
            "relay_logged_streaming": streaming,
            "progress_per_s": progress(series, relay.started_mono, base),
        }
        if db_cpu:
            res.update(db_cpu)
            res["database_cpu_us_per_event"] = round(
                db_cpu["database_cpu_s"] / max(1, delivered) * 1e6, 1
            )
        if stats:
            res["relay_peak_rss_mib"] = stats["peak_rss_mib"]
            res["relay_rss_mib_at_end"] = stats["rss_mib"]
            res["relay_cpu_s"] = round(stats["cpu_s"], 2)
            res["relay_cpu_user_s"] = round(stats["cpu_user_s"], 2)
            res["relay_cpu_system_s"] = round(stats["cpu_system_s"], 2)
            res["relay_cpu_us_per_event"] = round(stats["cpu_s"] / max(1, delivered) * 1e6, 1)
            if cpu_first is not None:
                res["relay_cpu_s_before_first_record"] = round(cpu_first, 2)
                res["relay_cpu_us_per_event_after_first"] = round(
                    (stats["cpu_s"] - cpu_first) / max(1, delivered) * 1e6, 1
                )
        self.results["backlog"] = res
        if not done:
            self._incomplete("backlog", relay, delivered, n)
        return relay

    # -- 3. burst -------------------------------------------------------------------------------

    def run_burst(self, offsets: Offsets, relay: RelayProcess) -> None:
        a = self.args
        n, threads_n = a.burst, a.burst_threads
        log(f"burst: {n} events from {threads_n} threads while the relay runs")
        base = offsets.total()
        shares = [n // threads_n + (1 if i < n % threads_n else 0) for i in range(threads_n)]
        errors: list[BaseException] = []
        finished: list[float] = []
        pad = "x" * a.payload_pad

        def produce(share: int, start: int) -> None:
            try:
                outbox = Outbox(self.table)
                with self.connect() as conn:
                    conn.execute("SET synchronous_commit = off")
                    conn.commit()
                    for i in range(start, start + share):
                        outbox.publish(
                            conn,
                            topic=self.topic,
                            type="bench.burst",
                            payload={"n": i, "pad": pad},
                            key=f"k{i % a.keys}",
                        )
                        conn.commit()
                finished.append(time.monotonic())
            except BaseException as exc:
                errors.append(exc)

        epochs = self.epochs()
        mark = relay.mark()
        machine0 = cpu_times()
        cpu0 = relay.stats()
        threads = []
        start = 0
        for share in shares:
            threads.append(threading.Thread(target=produce, args=(share, start), daemon=True))
            start += share
        t0 = time.monotonic()
        for t in threads:
            t.start()
        series, done = watch_until(offsets, base + n, a.drain_timeout, 0.2, relay)
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"burst producer failed: {errors[0]!r}") from errors[0]
        cpu1 = relay.stats()
        t_done = series[-1][0]
        t_prod = max(finished)
        delivered = series[-1][1] - base
        lag_at_prod_end = n - max((c for t, c in series if t <= t_prod), default=base) + base
        res: dict[str, Any] = {
            "disturbed": disturbances(epochs, self.epochs(), relay.errors_since(mark)),
            "machine_cpu_busy_percent": busy_percent(machine0, cpu_times()),
            "events": n,
            "threads": threads_n,
            "completed": done,
            "delivered": delivered,
            "producer_seconds": round(t_prod - t0, 2),
            "producer_commits_per_s": round(n / (t_prod - t0), 1),
            "seconds_to_all_in_kafka": round(t_done - t0, 2),
            "events_per_s_end_to_end": round(delivered / (t_done - t0), 1),
            "peak_1s_events_per_s": round(peak_rate(series), 1),
            "not_yet_in_kafka_when_producers_finished": lag_at_prod_end,
            "tail_seconds_after_producers": round(max(0.0, t_done - t_prod), 2),
            "progress_per_s": progress(series, t0, base),
        }
        if cpu0 and cpu1:
            cpu = cpu1["cpu_s"] - cpu0["cpu_s"]
            res["relay_cpu_s"] = round(cpu, 2)
            res["relay_cpu_us_per_event"] = round(cpu / max(1, delivered) * 1e6, 1)
            res["relay_peak_rss_mib"] = cpu1["peak_rss_mib"]
        tail_s = t_done - t_prod
        if tail_s >= 0.5 and lag_at_prod_end > 0:
            # what the relay did alone, once the producers no longer competed for the CPUs
            res["events_per_s_after_producers_finished"] = round(lag_at_prod_end / tail_s, 1)
        busy = res["machine_cpu_busy_percent"]
        if tail_s < 1.0:
            res["bounded_by"] = (
                "producers (the relay kept up: less than 1 s of work left when they finished)"
            )
        elif busy is not None and busy >= 90:
            res["bounded_by"] = (
                f"CPU: the machine was {busy:.0f}% busy; the relay fell behind while the "
                "producers ran, then caught up alone"
            )
        else:
            res["bounded_by"] = "relay"
        self.results["burst"] = res
        if not done:
            self._incomplete("burst", relay, delivered, n)

    def _incomplete(self, phase: str, relay: RelayProcess, delivered: int, n: int) -> None:
        res = self.results[phase]
        if relay.alive():
            why = f"timed out after {self.args.drain_timeout:.0f} s"
        else:
            relay.stop()
            res["relay_exit_code"] = relay.exit_code
            res["relay_log"] = relay.log_summary()
            why = f"the relay exited with code {relay.exit_code}"
        raise RuntimeError(f"{phase}: only {delivered} of {n} events in Kafka: {why}")

    # -- all ------------------------------------------------------------------------------------

    def database_environment(self) -> dict[str, Any]:
        """The database's versions (merged into ``versions``); stores its settings."""
        with self.connect() as conn:
            pg = {}
            for s in (
                "server_version",
                "synchronous_commit",
                "fsync",
                "wal_level",
                "logical_decoding_work_mem",
                "shared_buffers",
                "wal_writer_delay",
            ):
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(s))).fetchone()
                pg[s] = row[0] if row else None
        self.results["postgresql_settings"] = pg
        return {"postgresql": pg["server_version"], "psycopg": pkg_version("psycopg")}

    def environment(self) -> None:
        database = self.database_environment()
        probe = KafkaConsumer(
            bootstrap_servers=self.bootstrap.split(","),
            group_id=None,
            client_id="bench-probe",
            allow_auto_create_topics=False,
        )
        api = probe.config.get("api_version")
        probe.close()
        self.results["versions"] = {
            "python": platform.python_version(),
            **database,
            "kafka": kafka_version(api),
            "kafka_python": pkg_version("kafka-python"),
            "confluent_kafka": pkg_version("confluent-kafka"),
            "librdkafka": librdkafka_version(),
            "outbox_cdc": pkg_version("outbox-cdc"),
            "git": git_info(),
        }

    def run(self) -> None:
        a = self.args
        self.environment()
        self.setup()
        if a.seconds > 0:
            self.run_latency()
        offsets = Offsets(self.bootstrap, self.topic)
        try:
            relay = None
            if a.backlog > 0:
                relay = self.run_backlog(offsets)
            if a.burst > 0:
                if relay is None:
                    relay = self.new_relay("burst")
                    relay.wait_streaming(60)
                self.run_burst(offsets, relay)
            if relay is not None:
                relay.stop()
                key = "burst" if a.burst > 0 else "backlog"
                self.results[key]["relay_log"] = relay.log_summary()
                if a.backlog > 0 and a.burst > 0:
                    self.results["backlog"]["relay_log"] = "same process as burst"
        finally:
            offsets.close()


# -- output ---------------------------------------------------------------------------------------


def fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
    elif isinstance(v, int):
        v = f"{v:,}"
    return f"{v}{unit}"


def print_table(r: dict[str, Any], path: Path) -> None:
    rows: list[tuple[str, str]] = []
    v = r.get("versions", {})
    rows.append(
        (
            "machine",
            f"{r['host']['nproc']} CPUs ({r['host']['cpu_model']}), load "
            f"{r['host']['loadavg_start']} -> {r['host'].get('loadavg_end')}",
        )
    )
    rows.append(
        (
            "versions",
            f"PostgreSQL {v.get('postgresql', '?').split()[0]}, Kafka "
            f"{v.get('kafka')}, psycopg {v.get('psycopg')}, kafka-python "
            f"{v.get('kafka_python')}, confluent-kafka {v.get('confluent_kafka')} "
            f"(librdkafka {v.get('librdkafka')}); relay client "
            f"{(r.get('parameters') or {}).get('relay_env', {}).get(CLIENT_ENV, 'default')}",
        )
    )
    lat = r.get("latency")
    if lat:
        c = lat["commit_to_consume"]
        k = lat["commit_to_kafka_timestamp"]
        what = (
            "commit -> broker append (LogAppendTime)"
            if lat["second_figure"] == "broker_append"
            else "relay pickup (CreateTime - commit)"
        )
        rows += [
            ("", ""),
            (
                "1. LATENCY",
                f"target {lat['target_rate_per_s']}/s for {lat['seconds']}s, first "
                f"{lat['warmup_s']}s skipped",
            ),
            (
                "achieved rate",
                fmt(lat["achieved_rate_per_s"], " events/s")
                + f" ({lat['events_committed']} committed, {lat['events_measured']} measured)",
            ),
            (
                "commit -> consume",
                f"p50 {fmt(c.get('p50_ms'))}  p90 {fmt(c.get('p90_ms'))}  "
                f"p99 {fmt(c.get('p99_ms'))}  max {fmt(c.get('max_ms'))}  "
                f"avg {fmt(c.get('avg_ms'))} ms",
            ),
            (
                what,
                f"p50 {fmt(k.get('p50_ms'))}  p99 {fmt(k.get('p99_ms'))}  "
                f"max {fmt(k.get('max_ms'))} ms",
            ),
            ("missing / duplicates", f"{lat['missing_after_settle']} / {lat['duplicates']}"),
            ("relay startup", fmt(lat["relay_startup_s"], " s (spawn -> streaming)")),
            (
                "relay CPU at this rate",
                f"{fmt(lat['relay_cpu_percent_of_one_core'])}% of a core, "
                f"{fmt(lat['relay_cpu_us_per_event'])} us/event",
            ),
            ("machine CPU busy", f"{fmt(lat['machine_cpu_busy_percent'])}% of all CPUs"),
        ]
    b = r.get("backlog")
    if b:
        rows += [
            ("", ""),
            (
                "2. BACKLOG",
                f"{b['events']:,} one-row transactions (loaded at "
                f"{fmt(b['load']['load_rate_per_s'])}/s), relay started after",
            ),
            (
                "all in Kafka after",
                fmt(b["seconds_spawn_to_all_in_kafka"], " s")
                + ("" if b["completed"] else "  (TIMED OUT)"),
            ),
            (
                "drain rate",
                f"{fmt(b['events_per_s_incl_startup'])} events/s incl. startup, "
                f"{fmt(b['events_per_s_after_first'])} after the first record; "
                f"peak 1 s {fmt(b['peak_1s_events_per_s'])}",
            ),
            ("first record after", fmt(b["seconds_spawn_to_first_in_kafka"], " s")),
            ("relay peak RSS", fmt(b.get("relay_peak_rss_mib"), " MiB")),
            (
                "relay CPU",
                f"{fmt(b.get('relay_cpu_s'))} s ({fmt(b.get('relay_cpu_us_per_event'))} us/event)",
            ),
            (
                "database CPU",
                f"{fmt(b.get('database_cpu_s'))} s "
                f"({fmt(b.get('database_cpu_us_per_event'))} us/event; "
                f"{b.get('database_cpu_what', 'not measured')})",
            ),
            ("machine CPU busy", f"{fmt(b['machine_cpu_busy_percent'])}% of all CPUs"),
        ]
    u = r.get("burst")
    if u:
        rows += [
            ("", ""),
            ("3. BURST", f"{u['events']:,} events from {u['threads']} threads, relay running"),
            (
                "producers",
                fmt(u["producer_commits_per_s"], " commits/s")
                + f" ({fmt(u['producer_seconds'])} s)",
            ),
            (
                "all in Kafka after",
                fmt(u["seconds_to_all_in_kafka"], " s")
                + f" -> {fmt(u['events_per_s_end_to_end'])} events/s; peak 1 s "
                f"{fmt(u['peak_1s_events_per_s'])}",
            ),
            ("bounded by", u["bounded_by"]),
            (
                "relay alone after",
                fmt(u.get("events_per_s_after_producers_finished"), " events/s")
                + f" (the last {fmt(u['not_yet_in_kafka_when_producers_finished'])} events)",
            ),
            ("relay CPU", f"{fmt(u.get('relay_cpu_us_per_event'))} us/event"),
            ("machine CPU busy", f"{fmt(u['machine_cpu_busy_percent'])}% of all CPUs"),
        ]
    for phase in ("latency", "backlog", "burst"):
        for d in (r.get(phase) or {}).get("disturbed") or []:
            rows.append((f"! {phase} disturbed", d[:200]))
    width = max(len(k) for k, _ in rows)
    print()
    for k, val in rows:
        print(f"{k:>{width}}  {val}" if k or val else "")
    print(f"\nJSON: {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=30, help="latency run length (0 = skip)")
    p.add_argument("--rate", type=float, default=1000, help="latency run: events/s")
    p.add_argument("--warmup", type=float, default=2, help="latency run: seconds not measured")
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=30,
        help="latency run: seconds to wait for the last events",
    )
    p.add_argument(
        "--backlog", type=int, default=200_000, help="backlog: one-row transactions (0 = skip)"
    )
    p.add_argument(
        "--backlog-writers", type=int, default=2, help="backlog: parallel writer connections"
    )
    p.add_argument(
        "--backlog-method",
        choices=["sql", "api"],
        default="sql",
        help="backlog: 'sql' = server-side loop with COMMIT per row; 'api' = "
        "Outbox.publish with BEGIN/COMMIT per row in psycopg pipeline mode",
    )
    p.add_argument("--burst", type=int, default=50_000, help="burst: events (0 = skip)")
    p.add_argument("--burst-threads", type=int, default=4, help="burst: producer threads")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=900,
        help="backlog/burst: give up after this many seconds",
    )
    p.add_argument(
        "--payload-pad", type=int, default=100, help="bytes of padding in each JSON payload"
    )
    p.add_argument("--keys", type=int, default=1000, help="distinct record keys (k0, k1, ...)")
    p.add_argument("--partitions", type=int, default=1, help="partitions of the benchmark topic")
    p.add_argument(
        "--log-append-time",
        action="store_true",
        help="topic with message.timestamp.type=LogAppendTime: the second latency "
        "figure becomes commit -> broker append instead of relay pickup",
    )
    p.add_argument(
        "--relay-command",
        default="",
        help="run the relay with this command instead of `outbox-cdc start` (e.g. under a "
        "profiler: '.venv/bin/python -m cProfile -o /tmp/relay.prof .venv/bin/outbox-cdc "
        "start'); its CPU and memory figures then include the profiler's",
    )
    p.add_argument(
        "--relay-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra OUTBOX_CDC_* setting for the relay (repeatable), e.g. "
        "OUTBOX_CDC_KAFKA_LINGER_MS=0",
    )
    p.add_argument(
        "--kafka-client",
        choices=BACKENDS,
        help="the relay's Kafka client (OUTBOX_CDC_KAFKA_CLIENT); default: the relay's default",
    )
    p.add_argument(
        "--compare-backends",
        action="store_true",
        help="run the backlog drain once per Kafka client (kafka-python, confluent) and compare "
        "drain rate and relay CPU per 1,000 events; output: results/relay-backends.json",
    )
    p.add_argument("--output", type=Path, help="default: results/relay.json")
    p.add_argument(
        "--log",
        type=Path,
        default=RESULTS / "relay.log",
        help="the relay processes' output (appended)",
    )
    p.add_argument("--database-url", default=os.environ.get("OUTBOX_CDC_TEST_POSTGRES_URL"))
    p.add_argument(
        "--admin-url",
        default=os.environ.get("OUTBOX_CDC_TEST_POSTGRES_ADMIN_URL"),
        help="superuser URL, only for cleanup (defaults to --database-url)",
    )
    p.add_argument(
        "--bootstrap-servers", default=os.environ.get("OUTBOX_CDC_TEST_KAFKA_BOOTSTRAP_SERVERS")
    )
    a = p.parse_args(argv)
    env = {}
    for item in a.relay_env:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("OUTBOX_CDC_"):
            p.error(f"--relay-env {item!r}: expected OUTBOX_CDC_NAME=VALUE")
        env[key] = value
    if a.kafka_client:
        if a.compare_backends:
            p.error("--kafka-client and --compare-backends exclude each other")
        env["OUTBOX_CDC_KAFKA_CLIENT"] = a.kafka_client
    if a.compare_backends and "OUTBOX_CDC_KAFKA_CLIENT" in env:
        p.error("--compare-backends sets OUTBOX_CDC_KAFKA_CLIENT itself")
    if a.compare_backends and a.backlog <= 0:
        p.error("--compare-backends needs a backlog (--backlog > 0)")
    if a.output is None:
        a.output = RESULTS / ("relay-backends.json" if a.compare_backends else "relay.json")
    a.relay_env = env
    if not a.database_url or not a.bootstrap_servers:
        p.error(
            "no PostgreSQL URL / Kafka servers: run `. ./.services.env` first, or pass "
            "--database-url and --bootstrap-servers"
        )
    a.admin_url = a.admin_url or a.database_url
    if a.rate <= 0 or a.backlog_writers < 1 or a.burst_threads < 1 or a.keys < 1:
        p.error("--rate, --backlog-writers, --burst-threads and --keys must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.log.parent.mkdir(parents=True, exist_ok=True)
    if a.compare_backends:
        return compare_backends(a)
    r, status, out = run_bench(a)
    print_table(r, out)
    if status:
        print(f"status: {r['status']}")
    return status


def run_bench(
    a: argparse.Namespace, write: bool = True, bench: Bench | None = None
) -> tuple[dict[str, Any], int, Path]:
    """One benchmark run (setup, phases, cleanup): its results, exit status, JSON path.
    ``bench``: a prepared :class:`Bench` (or subclass) for ``a``; default a WAL one."""
    if bench is None:
        bench = Bench(a, a.database_url, a.admin_url, a.bootstrap_servers)
    params = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(a).items()
        if k not in ("output", "log") and not k.endswith("_url")  # URLs may hold passwords
    }
    params["relay_env"] = {k: ("***" if "PASSWORD" in k else v) for k, v in a.relay_env.items()}
    r = bench.results
    r.update(
        benchmark="outbox-cdc WAL relay, end to end (PostgreSQL -> outbox-cdc start -> Kafka)",
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        status="running",
        host={
            "nproc": len(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "loadavg_start": loadavg(),
        },
        parameters=params,
        names={"table": bench.table, "slot": bench.slot, "topic": bench.topic},
        relay_log_file=str(a.log),
    )
    status = 0
    try:
        bench.run()
        disturbed = [
            p for p in ("latency", "backlog", "burst") if (r.get(p) or {}).get("disturbed")
        ]
        if disturbed:
            # the figures are not comparable: keep them, but not as the result
            r["status"] = f"disturbed: {', '.join(disturbed)} (see each phase's 'disturbed')"
            log(f"DISTURBED: {', '.join(disturbed)}; the figures are not comparable")
            status = 2
        else:
            r["status"] = "ok"
    except BaseException as exc:
        r["status"] = f"failed: {exc!r}"
        r["traceback"] = traceback.format_exc()
        log(f"FAILED: {exc!r}")
        for relay in bench.relays:
            log(f"{relay.label} relay log tail:\n{tail(relay.log_text())}")
        status = 1
    finally:
        bench.cleanup()
        r["host"]["loadavg_end"] = loadavg()
        out = a.output if status == 0 else a.output.with_name(a.output.stem + ".failed.json")
        if write:
            out.write_text(json.dumps(r, indent=2, default=str) + "\n")
    return r, status, out


def compare_backends(a: argparse.Namespace) -> int:
    """The backlog drain once per Kafka client, one after the other, each on its own table,
    slot and topic; then drain rate and relay CPU per 1,000 events side by side."""
    runs: dict[str, dict[str, Any]] = {}
    status = 0
    for client in BACKENDS:
        log(f"compare-backends: {client}")
        args = argparse.Namespace(**vars(a))
        args.relay_env = {**a.relay_env, "OUTBOX_CDC_KAFKA_CLIENT": client}
        args.seconds, args.burst = 0, 0
        r, st, _ = run_bench(args, write=False)
        runs[client] = r
        status = max(status, st)
        if st == 1:
            break
    summary: dict[str, Any] = {}
    for client, r in runs.items():
        b = r.get("backlog") or {}
        cpu_us = b.get("relay_cpu_us_per_event")
        summary[client] = {
            "status": r.get("status"),
            "events": b.get("events"),
            "completed": b.get("completed"),
            "seconds_spawn_to_all_in_kafka": b.get("seconds_spawn_to_all_in_kafka"),
            "drain_events_per_s": b.get("events_per_s_incl_startup"),
            "drain_events_per_s_after_first": b.get("events_per_s_after_first"),
            "peak_1s_events_per_s": b.get("peak_1s_events_per_s"),
            # us per event = ms per 1,000 events
            "relay_cpu_ms_per_1000_events": cpu_us,
            "relay_cpu_s": b.get("relay_cpu_s"),
            "relay_peak_rss_mib": b.get("relay_peak_rss_mib"),
            "machine_cpu_busy_percent": b.get("machine_cpu_busy_percent"),
            "disturbed": b.get("disturbed"),
        }
    ratio: dict[str, Any] = {}
    kp, cf = summary.get("kafka-python", {}), summary.get("confluent", {})

    def div(x: Any, y: Any) -> float | None:
        return round(x / y, 2) if x and y else None

    ratio["drain_rate_confluent_over_kafka_python"] = div(
        cf.get("drain_events_per_s"), kp.get("drain_events_per_s")
    )
    ratio["drain_rate_after_first_confluent_over_kafka_python"] = div(
        cf.get("drain_events_per_s_after_first"), kp.get("drain_events_per_s_after_first")
    )
    ratio["cpu_per_event_kafka_python_over_confluent"] = div(
        kp.get("relay_cpu_ms_per_1000_events"), cf.get("relay_cpu_ms_per_1000_events")
    )
    first = next(iter(runs.values()), {})
    result = {
        "benchmark": "outbox-cdc WAL relay backlog drain, kafka-python vs confluent-kafka",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "status": "ok" if status == 0 else ("disturbed" if status == 2 else "failed (see runs)"),
        "host": first.get("host"),
        "versions": first.get("versions"),
        "parameters": first.get("parameters"),
        "summary": summary,
        "ratio": ratio,
        "runs": runs,
    }
    out = a.output if status == 0 else a.output.with_name(a.output.stem + ".failed.json")
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    rows = [
        ("", "kafka-python", "confluent"),
        *[
            (
                label,
                fmt(kp.get(key), unit),
                fmt(cf.get(key), unit),
            )
            for label, key, unit in (
                ("backlog events", "events", ""),
                ("all in Kafka after", "seconds_spawn_to_all_in_kafka", " s"),
                ("drain rate (incl. startup)", "drain_events_per_s", " events/s"),
                ("drain rate after first", "drain_events_per_s_after_first", " events/s"),
                ("relay CPU per 1,000 events", "relay_cpu_ms_per_1000_events", " ms"),
                ("relay peak RSS", "relay_peak_rss_mib", " MiB"),
                ("machine CPU busy", "machine_cpu_busy_percent", "%"),
            )
        ],
    ]
    print()
    for label, x, y in rows:
        print(f"{label:>28}  {x:>18}  {y:>18}")
    print(
        f"\n{'drain rate ratio':>28}  confluent / kafka-python = "
        f"{fmt(ratio['drain_rate_confluent_over_kafka_python'])}"
    )
    print(
        f"{'CPU per event ratio':>28}  kafka-python / confluent = "
        f"{fmt(ratio['cpu_per_event_kafka_python_over_confluent'])}"
    )
    print(f"\nJSON: {out}")
    if status:
        print(f"status: {result['status']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
