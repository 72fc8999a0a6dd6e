"""A slot invalidated on purpose (a small ``max_slot_wal_keep_size``) is detected, reported with
what to do, and recovered with ``outbox-cdc recover``: every committed event still arrives
(duplicates allowed, losses not). Real PostgreSQL and Kafka, the relay as a process."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from outbox_cdc import Outbox
from tests.acceptance.harness import (
    RelayProcess,
    header,
    relay_env,
    wait_until,
)
from tests.integration.test_relay import cli
from tests.support.kafka import consume_all

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(240)]


def publish(url: str, table: str, topic: str, n: int) -> list[str]:
    outbox = Outbox(table, capture_trace_context=False)
    ids = []
    with psycopg.connect(url) as conn:
        for i in range(n):
            ids.append(str(outbox.publish(conn, topic=topic, type="t", payload=str(i).encode())))
            if i % 10 == 9:
                conn.commit()
    return ids


def invalidate(admin_url: str, slot: str) -> float:
    """Shrink max_slot_wal_keep_size, write and switch WAL segments, checkpoint, until the slot
    is lost; returns the seconds it took. The setting is restored by the caller."""
    t0 = time.monotonic()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '32MB'")
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.5)
        conn.execute("CREATE TEMP TABLE wal_filler (x int)")
        for _ in range(40):
            for _ in range(3):
                conn.execute("INSERT INTO wal_filler VALUES (1)")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            row = conn.execute(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            if row and row[0] == "lost":
                return time.monotonic() - t0
    raise AssertionError(f"slot {slot} was not invalidated")


def rows_in(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else -1


def restore(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        conn.execute("SELECT pg_reload_conf()")


@pytest.mark.parametrize(
    "retention",
    [None, 0],
    ids=["rows-retained", "delivered-rows-deleted"],
)
def test_invalidated_slot_is_reported_and_recover_loses_nothing(
    retention: int | None,
    tmp_path: Path,
    postgres_url: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    replication_slot: str,
    kafka_topic: str,
) -> None:
    env = relay_env(
        database_url=postgres_url,
        bootstrap=kafka_bootstrap,
        table=outbox_table,
        slot=replication_slot,
        kafka_topic_partitions=1,
        recover_lost_slot="false",  # the operator's path; the automatic one: test_faults_slot
        **({} if retention is None else {"retention": retention}),
    )
    relay = RelayProcess(env, tmp_path / "logs")
    try:
        relay.start().wait_streaming()
        delivered = publish(postgres_url, outbox_table, kafka_topic, 100)
        assert len(consume_all(kafka_bootstrap, kafka_topic, 100, timeout=60)) == 100
        time.sleep(1.5)  # the relay records its delivered position at most once a second
        if retention == 0:  # the clean-up (every 10 s) deletes the delivered rows
            wait_until(
                lambda: rows_in(postgres_url, outbox_table) == 0,
                timeout=30,
                what="the delivered rows to be deleted",
            )
        assert relay.stop() == 0
        # committed while the relay is down: only the WAL (soon gone) and the rows have them
        missed = publish(postgres_url, outbox_table, kafka_topic, 200)
        try:
            took = invalidate(postgres_admin_url, replication_slot)
        finally:
            restore(postgres_admin_url)

        # detected and reported: the relay stops with what to do
        relay.start()
        code = relay.wait(60)
        log = relay.log_text()
        assert code == 1, log
        assert "was invalidated" in log and "outbox-cdc recover" in log, log
        status = cli("status", "--slot", replication_slot, env=env)
        assert "wal_status lost" in status.stdout, status.stdout

        dry = cli("recover", "--dry-run", env=env)
        assert dry.returncode == 0, dry.stderr
        assert "would recreate it" in dry.stdout
        done = cli("recover", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "re-published" in done.stdout
        assert "table-less events" in done.stdout  # they cannot be recovered: said so
        republished = int(done.stdout.split("re-published ", 1)[1].split(" ", 1)[0])
        assert republished >= len(missed)
        if retention == 0:  # only the rows of events never delivered were left
            assert republished == len(missed), done.stdout
        again = cli("recover", env=env)
        assert again.returncode == 2 and "healthy" in again.stderr  # nothing left to recover

        relay.start().wait_streaming()
        after = publish(postgres_url, outbox_table, kafka_topic, 50)
        expected = set(delivered) | set(missed) | set(after)
        records = consume_all(
            kafka_bootstrap, kafka_topic, 100 + republished + 50, timeout=90, settle=2
        )
        seen = [header(r, "ce_id") for r in records]
        lost = expected - set(seen)
        print(
            f"[recovery] retention {retention}: invalidated in {took:.1f} s; "
            f"re-published {republished} "
            f"(missed {len(missed)}); records {len(seen)} for {len(expected)} events; "
            f"lost {len(lost)}; duplicates {len(seen) - len(set(seen))}"
        )
        assert not lost
        assert relay.stop() == 0
    finally:
        relay.kill()
