"""Crash tests of the consumer: a real consumer process, killed between its database commit and
its offset commit, restarted; the same events published twice. The handler's side effects
(rows in a table without a unique constraint) must happen exactly once per event, and each
commit mode must redeliver exactly what it promises (docs/consumer.md, "Commit modes").

Scenario: 12 events, published twice (offsets 0-11, then the same records again at 12-23, same
``ce_id``), one partition, ``max_poll_records=4`` (batches 0-3, 4-7, ...). Run 1 handles the
events and dies right after committing the database transaction of offset 6, before any
offset commit that would follow it: ``os._exit(137)`` there, or it waits there for the test's
SIGKILL. Run 2 (the same static group member) continues until offset 23 and stops cleanly.

This file is also the consumer process: ``python tests/integration/test_consumer_crash.py ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 12
CRASH_AT = 6
BATCH = 4
LAST = 2 * EVENTS - 1

# what run 2 starts from: the committed offset after the crash, per commit mode
EXPECTED_RESTART = {"message": CRASH_AT, "batch": CRASH_AT - CRASH_AT % BATCH, "auto": None}


# -- the consumer process -----------------------------------------------------------------------


def _connect(dialect: str, url: str) -> Any:
    if dialect == "postgresql":
        import psycopg

        return psycopg.connect(url, autocommit=True)
    if dialect == "mysql":
        import pymysql

        from tests.support.services import mysql_connect_kwargs

        return pymysql.connect(**mysql_connect_kwargs(url), autocommit=False)
    return sqlite3.connect(url, isolation_level=None, timeout=30)


def _transaction(dialect: str, conn: Any, body: Callable[[Any], None]) -> None:
    """Run ``body`` in one database transaction, committed."""
    if dialect == "postgresql":
        with conn.transaction():
            body(conn)
        return
    if dialect == "mysql":
        conn.begin()
        try:
            body(conn)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        body(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _insert_effect(dialect: str, conn: Any, table: str, event_id: str, offset: int) -> None:
    mark = "?" if dialect == "sqlite" else "%s"
    sql = f"INSERT INTO {table} (event_id, record_offset) VALUES ({mark}, {mark})"
    if dialect == "mysql":
        with conn.cursor() as cur:
            cur.execute(sql, (event_id, offset))
    else:
        conn.execute(sql, (event_id, offset))


def consumer_main(argv: list[str]) -> int:
    from outbox_cdc.consumer import ConsumerMetrics, EventStream, Inbox, RetryPolicy

    p = argparse.ArgumentParser()
    for name in ("bootstrap", "topic", "group", "instance", "mode", "dialect", "db", "table"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--crash-at", type=int, default=-1)
    p.add_argument("--hang-at", type=int, default=-1, help="wait there for the test's SIGKILL")
    p.add_argument("--stop-after", type=int, default=-1)
    p.add_argument("--no-inbox", action="store_true", help="the control: no deduplication")
    args = p.parse_args(argv)

    metrics = ConsumerMetrics()
    inbox = Inbox(args.group, table=f"{args.table}_inbox", observer=metrics)
    conn = _connect(args.dialect, args.db)
    log = open(args.log, "a", buffering=1)  # noqa: SIM115 -- line-buffered, survives os._exit
    stream = EventStream(
        args.topic,
        group_id=args.group,
        group_instance_id=args.instance,  # a restart takes the dead member's place at once
        session_timeout_ms=10_000,
        bootstrap_servers=args.bootstrap,
        commit=args.mode,
        commit_interval_ms=60_000,  # auto: no interval commit happens during the test
        max_poll_records=BATCH,
        poll_timeout_ms=200,
        retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05, max_seconds=5),
        observer=metrics,
    )

    def handle(event: Any) -> None:
        log.write(json.dumps({"offset": event.offset, "id": event.id}) + "\n")

        def body(c: Any) -> None:
            if args.no_inbox or inbox.claim(c, event):
                _insert_effect(args.dialect, c, args.table, event.id, event.offset)

        _transaction(args.dialect, conn, body)
        if event.offset == args.crash_at:
            os._exit(137)  # after the database commit, before the offset commit
        if event.offset == args.hang_at:
            log.write(json.dumps({"committed": event.offset}) + "\n")
            time.sleep(3600)  # the test sends SIGKILL now
        if event.offset == args.stop_after:
            stream.stop()

    with stream:
        stream.run(handle)
    value = metrics.registry.get_sample_value
    summary = {
        "duplicates": value("outbox_cdc_consumer_duplicates_skipped_total", {"topic": args.topic}),
        "processed": value("outbox_cdc_consumer_events_processed_total", {"topic": args.topic}),
        "committed": {f"{t}:{p}": o for (t, p), o in stream.committed_offsets.items()},
    }
    print(json.dumps(summary))
    return 0


# -- the test -----------------------------------------------------------------------------------


def _records(topic: str) -> list[Any]:
    from outbox_cdc.events import create_event, to_record

    return [
        to_record(
            create_event(
                topic=topic,
                type="order.created",
                key=f"order-{i % 3}",
                payload={"order": i},
                id=uuid.UUID(int=i + 1),
            )
        )
        for i in range(EVENTS)
    ]


def _publish_twice(bootstrap: str, topic: str) -> list[str]:
    from kafka import KafkaProducer

    records = _records(topic)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    try:
        for _copy in range(2):  # the duplicates: the same records (same ce_id) again
            for r in records:
                producer.send(r.topic, key=r.key, value=r.value, headers=r.headers, partition=0)
            producer.flush(30)
    finally:
        producer.close()
    return [r.event_id for r in records]


def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        result = c.committed(TopicPartition(topic, 0))
        return None if result is None else int(result)
    finally:
        c.close(autocommit=False)


class _Database:
    def __init__(self, dialect: str, url: str, table: str) -> None:
        self.dialect, self.url, self.table = dialect, url, table

    def setup(self) -> None:
        from outbox_cdc.consumer import Inbox

        conn = _connect(self.dialect, self.url)
        try:
            text = "varchar(64)" if self.dialect == "mysql" else "text"
            # no unique constraint: a side effect done twice shows as two rows
            ddl = f"CREATE TABLE {self.table} (event_id {text} NOT NULL, record_offset int)"

            def body(c: Any) -> None:
                if self.dialect == "mysql":
                    with c.cursor() as cur:
                        cur.execute(ddl)
                else:
                    c.execute(ddl)
                Inbox("x", table=f"{self.table}_inbox").create_table(c)

            _transaction(self.dialect, conn, body)
        finally:
            conn.close()

    def effects(self) -> list[tuple[str, int]]:
        conn = _connect(self.dialect, self.url)
        try:
            sql = f"SELECT event_id, record_offset FROM {self.table}"
            if self.dialect == "mysql":
                with conn.cursor() as cur:
                    cur.execute(sql)
                    rows = list(cur.fetchall())
            else:
                rows = list(conn.execute(sql).fetchall())
            return [(str(r[0]), int(r[1])) for r in rows]
        finally:
            conn.close()

    def drop(self) -> None:
        conn = _connect(self.dialect, self.url)
        try:
            for t in (self.table, f"{self.table}_inbox"):
                sql = f"DROP TABLE IF EXISTS {t}"
                if self.dialect == "mysql":
                    with conn.cursor() as cur:
                        cur.execute(sql)
                    conn.commit()
                else:
                    conn.execute(sql)
        finally:
            conn.close()


@pytest.fixture
def database(
    request: pytest.FixtureRequest, tmp_path: Path, unique_name: Callable[[str], str]
) -> Iterator[_Database]:
    dialect = request.param
    if dialect == "postgresql":
        url = request.getfixturevalue("postgres_url")
    elif dialect == "mysql":
        url = request.getfixturevalue("mysql_url")
    else:
        url = str(tmp_path / "consumer.db")
    db = _Database(dialect, url, unique_name("effects"))
    db.setup()
    yield db
    db.drop()


def _run(db: _Database, args: list[str], log: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [
            sys.executable,
            str(Path(__file__)),
            *args,
            "--dialect",
            db.dialect,
            "--db",
            db.url,
            "--table",
            db.table,
            "--log",
            str(log),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _offsets(log: Path) -> list[int]:
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return [line["offset"] for line in lines if "offset" in line]


def _run_and_kill(db: _Database, args: list[str], log: Path) -> int:
    """Start the consumer with --hang-at, wait until it committed that event's transaction,
    SIGKILL it; its return code."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__)),
            *args,
            "--hang-at",
            str(CRASH_AT),
            "--dialect",
            db.dialect,
            "--db",
            db.url,
            "--table",
            db.table,
            "--log",
            str(log),
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while f'{{"committed": {CRASH_AT}}}' not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the consumer never reached the crash point"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("database", "mode", "kill"),
    [
        ("postgresql", "message", "exit"),
        ("postgresql", "batch", "exit"),
        ("postgresql", "auto", "exit"),
        ("mysql", "batch", "sigkill"),
        ("sqlite", "message", "sigkill"),
    ],
    indirect=["database"],
)
def test_crash_between_database_commit_and_offset_commit(
    database: _Database,
    mode: str,
    kill: str,
    kafka_bootstrap: str,
    kafka_topic: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    ids = _publish_twice(kafka_bootstrap, kafka_topic)
    group = unique_name("group")
    common = ["--bootstrap", kafka_bootstrap, "--topic", kafka_topic, "--group", group]
    common += ["--instance", f"{group}-member", "--mode", mode]
    started = time.monotonic()

    log1 = tmp_path / "run1.jsonl"
    if kill == "exit":  # the process ends itself right after the database commit
        run1 = _run(database, [*common, "--crash-at", str(CRASH_AT)], log1)
        assert run1.returncode == 137, run1.stderr[-3000:]
    else:  # the test kills it with SIGKILL while it waits right after the database commit
        assert _run_and_kill(database, common, log1) == -signal.SIGKILL
    assert _offsets(log1) == list(range(CRASH_AT + 1))
    committed = _committed(kafka_bootstrap, group, kafka_topic)
    assert committed == EXPECTED_RESTART[mode], f"{mode}: committed {committed} at the crash"

    log2 = tmp_path / "run2.jsonl"
    run2 = _run(database, [*common, "--stop-after", str(LAST)], log2)
    assert run2.returncode == 0, run2.stderr[-3000:]
    summary = json.loads(run2.stdout.strip().splitlines()[-1])
    restart = committed or 0
    # what this mode redelivered: everything from the committed offset, nothing before it
    assert _offsets(log2) == list(range(restart, LAST + 1))
    redelivered = CRASH_AT + 1 - restart
    assert summary["duplicates"] == redelivered + EVENTS
    assert summary["committed"] == {f"{kafka_topic}:0": LAST + 1}
    assert _committed(kafka_bootstrap, group, kafka_topic) == LAST + 1

    # the handler's side effects: exactly once per event, in spite of the 12 published
    # duplicates and the redelivery after the crash
    effects = database.effects()
    assert sorted(e for e, _ in effects) == sorted(ids)
    assert all(offset < EVENTS for _, offset in effects)  # the first copy did the work
    deliveries = len(_offsets(log1)) + len(_offsets(log2))
    assert deliveries == 2 * EVENTS + redelivered
    print(
        f"{database.dialect}/{mode}/{kill}: {deliveries} deliveries ({EVENTS} duplicates "
        f"published, {redelivered} redelivered after the crash), {len(effects)} side effects, "
        f"{time.monotonic() - started:.1f}s"
    )


@pytest.mark.kafka
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_without_the_inbox_the_same_run_duplicates_side_effects(
    database: _Database,
    kafka_bootstrap: str,
    kafka_topic: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """The control: the scenario above without the inbox shows every duplicate and redelivery
    as a side effect, so the test above would see them."""
    _publish_twice(kafka_bootstrap, kafka_topic)
    group = unique_name("group")
    common = ["--bootstrap", kafka_bootstrap, "--topic", kafka_topic, "--group", group]
    common += ["--instance", f"{group}-member", "--mode", "message", "--no-inbox"]
    run1 = _run(database, [*common, "--crash-at", str(CRASH_AT)], tmp_path / "1.jsonl")
    assert run1.returncode == 137, run1.stderr[-3000:]
    run2 = _run(database, [*common, "--stop-after", str(LAST)], tmp_path / "2.jsonl")
    assert run2.returncode == 0, run2.stderr[-3000:]
    assert len(database.effects()) == 2 * EVENTS + 1  # 12 published twice, 1 redelivered


if __name__ == "__main__":
    sys.exit(consumer_main(sys.argv[1:]))
