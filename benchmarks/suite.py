"""The benchmark suite: every figure of docs/benchmarks.md in one run, with the ceilings of the
same run (issue 9).

    scripts/services.sh up && . ./.services.env
    .venv/bin/python benchmarks/suite.py --quick   # about 2 minutes, what CI runs
    .venv/bin/python benchmarks/suite.py --full    # about 15 minutes, + PNG plots (extra "bench")

Ceilings (what the machine does without the relay, same row shape: one 256-byte outbox event per
transaction, keys from 10,000 ids):

- insert: pgbench, a custom script inserting the outbox rows, one per transaction, synchronous
  commit on, with 1..N clients; the best N is the ceiling;
- decode: ``pg_recvlogical`` with the relay's wal2json options on a slot over the backlog,
  to /dev/null;
- produce: Kafka's own ``ProducerPerformance`` (the broker's jars), 256-byte records, acks=all.

Scenarios (the relay is ``outbox-cdc start``, a subprocess, as in production):

- latency at 500, 1,000 and 5,000 events/s with an open-loop load generator (each event has a
  scheduled send time; a late event is sent at once, the schedule does not move), per Kafka
  client; latency from the commit and from the scheduled time; a consumer process checks for
  gaps, duplicates and per-key reordering;
- highest rate sustained without backlog growth (step search over offered rates);
- keep-up with pgbench at its best client count (the database's highest INSERT rate);
- drain of a backlog (1,000,000 events in --full) per Kafka client: rate, relay CPU per 1,000
  events, peak RSS;
- WAL retained by the slot while the outbox idles and another table is written, with and
  without heartbeats;
- polling mode against WAL mode (latency at 1,000/s, drain).

Output: benchmarks/results/suite.json (--full) or suite-quick.json (--quick); ``*.failed.json``
when a scenario failed. Exit code 0 when every scenario completed (figures are never judged
here: targets are reported, not enforced), 1 when one failed, 2 when one was disturbed (a
service restarted during it). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import relay as rb
from kafka.admin import KafkaAdminClient, NewTopic
from psycopg import pq, sql

from outbox_cdc.protocol import wal2json

RESULTS = rb.RESULTS
PAYLOAD_BYTES = 256
KEYS = 10_000
PG_BIN = Path("/usr/lib/postgresql/15/bin")
TARGETS = {
    "keep_up_ratio": 1.0,
    "p99_ms_at_1000": 50.0,
    "drain_over_decode": 0.5,
    "peak_rss_mb": 200.0,
}

log = rb.log


class Unavailable(Exception):
    """A tool a phase needs is not installed here (e.g. pgbench, or the broker's jars when
    Kafka runs in a container): the phase is skipped and says why; not a failure."""


def tool(name: str) -> str:
    path = shutil.which(name) or (str(PG_BIN / name) if (PG_BIN / name).exists() else None)
    if path is None:
        raise Unavailable(f"{name} not found (PATH, {PG_BIN})")
    return path


# -- profiles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    insert_clients: tuple[int, ...]
    insert_seconds: float
    produce_records: int
    latency_rates: tuple[int, ...]
    latency_seconds: float
    latency_warmup: float
    latency_other_backend_rates: tuple[int, ...]  # confluent (kafka-python does all rates)
    step_start: int
    step_factor: float
    step_max: int
    step_seconds: float
    keep_up_seconds: float
    idle_seconds: float
    heartbeat_s: float
    backlog: int
    polling_seconds: float
    polling_backlog: int
    settle_s: float


QUICK = Profile(
    name="quick",
    insert_clients=(1, 4),
    insert_seconds=3,
    produce_records=200_000,
    latency_rates=(500, 1000, 5000),
    latency_seconds=4,
    latency_warmup=1,
    latency_other_backend_rates=(1000,),
    step_start=1000,
    step_factor=2.0,
    step_max=2,
    step_seconds=4,
    keep_up_seconds=4,
    idle_seconds=8,
    heartbeat_s=2,
    backlog=30_000,
    polling_seconds=4,
    polling_backlog=15_000,
    settle_s=15,
)
FULL = Profile(
    name="full",
    insert_clients=(1, 2, 4, 8, 16),
    insert_seconds=8,
    produce_records=2_000_000,
    latency_rates=(500, 1000, 5000),
    latency_seconds=17,
    latency_warmup=2,
    latency_other_backend_rates=(500, 1000, 5000),
    step_start=1000,
    step_factor=1.4,
    step_max=8,
    step_seconds=12,
    keep_up_seconds=15,
    idle_seconds=150,
    heartbeat_s=10,
    backlog=1_000_000,
    polling_seconds=15,
    polling_backlog=200_000,
    settle_s=30,
)


# -- what else the machine did -------------------------------------------------------------------


def proc_snapshot() -> dict[int, tuple[str, int, float, str]]:
    """pid -> (command name, parent pid, CPU seconds, start time) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        f = stat[stat.rindex(")") + 2 :].split()
        out[int(d)] = (comm, int(f[1]), (int(f[11]) + int(f[12])) / rb.CLK_TCK, f[19])
    return out


def own_cpu() -> float:
    """CPU seconds of this process and of its children that ended and were waited for."""
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


SERVICE_COMMS = ("postgres", "java", "mariadbd", "mysqld")


class Monitor:
    """One phase's context for readers: wall time, load average, how busy the machine was and
    who used the CPU (this benchmark and its children, the services, everyone else), and
    whether PostgreSQL or Kafka restarted during it."""

    def __init__(self, name: str, db_url: str) -> None:
        self.name, self.db_url = name, db_url
        self.t0 = time.monotonic()
        self.load0 = rb.loadavg()
        self.cpu0 = rb.cpu_times()
        self.procs0 = proc_snapshot()
        self.own0 = own_cpu()
        self.epochs0 = rb.service_epochs(db_url)
        self.relay_errors: list[str] = []

    def finish(self) -> dict[str, Any]:
        procs1 = proc_snapshot()
        me = os.getpid()
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _, _) in procs1.items():
            children.setdefault(ppid, []).append(pid)
        ours, stack = set(), [me]
        while stack:
            p = stack.pop()
            ours.add(p)
            stack.extend(children.get(p, []))
        groups = {"benchmark_and_relay": 0.0, "services": 0.0, "others": 0.0}
        others: list[tuple[float, str, int]] = []
        for pid, (comm, _, cpu, started) in procs1.items():
            before = self.procs0.get(pid)
            # same process (not a reused pid): only what it used since; a new one: all of it
            used = cpu - (before[2] if before and before[3] == started else 0.0)
            if used <= 0:
                continue
            if pid in ours:
                if pid != me:
                    groups["benchmark_and_relay"] += used  # children still alive
            elif comm in SERVICE_COMMS:
                groups["services"] += used
            else:
                groups["others"] += used
                others.append((used, comm, pid))
        # this process and its children that ended (relays, generators, consumer, pgbench...)
        groups["benchmark_and_relay"] += own_cpu() - self.own0
        others.sort(reverse=True)
        wall = time.monotonic() - self.t0
        disturbed = rb.disturbances(self.epochs0, rb.service_epochs(self.db_url), [])
        cpu1 = rb.cpu_times()
        busy_s = (cpu1[0] - self.cpu0[0]) / rb.CLK_TCK
        return {
            "wall_s": round(wall, 1),
            "loadavg_start": self.load0,
            "loadavg_end": rb.loadavg(),
            "machine_cpu_busy_percent": rb.busy_percent(self.cpu0, cpu1),
            "machine_busy_cpu_s": round(busy_s, 1),
            # CPU seconds used during the phase by processes alive at its end (the benchmark's
            # own finished children, e.g. load generator processes, are not counted here)
            "cpu_s": {k: round(v, 1) for k, v in groups.items()},
            # everything busy on the machine (/proc/stat) minus this benchmark and the services
            "others_cores": round(
                max(0.0, busy_s - groups["benchmark_and_relay"] - groups["services"]) / wall, 2
            )
            if wall > 0
            else None,
            # processes neither this benchmark's nor the services' (snapshots at start and end)
            "others_top": [{"comm": c, "pid": p, "cpu_s": round(u, 1)} for u, c, p in others[:5]],
            "disturbed": disturbed + self.relay_errors,
        }


# -- open-loop load generator and checking consumer ----------------------------------------------


def payload(n: int) -> bytes:
    """``{"n":N,"pad":"xxx"}``, exactly PAYLOAD_BYTES bytes."""
    head = f'{{"n":{n},"pad":"'
    return (head + "x" * (PAYLOAD_BYTES - len(head) - 2) + '"}').encode()


def generator_worker(
    wid: int,
    processes: int,
    connections: int,
    db_url: str,
    table: str,
    topic: str,
    rate: float,
    total: int,
    n_base: int,
    seed: int,
    ready: Any,
    go: Any,
    start_at: Any,
    committed: Any,
    out_path: str,
) -> None:
    """One process of the open-loop generator, holding the connections ``c`` with
    ``c % processes == wid``, driven by one event loop over libpq's asynchronous calls (no
    threads: the generator should cost the machine as little CPU as it can).

    Event i is scheduled at ``start + i / rate`` with a key drawn from KEYS ids; connection
    ``key % connections`` sends it (so each key's events are committed in order by one
    connection), as one autocommit INSERT (one event, one transaction), at its scheduled time
    or, if that connection is still busy with an earlier event, as soon as it is free: a slow
    commit does not move the schedule, and the delay shows in the latency from the schedule."""
    rng = random.Random(seed)
    keys = [rng.randrange(KEYS) for _ in range(total)]
    mine = [c for c in range(connections) if c % processes == wid]
    queues: dict[int, deque[int]] = {c: deque() for c in mine}
    for i in range(total):
        q = queues.get(keys[i] % connections)
        if q is not None:
            q.append(i)
    ident = ".".join(f'"{part}"' for part in table.split("."))
    stmt = (
        f"INSERT INTO {ident} (topic, key, type, content_type, payload) "
        "VALUES ($1, $2, 'bench.suite', 'application/json', $3)"
    ).encode()
    topic_b = topic.encode()
    conns: dict[int, psycopg.Connection[Any]] = {}
    for cid in mine:
        c = psycopg.connect(db_url, autocommit=True, application_name="outbox-cdc-bench-gen")
        c.execute("SET synchronous_commit = on")
        res = c.pgconn.prepare(b"bench_ins", stmt)
        if res.status != pq.ExecStatus.COMMAND_OK:
            raise RuntimeError(res.get_error_message())
        conns[cid] = c
    pgs = {cid: c.pgconn for cid, c in conns.items()}
    by_fd = {pg.socket: cid for cid, pg in pgs.items()}
    ns: list[int] = []
    sched: list[float] = []
    commits: list[float] = []
    errors: list[str] = []
    ready.set()
    go.wait()
    start = start_at.value
    due = [(start + q[0] / rate, cid) for cid, q in queues.items() if q]
    heapq.heapify(due)
    inflight: dict[int, tuple[int, float]] = {}  # cid -> (i, scheduled)
    while due or inflight:
        now = time.time()
        while due and due[0][0] <= now:
            s, cid = heapq.heappop(due)
            i = queues[cid].popleft()
            pgs[cid].send_query_prepared(
                b"bench_ins", [topic_b, f"k{keys[i]}".encode(), payload(n_base + i)], [0, 0, 1]
            )
            inflight[cid] = (i, s)
        timeout = max(0.0, due[0][0] - time.time()) if due else 1.0
        if not inflight:
            time.sleep(timeout)
            continue
        readable, _, _ = select.select([pgs[c].socket for c in inflight], [], [], timeout)
        for fd in readable:
            cid = by_fd[fd]
            pg = pgs[cid]
            pg.consume_input()
            if pg.is_busy():
                continue
            res = pg.get_result()
            while pg.get_result() is not None:
                pass
            t = time.time()
            i, s = inflight.pop(cid)
            if res is None or res.status != pq.ExecStatus.COMMAND_OK:
                errors.append(res.get_error_message() if res is not None else "no result")
            else:
                commits.append(t)
                ns.append(n_base + i)
                sched.append(s)
                committed.value += 1
            q = queues[cid]
            if q:
                # its next event: at its scheduled time, or now if that has passed
                heapq.heappush(due, (start + q[0] / rate, cid))
        if len(errors) > 10:
            break
    for c in conns.values():
        c.close()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    Path(out_path).write_text(
        json.dumps(
            {
                "n": ns,
                "sched": sched,
                "commit": commits,
                "errors": errors,
                "cpu_s": ru.ru_utime + ru.ru_stime,
            }
        )
    )


N_RE = re.compile(rb'^\{"n":(\d+),')


def checking_consumer(
    bootstrap: str,
    topic: str,
    ready: Any,
    stop: Any,
    expected: Any,
    settle_timeout: float,
    out_path: str,
) -> None:
    """Reads the topic from its end: arrival time of each event (by payload n), and checks:
    duplicates (n seen twice) and per-key reordering (per partition and key, n must grow: one
    connection commits each key's events in n order)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        allow_auto_create_topics=False,
        client_id="bench-suite-consumer",
        fetch_max_wait_ms=100,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        isolation_level="read_committed",
    )
    parts = consumer.partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)
    consumer.poll(timeout_ms=100)
    ready.set()
    arrivals: dict[int, float] = {}
    ts: dict[int, int] = {}
    last: dict[tuple[int, bytes], int] = {}
    duplicates = reorders = foreign = 0
    reorder_examples: list[list[Any]] = []
    deadline = None
    while True:
        batches = consumer.poll(timeout_ms=100)
        now = time.time()
        for tp, records in batches.items():
            for rec in records:
                m = N_RE.match(rec.value or b"")
                if m is None:
                    foreign += 1
                    continue
                n = int(m.group(1))
                if n in arrivals:
                    duplicates += 1
                    continue
                arrivals[n] = now
                ts[n] = rec.timestamp
                k = (tp.partition, rec.key or b"")
                prev = last.get(k)
                if prev is not None and n < prev:
                    reorders += 1
                    if len(reorder_examples) < 5:
                        reorder_examples.append([k[1].decode(), prev, n])
                last[k] = max(n, prev or -1)
        if stop.is_set():
            if deadline is None:
                deadline = time.monotonic() + settle_timeout
            if len(arrivals) >= expected.value or time.monotonic() > deadline:
                break
    consumer.close()
    Path(out_path).write_text(
        json.dumps(
            {
                "arrivals": arrivals,
                "kafka_ts": ts,
                "duplicates": duplicates,
                "reorders": reorders,
                "reorder_examples": reorder_examples,
                "foreign_records": foreign,
            }
        )
    )


def pct_ms(values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    if not v:
        return {"count": 0}
    return {
        "count": len(v),
        "p50_ms": round(rb.percentile(v, 50) * 1000, 2),
        "p90_ms": round(rb.percentile(v, 90) * 1000, 2),
        "p99_ms": round(rb.percentile(v, 99) * 1000, 2),
        "p99_9_ms": round(rb.percentile(v, 99.9) * 1000, 2),
        "max_ms": round(v[-1] * 1000, 2),
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 with fewer than 2)."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


# -- the suite -----------------------------------------------------------------------------------


@dataclass
class SuiteBench(rb.Bench):
    """relay.Bench (table, slot, topic, cleanup) whose relay slot and Kafka client can change,
    and whose backlog can be loaded once for several drains."""

    slot_name: str | None = None
    client: str | None = None
    preloaded: dict[str, Any] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_slots: list[str] = field(default_factory=list)

    @property
    def slot(self) -> str:
        return self.slot_name or self.name

    def relay_env(self) -> dict[str, str]:
        env = super().relay_env()
        env["OUTBOX_CDC_SLOT"] = self.slot
        if self.client:
            env[rb.CLIENT_ENV] = self.client
        env.update(self.extra_env)
        return env

    def load_backlog(self, count: int, writers: int) -> dict[str, Any]:
        if self.preloaded is not None:
            return self.preloaded
        return super().load_backlog(count, writers)

    def add_slot(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (name,))
        self.extra_slots.append(name)

    def drop_slot(self, name: str) -> None:
        drop_slot(self.admin_url, name)
        if name in self.extra_slots:
            self.extra_slots.remove(name)

    def cleanup(self) -> None:
        for r in self.relays:
            if r.alive():
                r.stop(timeout=30)
        for s in list(self.extra_slots):
            try:
                self.drop_slot(s)
            except Exception as exc:
                log(f"cleanup: slot {s} not dropped ({exc!r}): drop it by hand")
        self.slot_name = None
        super().cleanup()


def drop_slot(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        for _ in range(100):
            row = conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)
            ).fetchone()
            if row is None or row[0] is None:
                break
            time.sleep(0.1)
        else:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (name,),
            )
            time.sleep(1)
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (name,),
        )
        with contextlib.suppress(psycopg.errors.UndefinedTable):
            conn.execute("DELETE FROM outbox_cdc_offsets WHERE slot_name = %s", (name,))


def bench_args(a: argparse.Namespace, **over: Any) -> argparse.Namespace:
    """The namespace relay.Bench expects."""
    ns = argparse.Namespace(
        log_append_time=False,
        partitions=a.partitions,
        relay_env={},
        relay_command="",
        log=a.log,
        payload_pad=PAYLOAD_BYTES - 20,  # {"n":NNNNNN,"pad":"..."} ~ 256 bytes (251-257)
        keys=KEYS,
        backlog=0,
        backlog_method="sql",
        backlog_writers=2,
        drain_timeout=a.drain_timeout,
        seconds=0,
        settle_timeout=30,
    )
    for k, v in over.items():
        setattr(ns, k, v)
    return ns


class Suite:
    def __init__(self, a: argparse.Namespace, p: Profile) -> None:
        self.a, self.p = a, p
        self.db_url, self.admin_url, self.bootstrap = a.database_url, a.admin_url, a.bootstrap
        self.r: dict[str, Any] = {}
        self.phases: dict[str, Any] = {}
        self.benches: list[rb.Bench] = []
        self.n_next = 0
        self.failed: list[str] = []
        self.ctx = multiprocessing.get_context("spawn")
        self.relay_errors: list[str] = []

    # -- plumbing -------------------------------------------------------------------------------

    def phase(self, name: str, fn: Any, *args: Any, retry: bool = False) -> Any:
        """Run one phase: its monitor figures in ``phases``; a failure is recorded and the suite
        goes on with the next phase. ``retry``: a phase that failed or was disturbed (a service
        restarted: someone else's fault test) runs once more; the first attempt's context stays
        in ``phases`` as "<name> (attempt 1)"."""
        log(f"=== {name} ===")
        mon = Monitor(name, self.db_url)
        self.relay_errors = []
        failed = False
        try:
            return fn(*args)
        except Unavailable as exc:
            log(f"{name}: skipped: {exc}")
            self.r.setdefault("unavailable", {})[name] = str(exc)
            return None
        except Exception as exc:
            log(f"{name} FAILED: {exc!r}")
            failed = True
            self.r.setdefault("errors", {})[name] = {
                "error": repr(exc),
                "traceback": traceback.format_exc(),
            }
            return None
        finally:
            m = mon.finish()
            if self.relay_errors:
                m["disturbed"].append(
                    f"relay logged {len(self.relay_errors)} error lines, first: "
                    f"{self.relay_errors[0][:300]}"
                )
            self.phases[name] = m
            log(
                f"{name}: {m['wall_s']} s, machine {m['machine_cpu_busy_percent']}% busy, "
                f"others {m['others_cores']} cores, load {m['loadavg_end']}"
                + (f"; DISTURBED: {m['disturbed']}" if m["disturbed"] else "")
            )
            if (failed or m["disturbed"]) and retry:
                self.phases[f"{name} (attempt 1)"] = {**m, "failed": failed}
                log(f"{name}: once more")
                self.r.get("errors", {}).pop(name, None)
                failed = False
                self.phase(name, fn, *args, retry=False)
            elif failed:
                self.failed.append(name)

    def new_bench(self, **over: Any) -> SuiteBench:
        b = SuiteBench(bench_args(self.a, **over), self.db_url, self.admin_url, self.bootstrap)
        self.benches.append(b)
        return b

    def start_relay(self, b: SuiteBench, label: str, client: str) -> rb.RelayProcess:
        b.client = client
        r = b.new_relay(label)
        r.wait_streaming(60)
        return r

    # -- ceilings -------------------------------------------------------------------------------

    def ceiling_insert(self) -> dict[str, Any]:
        b = self.new_bench()
        b.init_args = lambda: ["--no-slot"]  # type: ignore[method-assign]
        b.setup()
        by: dict[str, Any] = {}
        for c in self.p.insert_clients:
            res = self.pgbench(b, c, self.p.insert_seconds)
            by[str(c)] = res
            log(f"insert ceiling: {c} clients: {res['tps']:,.0f} tps")
            with b.connect(autocommit=True) as conn:
                conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier("public", b.name)))
        b.cleanup()
        best = max(by, key=lambda k: by[k]["tps"])
        out = {
            "tool": "pgbench (-M prepared, custom script: one outbox INSERT per transaction, "
            "256-byte payload, key from 10,000 ids)",
            "synchronous_commit": "on",
            "by_clients": by,
            "best_clients": int(best),
            "events_per_s": by[best]["tps"],
        }
        self.r["ceilings"]["insert"] = out
        return out

    def pgbench_script(self, table: str, topic: str) -> str:
        head_len = len('{"n":') + len(',"pad":"') + 2
        return (
            f"\\set k random(0, {KEYS - 1})\n"
            "\\set n random(100000000, 999999999)\n"
            f"INSERT INTO {table} (topic, key, type, content_type, payload) VALUES "
            f"('{topic}', 'k' || :k, 'bench.pgbench', 'application/json', "
            f'convert_to(\'{{"n":\' || :n || \',"pad":"\' || '
            f"repeat('x', {PAYLOAD_BYTES - head_len - 9}) || '\"}}', 'UTF8'));\n"
        )

    def pgbench(self, b: SuiteBench, clients: int, seconds: float) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="bench-suite-") as f:
            f.write(self.pgbench_script(b.table, b.topic))
            f.flush()
            cmd = [
                tool("pgbench"),
                "-n",
                "-M",
                "prepared",
                "-f",
                f.name,
                "-c",
                str(clients),
                "-j",
                str(min(clients, 4)),
                "-T",
                str(max(1, round(seconds))),
                self.db_url,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        if out.returncode != 0:
            raise RuntimeError(f"pgbench failed: {out.stderr.strip()[-500:]}")
        tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out.stdout)
        lat = re.search(r"latency average = ([\d.]+) ms", out.stdout)
        done = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
        if not tps or not done:
            raise RuntimeError(f"pgbench output not understood:\n{out.stdout[-800:]}")
        return {
            "clients": clients,
            "tps": round(float(tps.group(1)), 1),
            "transactions": int(done.group(1)),
            "failed_transactions": int(failed.group(1)) if failed else 0,
            "latency_avg_ms": float(lat.group(1)) if lat else None,
        }

    def ceiling_produce(self) -> dict[str, Any]:
        lib = rb.kafka_home() / "lib"
        if not shutil.which("java") or not list(lib.glob("kafka-tools-*.jar")):
            raise Unavailable(f"java or the broker's jars ({lib}/kafka-tools-*.jar) not found")
        topic = "bench_produce_" + os.urandom(4).hex()
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap.split(","), client_id="bench")
        try:
            admin.create_topics([NewTopic(topic, self.a.partitions, 1)])
            log4j = rb.kafka_home() / "log4j2.properties"
            cmd = [
                "java",
                "-Xmx256m",
                f"-Dlog4j2.configurationFile={log4j}",
                "-cp",
                f"{lib}/*",
                "org.apache.kafka.tools.ProducerPerformance",
                "--topic",
                topic,
                "--num-records",
                str(self.p.produce_records),
                "--record-size",
                str(PAYLOAD_BYTES),
                "--throughput",
                "-1",
                "--producer-props",
                f"bootstrap.servers={self.bootstrap}",
                "acks=all",
                "enable.idempotence=true",
                "linger.ms=5",
                "batch.size=65536",
            ]
            t0 = time.monotonic()
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            wall = time.monotonic() - t0
        finally:
            with contextlib.suppress(Exception):
                admin.delete_topics([topic])
            admin.close()
        # the last line is the summary of the whole run; the ones before are 5-second windows
        matches = list(
            re.finditer(
                r"(\d+) records sent, ([\d.]+) records/sec \(([\d.]+) MB/sec\), "
                r"([\d.]+) ms avg latency, ([\d.]+) ms max latency",
                out.stdout,
            )
        )
        m = matches[-1] if matches else None
        if out.returncode != 0 or not m:
            raise RuntimeError(
                f"ProducerPerformance failed ({out.returncode}): {out.stderr[-500:]}"
                f"{out.stdout[-500:]}"
            )
        res = {
            "tool": "org.apache.kafka.tools.ProducerPerformance (the broker's own jars), "
            "acks=all, idempotence, linger.ms=5, batch.size=65536 (the relay's settings)",
            "records": int(m.group(1)),
            "record_bytes": PAYLOAD_BYTES,
            "events_per_s": round(float(m.group(2)), 1),
            "mb_per_s": float(m.group(3)),
            "avg_latency_ms": float(m.group(4)),
            "max_latency_ms": float(m.group(5)),
            "wall_s_incl_jvm_start": round(wall, 1),
        }
        self.r["ceilings"]["produce"] = res
        log(f"produce ceiling: {res['events_per_s']:,.0f} records/s")
        return res

    def ceiling_decode(self, b: SuiteBench, slot: str, events: int, endpos: str) -> dict[str, Any]:
        opts = wal2json.plugin_options(b.table, None)
        cmd = [
            tool("pg_recvlogical"),
            "-d",
            self.db_url,
            "--slot",
            slot,
            "--start",
            "--endpos",
            endpos,
            "--no-loop",
            "-f",
            "/dev/null",
        ]
        for k, v in opts.items():
            cmd += ["-o", f"{k}={v}"]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if out.returncode != 0:
            raise RuntimeError(f"pg_recvlogical failed: {out.stderr.strip()[-500:]}")
        res = {
            "tool": "pg_recvlogical to /dev/null, the relay's wal2json options (format 2, "
            "add-tables = the outbox table)",
            "events": events,
            "seconds": round(wall, 2),
            "events_per_s": round(events / wall, 1),
            "pg_recvlogical_cpu_s": round(
                ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 2
            ),
        }
        self.r["ceilings"]["decode"] = res
        log(f"decode ceiling: {res['events_per_s']:,.0f} events/s")
        return res

    # -- open-loop runs -------------------------------------------------------------------------

    def open_loop(
        self,
        b: SuiteBench,
        relay: rb.RelayProcess,
        rate: float,
        seconds: float,
        warmup: float,
        offsets: rb.Offsets,
    ) -> dict[str, Any]:
        total = int(rate * seconds)
        # enough connections to ride out commit stalls (fsync under other people's I/O):
        # one per 250 events/s, at least 4; one process (an event loop) per 4,000 events/s
        connections = min(32, max(4, math.ceil(rate / 250)))
        workers = min(connections, max(1, math.ceil(rate / 4000)))
        n_base = self.n_next
        self.n_next += total + 1000
        seed = n_base
        ctx = self.ctx
        tmpdir = tempfile.mkdtemp(prefix="bench-suite-")
        try:
            ready_c, stop_c = ctx.Event(), ctx.Event()
            expected = ctx.Value("q", 0)
            cons_out = f"{tmpdir}/consumer.json"
            cons = ctx.Process(
                target=checking_consumer,
                args=(self.bootstrap, b.topic, ready_c, stop_c, expected, self.p.settle_s,
                      cons_out),
                daemon=True,
            )  # fmt: skip
            cons.start()
            go = ctx.Event()
            start_at = ctx.Value("d", 0.0)
            procs, readies, counters = [], [], []
            for w in range(workers):
                ev, cnt = ctx.Event(), ctx.Value("q", 0, lock=False)
                pr = ctx.Process(
                    target=generator_worker,
                    args=(w, workers, connections, self.db_url, b.table, b.topic, rate, total,
                          n_base, seed,
                          ev, go, start_at, cnt, f"{tmpdir}/gen{w}.json"),
                    daemon=True,
                )  # fmt: skip
                pr.start()
                procs.append(pr)
                readies.append(ev)
                counters.append(cnt)
            try:
                deadline = time.monotonic() + 60
                for ev in [ready_c, *readies]:
                    while not ev.wait(0.1):
                        if time.monotonic() > deadline:
                            raise RuntimeError("load generator or consumer not ready after 60 s")
                        if not cons.is_alive() or not all(pr.is_alive() for pr in procs):
                            raise RuntimeError("load generator or consumer process failed")
                base = offsets.total()
                cpu0 = relay.stats()
                start = time.time() + 0.2
                start_at.value = start
                go.set()
                series: list[tuple[float, int, int, int]] = []  # t, scheduled, committed, in Kafka
                end = start + seconds
                while any(pr.is_alive() for pr in procs):
                    now = time.time()
                    sched_n = min(total, max(0, int((now - start) * rate)))
                    comm = sum(c.value for c in counters)
                    series.append((now - start, sched_n, comm, offsets.total() - base))
                    if now > end + 120:
                        raise RuntimeError("load generator 120 s behind its schedule")
                    if not relay.alive():
                        raise RuntimeError(f"relay exited ({relay.proc and relay.proc.returncode})")
                    time.sleep(0.25)
                gen_end = time.time()
                cpu1 = relay.stats()
                committed = sum(c.value for c in counters)
                expected.value = committed
                stop_c.set()
                # the tail: until everything is in Kafka (for the backlog series)
                t_tail = time.monotonic()
                while offsets.total() - base < committed and time.monotonic() - t_tail < 60:
                    series.append((time.time() - start, total, committed, offsets.total() - base))
                    time.sleep(0.25)
                cons.join(self.p.settle_s + 60)
                if cons.exitcode != 0:
                    raise RuntimeError(f"consumer failed (exit {cons.exitcode})")
            finally:
                for pr in [*procs, cons]:
                    if pr.is_alive():
                        pr.kill()
                        pr.join(5)
            gens = [json.loads(Path(f"{tmpdir}/gen{w}.json").read_text()) for w in range(workers)]
            got = json.loads(Path(cons_out).read_text())
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        arrivals = {int(k): v for k, v in got["arrivals"].items()}
        kafka_ts = {int(k): v for k, v in got["kafka_ts"].items()}
        from_commit, from_sched, sched_to_commit, to_ts = [], [], [], []
        missing = 0
        committed_ns: set[int] = set()
        for g in gens:
            for n, s, c in zip(g["n"], g["sched"], g["commit"], strict=True):
                committed_ns.add(n)
                t = arrivals.get(n)
                if t is None:
                    missing += 1
                    continue
                if s < start + warmup:
                    continue
                from_commit.append(t - c)
                from_sched.append(t - s)
                sched_to_commit.append(c - s)
                to_ts.append((kafka_ts[n] + 0.5) / 1000 - c)
        unexpected = sum(1 for n in arrivals if n not in committed_ns)
        errors = [e for g in gens for e in g["errors"]]
        # backlog growth over the measured window: relay backlog = committed - in Kafka
        window = [(t, c - k) for t, _, c, k in series if warmup <= t <= seconds]
        grow = slope(window)
        final_backlog = next((c - k for t, _, c, k in reversed(series) if t <= seconds), 0)
        behind = [(t, s - c) for t, s, c, _ in series if warmup <= t <= seconds]
        gen_behind_end = behind[-1][1] if behind else 0
        last_commit = max((max(g["commit"]) for g in gens if g["commit"]), default=gen_end)
        on_time = sum(1 for g in gens for c in g["commit"] if c <= start + seconds + 0.5)
        achieved = committed / max(1e-9, last_commit - start)
        relay_cpu = (cpu1["cpu_s"] - cpu0["cpu_s"]) if cpu0 and cpu1 else None
        kept_schedule = on_time >= 0.97 * total and not errors
        kept_up = grow <= max(20.0, 0.02 * rate) and final_backlog <= max(100, 0.5 * rate)
        res = {
            "offered_rate_per_s": rate,
            "seconds": seconds,
            "warmup_s": warmup,
            "generator_connections": connections,
            "generator_processes": workers,
            "events_scheduled": total,
            "events_committed": committed,
            "achieved_commit_rate_per_s": round(achieved, 1),
            "generator_errors": errors[:5],
            "generator_cpu_s": round(sum(g["cpu_s"] for g in gens), 2),
            "generator_behind_schedule_at_end": gen_behind_end,
            "committed_by_schedule_end_plus_0_5_s": on_time,
            "latency_commit_to_consume": pct_ms(from_commit),
            "latency_schedule_to_consume": pct_ms(from_sched),
            "latency_schedule_to_commit": pct_ms(sched_to_commit),
            # the record's CreateTime (set when the relay's producer takes the record) - commit
            "latency_commit_to_relay_send": pct_ms(to_ts),
            "gaps": missing,
            "duplicates": got["duplicates"],
            "per_key_reorders": got["reorders"],
            "reorder_examples": got["reorder_examples"],
            "unexpected_records": unexpected + got["foreign_records"],
            "relay_backlog_growth_per_s": round(grow, 1),
            "relay_backlog_at_end": final_backlog,
            "kept_schedule": kept_schedule,
            "relay_kept_up": kept_up,
            "relay_cpu_s": None if relay_cpu is None else round(relay_cpu, 2),
            "relay_cpu_ms_per_1000_events": None
            if relay_cpu is None
            else round(relay_cpu / max(1, committed) * 1e6, 1),
            "relay_cpu_percent_of_one_core": None
            if relay_cpu is None
            else round(relay_cpu / max(1e-9, gen_end - start) * 100, 1),
            "relay_rss_mib": (cpu1 or {}).get("rss_mib"),
            "series": [[round(t, 2), s, c, k] for t, s, c, k in series[::2]],
        }
        lc, ls = res["latency_commit_to_consume"], res["latency_schedule_to_consume"]
        log(
            f"  {rate:>6,.0f}/s: achieved {achieved:,.0f}/s, commit->consume p50/p99/p99.9 "
            f"{lc.get('p50_ms')}/{lc.get('p99_ms')}/{lc.get('p99_9_ms')} ms, from schedule p99 "
            f"{ls.get('p99_ms')} ms; backlog growth {grow:.0f}/s, gaps {missing}, dups "
            f"{got['duplicates']}, reorders {got['reorders']}"
        )
        return res

    def scenario_latency(self, b: SuiteBench, client: str, rates: tuple[int, ...]) -> None:
        relay = self.start_relay(b, f"latency {client}", client)
        offsets = rb.Offsets(self.bootstrap, b.topic)
        out: dict[str, Any] = {}
        self.r["scenarios"].setdefault("latency", {})[client] = out
        try:
            for rate in rates:
                out[str(rate)] = self.open_loop(
                    b, relay, rate, self.p.latency_seconds, self.p.latency_warmup, offsets
                )
        finally:
            offsets.close()
            relay.stop()
            self.note_relay(relay, out)

    def note_relay(self, relay: rb.RelayProcess, out: dict[str, Any]) -> None:
        summary = relay.log_summary()
        out["relay_log"] = summary
        self.relay_errors.extend(summary["first_errors"])

    def scenario_sustained(self, b: SuiteBench, client: str) -> None:
        relay = self.start_relay(b, f"sustained {client}", client)
        offsets = rb.Offsets(self.bootstrap, b.topic)
        steps: list[dict[str, Any]] = []
        out: dict[str, Any] = {"client": client, "steps": steps}
        self.r["scenarios"]["sustained"] = out
        try:
            rate = float(self.p.step_start)
            best, fail = None, None
            limit = None
            for _ in range(self.p.step_max):
                s = self.open_loop(
                    b, relay, rate, self.p.step_seconds, min(2.0, self.p.step_seconds / 4), offsets
                )
                steps.append(s)
                if s["relay_kept_up"] and s["kept_schedule"]:
                    best = rate
                    rate = round(rate * self.p.step_factor)
                    continue
                fail = rate
                limit = (
                    "relay (its backlog grew)"
                    if not s["relay_kept_up"]
                    else "load generator and database (the offered rate was not committed "
                    "on schedule; the relay kept up)"
                )
                break
            if best is not None and fail is not None and self.p.name == "full":
                mid = round(math.sqrt(best * fail))
                s = self.open_loop(b, relay, mid, self.p.step_seconds, 2.0, offsets)
                steps.append(s)
                if s["relay_kept_up"] and s["kept_schedule"]:
                    best = mid
            out.update(
                highest_sustained_per_s=best,
                first_failed_rate_per_s=fail,
                limited_by=limit or f"not reached within {self.p.step_max} steps",
                criterion="over the measured window the relay's backlog (committed - in Kafka) "
                "grows by at most max(20, 2% of the rate) events/s and ends below max(100, "
                "0.5 s of events); and the generator committed on schedule (at least 97% of "
                "the step's events committed by 0.5 s after its last scheduled time)",
            )
        finally:
            offsets.close()
            relay.stop()
            self.note_relay(relay, out)

    def scenario_keep_up(self, b: SuiteBench, client: str) -> None:
        """pgbench at its best client count while the relay runs: does the relay keep up with
        the database's highest INSERT rate?"""
        ceiling = self.r["ceilings"].get("insert") or {}
        clients = ceiling.get("best_clients") or 4
        relay = self.start_relay(b, f"keep-up {client}", client)
        offsets = rb.Offsets(self.bootstrap, b.topic)
        out: dict[str, Any] = {"client": client, "pgbench_clients": clients}
        self.r["scenarios"]["keep_up_pgbench"] = out
        try:
            base = offsets.total()
            series: list[tuple[float, int]] = []
            done: dict[str, Any] = {}

            def run() -> None:
                try:
                    done["res"] = self.pgbench(b, clients, self.p.keep_up_seconds)
                except Exception as exc:
                    done["err"] = exc

            cpu0 = relay.stats()
            th = threading.Thread(target=run, daemon=True)
            t0 = time.monotonic()
            th.start()
            while th.is_alive():
                series.append((time.monotonic() - t0, offsets.total() - base))
                time.sleep(0.25)
            t_end = time.monotonic() - t0
            if "err" in done:
                raise done["err"]
            res = done["res"]
            inserted = res["transactions"]
            at_end = offsets.total() - base
            series.append((t_end, at_end))
            cpu1 = relay.stats()
            while offsets.total() - base < inserted and time.monotonic() - t0 < t_end + 120:
                time.sleep(0.1)
            t_all = time.monotonic() - t0
            delivered = offsets.total() - base
            insert_rate = res["tps"]
            run_s = max(1.0, round(self.p.keep_up_seconds))
            # relay rate during the run: what reached Kafka while pgbench ran (its first
            # second excluded: connections, and the relay waits for the first commits)
            win = [(t, k) for t, k in series if t >= 1.0]
            relay_rate = slope(win) if len(win) > 2 else at_end / t_end
            out.update(
                pgbench=res,
                insert_rate_per_s=insert_rate,
                inserted=inserted,
                in_kafka_when_pgbench_ended=at_end,
                backlog_when_pgbench_ended=inserted - at_end,
                backlog_seconds_of_inserts=round((inserted - at_end) / max(1, insert_rate), 2),
                seconds_after_pgbench_until_all_in_kafka=round(t_all - t_end, 2),
                delivered=delivered,
                relay_rate_during_per_s=round(relay_rate, 1),
                relay_over_insert_rate=round(relay_rate / insert_rate, 3) if insert_rate else None,
                relay_cpu_ms_per_1000_events=round(
                    (cpu1["cpu_s"] - cpu0["cpu_s"]) / max(1, at_end) * 1e6, 1
                )
                if cpu0 and cpu1
                else None,
                run_s=run_s,
                series=[[round(t, 2), k] for t, k in series],
            )
            log(
                f"keep-up: pgbench {insert_rate:,.0f} tps ({clients} clients), relay "
                f"{relay_rate:,.0f}/s during it, backlog at the end {inserted - at_end}"
            )
        finally:
            offsets.close()
            relay.stop()
            self.note_relay(relay, out)

    # -- WAL retained while idle ----------------------------------------------------------------

    def scenario_wal_idle(self, b: SuiteBench) -> None:
        hb_slot = b.name
        nohb_slot = b.name + "_nohb"
        b.add_slot(nohb_slot)
        noise = f"{b.name}_noise"
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, pad text)").format(
                    sql.Identifier(noise)
                )
            )
        relays = []
        try:
            b.extra_env = {"OUTBOX_CDC_HEARTBEAT_INTERVAL": f"{self.p.heartbeat_s:g}"}
            relays.append(self.start_relay(b, "idle, heartbeats", "kafka-python"))
            b.extra_env, b.slot_name = {}, nohb_slot
            relays.append(self.start_relay(b, "idle, no heartbeats", "kafka-python"))
            b.slot_name = None
            stop = threading.Event()
            written = [0]

            def write_noise() -> None:
                with psycopg.connect(self.db_url, autocommit=True) as conn:
                    stmt = sql.SQL("INSERT INTO {} (pad) VALUES (repeat('y', 1000))").format(
                        sql.Identifier(noise)
                    )
                    while not stop.is_set():
                        conn.execute(stmt)
                        written[0] += 1
                        time.sleep(0.01)  # about 100 transactions/s of 1 kB

            th = threading.Thread(target=write_noise, daemon=True)
            th.start()
            samples: list[list[Any]] = []
            t0 = time.monotonic()
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                lsn0 = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]  # type: ignore[index]
                while time.monotonic() - t0 < self.p.idle_seconds:
                    rows = conn.execute(
                        "SELECT slot_name, (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint,"
                        " (pg_current_wal_lsn() - restart_lsn)::bigint FROM pg_replication_slots"
                        " WHERE slot_name IN (%s, %s)",
                        (hb_slot, nohb_slot),
                    ).fetchall()
                    d = {r[0]: (r[1], r[2]) for r in rows}
                    samples.append(
                        [round(time.monotonic() - t0, 1), *d.get(hb_slot, (None, None)),
                         *d.get(nohb_slot, (None, None))]
                    )  # fmt: skip
                    time.sleep(1.0)
                wal_written = conn.execute(
                    "SELECT (pg_current_wal_lsn() - %s::pg_lsn)::bigint", (lsn0,)
                ).fetchone()[0]  # type: ignore[index]
            stop.set()
            th.join(5)
        finally:
            for r in relays:
                r.stop()
            b.extra_env, b.slot_name = {}, None
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(noise)))
            b.drop_slot(nohb_slot)

        def stat(col: int) -> dict[str, Any]:
            vals = [s[col] for s in samples if s[col] is not None]
            half = [s[col] for s in samples[len(samples) // 2 :] if s[col] is not None]
            return {
                "max_bytes": max(vals) if vals else None,
                "last_bytes": vals[-1] if vals else None,
                "max_bytes_second_half": max(half) if half else None,
            }

        self.r["scenarios"]["wal_idle"] = {
            "seconds": self.p.idle_seconds,
            "other_table_writes": written[0],
            "wal_written_bytes": wal_written,
            "heartbeat_interval_s": self.p.heartbeat_s,
            "with_heartbeats": {
                "confirmed_flush_lag": stat(1),
                "restart_lsn_lag (WAL kept on disk)": stat(2),
            },
            "without_heartbeats": {
                "confirmed_flush_lag": stat(3),
                "restart_lsn_lag (WAL kept on disk)": stat(4),
            },
            "samples": samples,
            "columns": [
                "t_s",
                "hb_confirmed_lag",
                "hb_restart_lag",
                "nohb_confirmed_lag",
                "nohb_restart_lag",
            ],
            "relay_logs": [r.log_summary() for r in relays],
        }
        log(
            f"wal idle: wrote {wal_written:,} bytes of WAL; retained (restart_lsn) with "
            f"heartbeats max {stat(2)['max_bytes']}, without {stat(4)['max_bytes']}"
        )

    # -- backlog --------------------------------------------------------------------------------

    def scenario_backlog(self) -> None:
        n = self.p.backlog
        b = self.new_bench(backlog=n)
        b.setup()  # table, slot for kafka-python (its name), topic
        slots = {"kafka-python": b.name, "confluent": b.name + "_cf", "decode": b.name + "_dec"}
        b.add_slot(slots["confluent"])
        b.add_slot(slots["decode"])
        drains: dict[str, Any] = {}
        self.r["scenarios"]["drain"] = drains
        try:
            log(f"backlog: loading {n:,} one-row transactions")
            load = rb.Bench.load_backlog(b, n, 2)
            load["synchronous_commit"] = "off (loading only)"
            drains["load"] = load
            with psycopg.connect(self.db_url) as conn:
                endpos = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
            log(f"backlog: loaded in {load['load_s']} s; decode ceiling (pg_recvlogical)")
            self.phase("ceiling: decode", self.ceiling_decode, b, slots["decode"], n, endpos)
            b.drop_slot(slots["decode"])
            b.preloaded = load
            offsets = rb.Offsets(self.bootstrap, b.topic)
            try:
                for client in ("kafka-python", "confluent"):

                    def drain(client: str = client) -> None:
                        b.client, b.slot_name = client, slots[client]
                        relay = b.run_backlog(offsets)
                        relay.stop()
                        res = dict(b.results.pop("backlog"))
                        res["relay_log"] = relay.log_summary()
                        self.relay_errors.extend(res["relay_log"]["first_errors"])
                        res["relay_peak_rss_mb"] = round(res["relay_peak_rss_mib"] * 1.048576, 1)
                        res["relay_cpu_ms_per_1000_events"] = res.get("relay_cpu_us_per_event")
                        drains[client] = res
                        log(
                            f"drain {client}: {res['events_per_s_incl_startup']:,.0f}/s, "
                            f"peak RSS {res['relay_peak_rss_mib']} MiB, CPU "
                            f"{res['relay_cpu_ms_per_1000_events']} ms/1000 events"
                        )

                    self.phase(f"drain: {client}", drain)
                    b.slot_name = None
                    b.drop_slot(slots[client])  # the WAL it holds is no longer needed
            finally:
                offsets.close()
        finally:
            b.preloaded = None
            b.cleanup()

    # -- polling --------------------------------------------------------------------------------

    def scenario_polling(self) -> None:
        import polling as pb

        a = bench_args(self.a, backlog=self.p.polling_backlog)
        b = pb.PollingBench(a, self.db_url, self.admin_url, self.bootstrap, dialect="postgresql")
        self.benches.append(b)
        out: dict[str, Any] = {"settings": "poll_interval 0.1 s, poll_batch_size 1000, "
                               "kafka-python (the relay's defaults)"}  # fmt: skip
        self.r["scenarios"]["polling"] = out
        try:
            b.setup()
            relay = b.new_relay("polling latency")
            relay.wait_streaming(60)
            offsets = rb.Offsets(self.bootstrap, b.topic)
            try:
                out["latency_1000"] = self.open_loop(
                    b,  # type: ignore[arg-type]
                    relay,
                    1000,
                    self.p.polling_seconds,
                    self.p.latency_warmup,
                    offsets,
                )
                relay.stop()
                out["latency_relay_log"] = relay.log_summary()
                self.relay_errors.extend(out["latency_relay_log"]["first_errors"])
                r2 = b.run_backlog(offsets)
                r2.stop()
                d = dict(b.results.pop("backlog"))
                d["relay_log"] = r2.log_summary()
                self.relay_errors.extend(d["relay_log"]["first_errors"])
                d["relay_cpu_ms_per_1000_events"] = d.get("relay_cpu_us_per_event")
                out["drain"] = d
                log(f"polling drain: {d['events_per_s_incl_startup']:,.0f}/s")
            finally:
                offsets.close()
        finally:
            b.cleanup()

    # -- all ------------------------------------------------------------------------------------

    def run(self) -> None:
        p = self.p
        self.r["ceilings"] = {}
        self.r["scenarios"] = {}
        self.phase("ceiling: insert", self.ceiling_insert, retry=True)
        self.phase("ceiling: produce", self.ceiling_produce, retry=True)
        main = self.new_bench()
        try:
            main.setup()
            self.phase(
                "latency: kafka-python", self.scenario_latency, main, "kafka-python",
                p.latency_rates, retry=True,
            )  # fmt: skip
            self.phase(
                "latency: confluent", self.scenario_latency, main, "confluent",
                p.latency_other_backend_rates, retry=True,
            )  # fmt: skip
            self.phase(
                "sustained rate: confluent", self.scenario_sustained, main, "confluent", retry=True
            )
            self.phase(
                "keep-up with pgbench: confluent",
                self.scenario_keep_up,
                main,
                "confluent",
                retry=True,
            )
            self.phase("WAL retained while idle", self.scenario_wal_idle, main, retry=True)
        finally:
            main.cleanup()
        # load, then its own phases: decode ceiling, one drain per client
        self.phase("backlog", self.scenario_backlog)
        self.phase("polling", self.scenario_polling, retry=True)

    def cleanup(self) -> None:
        for b in self.benches:
            with contextlib.suppress(Exception):
                b.cleanup()


# -- ratios and targets --------------------------------------------------------------------------


def g(d: Any, *path: Any) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(x: Any, y: Any) -> float | None:
    return (
        round(x / y, 3) if isinstance(x, int | float) and isinstance(y, int | float) and y else None
    )


def analyse(r: dict[str, Any]) -> None:
    c = r.get("ceilings") or {}
    s = r.get("scenarios") or {}
    ins, dec, prod = (g(c, k, "events_per_s") for k in ("insert", "decode", "produce"))
    throughputs = {
        "sustained rate (open loop, confluent)": g(s, "sustained", "highest_sustained_per_s"),
        "relay rate during pgbench at its best (confluent)": g(
            s, "keep_up_pgbench", "relay_rate_during_per_s"
        ),
        "drain kafka-python": g(s, "drain", "kafka-python", "events_per_s_incl_startup"),
        "drain confluent": g(s, "drain", "confluent", "events_per_s_incl_startup"),
        "drain polling (kafka-python)": g(s, "polling", "drain", "events_per_s_incl_startup"),
    }
    r["ratios_to_ceilings"] = {
        name: {
            "events_per_s": v,
            "over_insert_ceiling": ratio(v, ins),
            "over_decode_ceiling": ratio(v, dec),
            "over_produce_ceiling": ratio(v, prod),
        }
        for name, v in throughputs.items()
    }
    for rates in (g(s, "latency") or {}).values():
        for run in rates.values():
            if isinstance(run, dict) and "offered_rate_per_s" in run:
                run["offered_over_insert_ceiling"] = ratio(run["offered_rate_per_s"], ins)
    drains = {
        k: g(s, "drain", k, "events_per_s_incl_startup") for k in ("kafka-python", "confluent")
    }
    faster = max((k for k in drains if drains[k]), key=lambda k: drains[k], default=None)
    rss = [g(s, "drain", k, "relay_peak_rss_mb") for k in ("kafka-python", "confluent")]
    rss_v = [x for x in rss if x is not None]
    sustained = throughputs["sustained rate (open loop, confluent)"]
    p99 = {k: g(s, "latency", k, "1000", "latency_commit_to_consume", "p99_ms") for k in
           ("kafka-python", "confluent")}  # fmt: skip
    backlog_n = g(s, "drain", "load", "rows")

    def target(name: str, goal: str, measured: Any, value: Any, ok: bool | None) -> dict[str, Any]:
        return {"target": name, "goal": goal, "measured": measured, "value": value, "met": ok}

    keep = ratio(sustained, ins)
    keep_pg = g(s, "keep_up_pgbench", "relay_over_insert_rate")
    dr = ratio(drains.get(faster) if faster else None, dec)
    r["targets"] = [
        target(
            "relay keeps up with the highest single-row INSERT rate",
            f"ratio >= {TARGETS['keep_up_ratio']}",
            f"highest sustained {sustained}/s over pgbench ceiling {ins}/s; with pgbench at "
            f"its best running: relay/insert rate {keep_pg}",
            keep,
            None if keep is None else keep >= TARGETS["keep_up_ratio"],
        ),
        target(
            "p99 commit-to-Kafka at 1,000 events/s",
            f"<= {TARGETS['p99_ms_at_1000']:g} ms",
            f"commit -> consume p99 (an upper bound of commit -> Kafka): kafka-python (the "
            f"default client) {p99['kafka-python']} ms, confluent {p99['confluent']} ms",
            p99["kafka-python"],
            None
            if p99["kafka-python"] is None
            else p99["kafka-python"] <= TARGETS["p99_ms_at_1000"],
        ),
        target(
            "backlog drain over wal2json's decode rate, faster backend",
            f">= {TARGETS['drain_over_decode']}",
            f"{faster}: {drains.get(faster) if faster else None}/s over {dec}/s",
            dr,
            None if dr is None else dr >= TARGETS["drain_over_decode"],
        ),
        target(
            f"peak memory draining {backlog_n:,} events" if backlog_n else "peak memory draining",
            f"<= {TARGETS['peak_rss_mb']:g} MB",
            f"relay peak RSS: kafka-python {rss[0]} MB, confluent {rss[1]} MB",
            max(rss_v) if rss_v else None,
            None if not rss_v else max(rss_v) <= TARGETS["peak_rss_mb"],
        ),
    ]


def correctness(r: dict[str, Any]) -> dict[str, Any]:
    """Gaps, duplicates and per-key reorders summed over every open-loop run."""
    runs: list[dict[str, Any]] = []
    s = r.get("scenarios") or {}
    for rates in (g(s, "latency") or {}).values():
        runs += [v for v in rates.values() if isinstance(v, dict) and "gaps" in v]
    runs += g(s, "sustained", "steps") or []
    if g(s, "polling", "latency_1000"):
        runs.append(s["polling"]["latency_1000"])
    return {
        "open_loop_runs": len(runs),
        "events_committed": sum(x["events_committed"] for x in runs),
        "gaps": sum(x["gaps"] for x in runs),
        "duplicates": sum(x["duplicates"] for x in runs),
        "per_key_reorders": sum(x["per_key_reorders"] for x in runs),
        "unexpected_records": sum(x["unexpected_records"] for x in runs),
        "drain_extra_records_in_kafka": sum(
            (g(s, "drain", k, "extra_records_in_kafka") or 0) for k in ("kafka-python", "confluent")
        ),
    }


# -- output --------------------------------------------------------------------------------------


def print_summary(r: dict[str, Any], out: Path) -> None:
    c = r.get("ceilings") or {}
    print(f"\noutbox-cdc benchmark suite ({r['mode']}), {r['date']}, {r['duration_s']} s, "
          f"status {r['status']}")  # fmt: skip
    for k in ("insert", "decode", "produce"):
        print(f"  ceiling {k:<8} {g(c, k, 'events_per_s')}/s")
    for client, rates in (g(r, "scenarios", "latency") or {}).items():
        for rate, run in rates.items():
            if isinstance(run, dict) and "latency_commit_to_consume" in run:
                lc, ls = run["latency_commit_to_consume"], run["latency_schedule_to_consume"]
                print(
                    f"  latency {client:<12} {rate:>5}/s  commit->consume p50 {lc.get('p50_ms')} "
                    f"p99 {lc.get('p99_ms')} p99.9 {lc.get('p99_9_ms')} ms; from schedule p99 "
                    f"{ls.get('p99_ms')} p99.9 {ls.get('p99_9_ms')} ms"
                )
    for name, v in (r.get("ratios_to_ceilings") or {}).items():
        print(
            f"  {name:<50} {v['events_per_s']}/s  x insert {v['over_insert_ceiling']}  "
            f"x decode {v['over_decode_ceiling']}  x produce {v['over_produce_ceiling']}"
        )
    for t in r.get("targets") or []:
        print(f"  TARGET {t['target']} ({t['goal']}): {t['value']} -> met: {t['met']}")
        print(f"         {t['measured']}")
    print(f"  correctness: {r.get('correctness')}")
    print(f"JSON: {out}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 2 minutes (default)")
    mode.add_argument("--full", action="store_true", help="about 15 minutes, with plots")
    p.add_argument("--output", type=Path, help="default: results/suite.json or suite-quick.json")
    p.add_argument("--plots", type=Path, default=Path("docs/benchmarks"),
                   help="--full: directory of the PNG plots (needs the 'bench' extra)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the profile (see Profile in this file), e.g. backlog=200000 "
        "or insert_clients=1,4,8; the result records the profile used",
    )
    p.add_argument("--partitions", type=int, default=1, help="partitions of the topics")
    p.add_argument("--drain-timeout", type=float, default=600)
    p.add_argument("--log", type=Path, default=RESULTS / "suite.log", help="relay output")
    p.add_argument("--database-url", default=os.environ.get("OUTBOX_CDC_TEST_POSTGRES_URL"))
    p.add_argument("--admin-url", default=os.environ.get("OUTBOX_CDC_TEST_POSTGRES_ADMIN_URL"))
    p.add_argument("--bootstrap", default=os.environ.get("OUTBOX_CDC_TEST_KAFKA_BOOTSTRAP_SERVERS"))
    a = p.parse_args(argv)
    if not a.database_url or not a.bootstrap:
        p.error("no PostgreSQL URL / Kafka servers: run `. ./.services.env` first")
    a.admin_url = a.admin_url or a.database_url
    if a.output is None:
        a.output = RESULTS / ("suite.json" if a.full else "suite-quick.json")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    prof = FULL if a.full else QUICK
    for item in a.set:
        key, _, value = item.partition("=")
        current = getattr(prof, key, None)
        if current is None:
            raise SystemExit(f"--set {item}: no profile field {key!r}")
        if isinstance(current, tuple):
            new: Any = tuple(int(x) for x in value.split(","))
        else:
            new = type(current)(value)
        prof = dataclasses.replace(prof, **{key: new})
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.log.parent.mkdir(parents=True, exist_ok=True)
    suite = Suite(a, prof)
    r = suite.r
    t0 = time.monotonic()
    r.update(
        benchmark="outbox-cdc benchmark suite (issue 9)",
        mode=prof.name,
        date=datetime.now(UTC).isoformat(timespec="seconds"),
        status="running",
        host={
            "nproc": len(os.sched_getaffinity(0)),
            "cpu_count": os.cpu_count(),
            "cpu_model": rb.cpu_model(),
            "mem_total_mib": mem_total_mib(),
            "platform": platform.platform(),
            "loadavg_start": rb.loadavg(),
            "note": "PostgreSQL, Kafka, the relay, the load generator and the consumer all run "
            "on this host",
        },
        profile=dataclasses.asdict(prof),
        profile_overrides=a.set,
        parameters={"partitions": a.partitions, "payload_bytes": PAYLOAD_BYTES, "keys": KEYS},
        targets_goals=TARGETS,
    )
    status = 0
    try:
        env = SuiteBench(bench_args(a), a.database_url, a.admin_url, a.bootstrap)
        env.environment()
        r["versions"] = env.results["versions"]
        r["versions"]["java"] = java_version()
        r["postgresql_settings"] = env.results["postgresql_settings"]
        suite.run()
    except BaseException as exc:
        suite.failed.append("suite")
        r.setdefault("errors", {})["suite"] = {
            "error": repr(exc),
            "traceback": traceback.format_exc(),
        }
        log(f"FAILED: {exc!r}")
    finally:
        suite.cleanup()
    r["phases"] = suite.phases
    r["duration_s"] = round(time.monotonic() - t0, 1)
    r["host"]["loadavg_end"] = rb.loadavg()
    analyse(r)
    r["correctness"] = correctness(r)
    disturbed = [
        k for k, v in suite.phases.items() if v.get("disturbed") and not k.endswith("(attempt 1)")
    ]
    if suite.failed:
        r["status"] = f"failed: {', '.join(suite.failed)}"
        status = 1
    elif disturbed:
        r["status"] = f"disturbed: {', '.join(disturbed)}"
        status = 2
    else:
        r["status"] = "ok"
    out = a.output if status == 0 else a.output.with_name(a.output.stem + ".failed.json")
    out.write_text(json.dumps(r, indent=1, default=str) + "\n")
    print_summary(r, out)
    if a.full and not a.no_plots:
        try:
            import plots

            for path in plots.plot_all(r, a.plots):
                log(f"plot: {path}")
        except ImportError as exc:
            log(f"no plots ({exc}): pip install -e '.[bench]'")
    return status


def mem_total_mib() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def java_version() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        return (out.stderr or out.stdout).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
