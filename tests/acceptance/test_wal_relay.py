"""Acceptance of the WAL relay (issue "The WAL relay") against real PostgreSQL and real Kafka,
with ``outbox-cdc start`` as a real process.

The guarantee under test: no committed event is ever lost, no rolled-back event is ever
published, events of one key stay in order, duplicates are rare, bounded and detectable (the
ce_id header is the event id). Each scenario prints its figures as one ``[acceptance]`` line.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.acceptance.conftest import CLIENTS
from tests.acceptance.harness import (
    CheckResult,
    LoadGenerator,
    LoadResult,
    RelayProcess,
    check,
    count_records,
    create_logical_slot,
    header,
    marker_commit_end,
    read_topic,
    report,
    slot_row,
    wait_until,
    write_marker,
)
from tests.support.postgres import drop_replication_slot, int_to_lsn, lsn_to_int
from tests.support.services import ServiceControl

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(240)]

Relays = Callable[..., RelayProcess]

# the scenarios that also run with the confluent-kafka client (the others: kafka-python only)
each_client = pytest.mark.parametrize("kafka_client", CLIENTS, indirect=True)


@each_client
def test_clean_run_delivers_every_committed_event_exactly_once_in_key_order(
    relays: Relays, postgres_url: str, kafka_bootstrap: str, outbox_table: str, topic: str
) -> None:
    """Scenario 1: four producer threads, 20,000 events over 200 keys, one transaction in ten
    rolled back; the relay runs throughout."""
    t0 = time.monotonic()
    relay = relays().start()
    relay.wait_streaming()
    load = LoadGenerator(postgres_url, outbox_table, topic, events=20_000, keys=200, threads=4)
    result = load.start().join(timeout=120)
    write_s = load.finished_at - load.started_at
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=2)
    delivered_s = time.monotonic() - load.started_at
    res = check(records, result)
    report(
        "clean run",
        committed=len(result.committed),
        rolled_back=len(result.rolled_back),
        transactions=result.transactions,
        write_s=f"{write_s:.1f}",
        all_delivered_after_s=f"{delivered_s:.1f}",
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert relay.running, relay.log_text()
    assert len(result.rolled_back) > 1000
    assert res.partitions_used == 4
    res.assert_complete(exactly_once=True)


@each_client
def test_sigkill_three_times_loses_nothing_and_duplicates_stay_bounded(
    relays: Relays, postgres_url: str, kafka_bootstrap: str, outbox_table: str, topic: str
) -> None:
    """Scenario 2: the relay is SIGKILLed three times under load and restarted at once. Every
    committed event arrives at least once, in key order; duplicates <= kills x in-flight bound.
    Each run has its own ce_source, so the redeliveries of each kill can be counted."""
    bound, kills = 2000, 3
    t0 = time.monotonic()
    relay = relays(max_in_flight_events=bound)
    sources = [f"acceptance-run{n}" for n in range(1, kills + 2)]
    relay.start(source_name=sources[0])
    relay.wait_streaming()
    load = LoadGenerator(
        postgres_url, outbox_table, topic, events=20_000, keys=200, threads=4, rate=1000
    ).start()
    for n in range(1, kills + 1):
        load.wait_written(n * 20_000 // (kills + 2), timeout=60)
        assert relay.running, relay.log_text()
        relay.kill()
        relay.start(source_name=sources[n])
        relay.wait_streaming(timeout=30)  # may first wait as a standby until the slot is free
    result = load.join(timeout=120)
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=3)
    res = check(records, result, sources=sources)
    per_kill = [res.copies_by_source.get(s, 0) for s in sources[1:]]
    report(
        "sigkill x3",
        committed=len(result.committed),
        kills=kills,
        in_flight_bound=bound,
        duplicates=res.duplicates,
        duplicates_per_kill=per_kill,
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert relay.running, relay.log_text()
    res.assert_complete()
    assert res.duplicates <= kills * bound, res.summary()
    assert all(d <= bound for d in per_kill), per_kill


@each_client
def test_broker_down_slot_never_confirms_past_unacknowledged_events(
    relays: Relays,
    postgres_url: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    replication_slot: str,
    services: ServiceControl,
    unique_name: Callable[[str], str],
) -> None:
    """Scenario 3: Kafka is stopped for 20 s under load. A marker event is committed after the
    broker stopped, so it cannot be acknowledged while the broker is down: the slot's
    confirmed_flush_lsn (polled every 200 ms) must stay below the marker's commit end LSN, which
    a second wal2json slot of the test tells exactly afterwards. Once Kafka is back, every
    committed event arrives."""
    downtime = 20.0
    t0 = time.monotonic()
    relay = relays(max_in_flight_events=2000)
    relay.start()
    relay.wait_streaming()
    load = LoadGenerator(
        postgres_url, outbox_table, topic, events=12_000, keys=200, threads=4, rate=400
    ).start()
    load.wait_written(2000, timeout=30)
    side_slot = unique_name("side")
    create_logical_slot(postgres_admin_url, side_slot)
    services.stop("kafka")
    try:
        stopped_at = time.monotonic()
        written_at_stop = load.written
        marker_id, marker_insert_lsn = write_marker(postgres_url, outbox_table, topic)
        marker_end = marker_commit_end(postgres_admin_url, side_slot, outbox_table, marker_id)
        drop_replication_slot(postgres_admin_url, side_slot)
        samples: list[int] = []
        while time.monotonic() - stopped_at < downtime:
            row = slot_row(postgres_admin_url, replication_slot)
            assert row is not None
            samples.append(lsn_to_int(row["confirmed_flush_lsn"]))
            time.sleep(0.2)
        written_while_down = load.written - written_at_stop
        assert relay.running, relay.log_text()
    finally:
        services.start("kafka")  # whatever happened: the broker runs again after this test
        drop_replication_slot(postgres_admin_url, side_slot)
    restarted_at = time.monotonic()
    wait_until(
        lambda: (
            (r := slot_row(postgres_admin_url, replication_slot))
            and lsn_to_int(r["confirmed_flush_lsn"]) >= marker_end
        ),
        timeout=60,
        what="the slot to confirm the marker once Kafka is back",
    )
    marker_confirmed_s = time.monotonic() - restarted_at
    result = load.join(timeout=120)
    records = read_topic(
        kafka_bootstrap, topic, expect_ids={*result.committed, marker_id}, timeout=120, settle=2
    )
    marker_records = [r for r in records if header(r, "ce_id") == marker_id]
    records = [r for r in records if header(r, "ce_id") != marker_id]
    res = check(records, result)
    highest = max(samples)
    report(
        "broker down",
        downtime_s=downtime,
        samples=len(samples),
        confirmed_at_stop=int_to_lsn(samples[0]),
        confirmed_max_while_down=int_to_lsn(highest),
        marker_insert_lsn=marker_insert_lsn,
        marker_commit_end=int_to_lsn(marker_end),
        written_while_down=written_while_down,
        marker_confirmed_after_restart_s=f"{marker_confirmed_s:.1f}",
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert samples == sorted(samples), "the slot went back"
    assert highest < marker_end, (
        f"confirmed_flush_lsn reached {int_to_lsn(highest)} while Kafka was down, at or past the "
        f"commit end {int_to_lsn(marker_end)} of an event Kafka could not have acknowledged"
    )
    assert len(marker_records) >= 1
    assert relay.running, relay.log_text()
    res.assert_complete()


def test_postgres_restart_under_load_relay_resumes_and_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    services: ServiceControl,
) -> None:
    """Scenario 4: PostgreSQL restarts (fast shutdown) under load. The producers reconnect and
    settle the transactions whose COMMIT outcome is unknown; the relay resumes by itself and
    loses nothing. Then a clean stop (SIGTERM) and a start with no load in between: the topic
    gets no new record."""
    t0 = time.monotonic()
    relay = relays(status_interval=1)
    relay.start()
    relay.wait_streaming()
    load = LoadGenerator(
        postgres_url,
        outbox_table,
        topic,
        events=20_000,
        keys=200,
        threads=4,
        rate=1500,
        tolerate_restarts=True,
    ).start()
    load.wait_written(5000, timeout=30)
    restart_t = time.monotonic()
    services.restart("postgres")
    restart_s = time.monotonic() - restart_t
    result = load.join(timeout=150)
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=120, settle=2)
    res = check(records, result)
    assert relay.running, relay.log_text()
    streams = relay.log_text().count("INFO outbox_cdc.relay: streaming from")
    # a clean stop, then a start with no load: nothing is redelivered
    stop_t = time.monotonic()
    code = relay.stop(timeout=60)
    stop_s = time.monotonic() - stop_t
    before = count_records(kafka_bootstrap, topic)
    relay.start()
    relay.wait_streaming()
    time.sleep(6)  # several status intervals
    after = count_records(kafka_bootstrap, topic)
    report(
        "postgres restart",
        committed=len(result.committed),
        rolled_back_or_failed=len(result.rolled_back),
        unknown_commit_outcomes=result.unknown_outcomes,
        retried_transactions=result.retried,
        reconnects=result.reconnects,
        restart_s=f"{restart_s:.1f}",
        relay_streams=streams,
        duplicates=res.duplicates,
        stop_exit=code,
        stop_s=f"{stop_s:.1f}",
        records_before_restart=before,
        records_after_restart=after,
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    res.assert_complete()
    assert streams >= 2, "the relay did not reconnect after the restart"
    assert code == 0, relay.log_text(-2)
    assert after == before, f"{after - before} records redelivered after a clean stop"


def test_idle_outbox_pins_no_wal_while_other_tables_and_databases_write(
    relays: Relays,
    postgres_url: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    replication_slot: str,
    unique_name: Callable[[str], str],
) -> None:
    """Scenario 5: the outbox idles while a table in the same database and a table in another
    database write 50 MB of WAL: the slot retains less than 16 MB once the relay had a few
    status intervals (1 s) -- restart_lsn moves at running-xacts records / checkpoints, so a
    CHECKPOINT is issued if it has not moved after 10 s."""
    limit = 16 * 1024 * 1024
    t0 = time.monotonic()
    relay = relays(status_interval=1)
    relay.start()
    relay.wait_streaming()
    load = LoadGenerator(postgres_url, outbox_table, topic, events=200, keys=20, threads=2)
    result = load.start().join(timeout=60)
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=60)
    check(records, result).assert_complete()

    other_db = unique_name("otherdb")
    filler = unique_name("filler")
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {other_db} OWNER {urlsplit(postgres_url).username}")
    try:
        other_url = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{other_db}"))
        with (
            psycopg.connect(postgres_url, autocommit=True) as same,
            psycopg.connect(other_url, autocommit=True) as other,
        ):
            for conn in (same, other):
                conn.execute(f"CREATE TABLE {filler} (id bigint, pad text)")
            start_lsn = wal_lsn(same)
            written = 0
            while written < 50 * 1024 * 1024:
                for conn in (same, other):  # ~250 kB of WAL per transaction
                    conn.execute(
                        f"INSERT INTO {filler} SELECT g, repeat(md5(g::text), 32)"
                        " FROM generate_series(1, 200) g"
                    )
                written = wal_lsn(same) - start_lsn
            samples: list[tuple[float, int, int]] = []  # (seconds, retained, confirmed lag)
            checkpoints = 0
            written_at = time.monotonic()
            while True:
                row = slot_row(postgres_admin_url, replication_slot)
                assert row is not None
                elapsed = time.monotonic() - written_at
                samples.append((round(elapsed, 1), row["retained"], row["lag"]))
                if row["retained"] < limit and elapsed >= 3:
                    break
                if elapsed > 40:
                    break
                if elapsed > 10 * (checkpoints + 1):
                    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
                        admin.execute("CHECKPOINT")
                    checkpoints += 1
                time.sleep(0.5)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {filler}")
            admin.execute(f"DROP DATABASE IF EXISTS {other_db} WITH (FORCE)")
    report(
        "idle outbox",
        wal_written_mb=f"{written / 2**20:.1f}",
        retained_right_after=samples[0][1],
        retained_final=row["retained"],
        confirmed_lag_final=row["lag"],
        checkpoints_issued=checkpoints,
        seconds_to_below_limit=samples[-1][0],
        samples_s_retained_lag=samples[::4],
        total_s=f"{time.monotonic() - t0:.1f}",
    )
    assert relay.running, relay.log_text()
    assert row["retained"] < limit, f"the idle slot retains {row['retained']} bytes of WAL"


@each_client
def test_standby_takes_over_within_10s_after_sigkill(
    relays: Relays,
    postgres_url: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    replication_slot: str,
) -> None:
    """Scenario 6: two relays on one slot: one streams, the other waits as a standby. SIGKILL
    the first under load: the second streams within 10 s, and nothing is lost."""
    bound = 2000
    t0 = time.monotonic()
    first = relays("relay-a", max_in_flight_events=bound, source_name="relay-a")
    second = relays("relay-b", max_in_flight_events=bound, source_name="relay-b")
    first.start()
    first.wait_streaming()
    second.start()
    second.wait_for_log(r"standby: .*is active", timeout=30)
    load = LoadGenerator(
        postgres_url, outbox_table, topic, events=15_000, keys=200, threads=4, rate=1000
    ).start()
    load.wait_written(5000, timeout=30)
    row = slot_row(postgres_admin_url, replication_slot)
    assert row is not None
    assert row["active_pid"] is not None
    old_walsender = row["active_pid"]
    assert second.running
    assert "streaming from" not in second.log_text()
    killed = time.monotonic()
    first.kill()
    new_walsender = wait_until(
        lambda: (
            (r := slot_row(postgres_admin_url, replication_slot))
            and r["active_pid"] not in (None, old_walsender)
            and r["active_pid"]
        ),
        timeout=30,
        what="another walsender on the slot",
        interval=0.05,
    )
    takeover_s = time.monotonic() - killed
    second.wait_streaming(timeout=5)
    result = load.join(timeout=120)
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=2)
    res = check(records, result, sources=("relay-a", "relay-b"))
    report(
        "standby takeover",
        committed=len(result.committed),
        takeover_s=f"{takeover_s:.2f}",
        old_walsender=old_walsender,
        new_walsender=new_walsender,
        duplicates=res.duplicates,
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert takeover_s <= 10
    assert second.running, second.log_text()
    res.assert_complete()
    assert res.duplicates <= bound


@each_client
def test_sigterm_with_events_in_flight_exits_0_and_restart_redelivers_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    replication_slot: str,
) -> None:
    """Scenario 7: SIGTERM while the relay drains a backlog (events in flight): exit code 0
    within the shutdown timeout; the restart delivers the rest and redelivers nothing. Then a
    stop and start with nothing new: the topic keeps its record count."""
    shutdown_timeout = 20.0
    t0 = time.monotonic()
    create_logical_slot(postgres_url, replication_slot)  # the backlog is written before start
    load = LoadGenerator(postgres_url, outbox_table, topic, events=20_000, keys=200, threads=4)
    result = load.start().join(timeout=120)
    # linger 100 ms: many events are sent and not yet acknowledged at any moment; at most
    # 1,000 in flight, so the stop cannot deliver the whole backlog by draining
    relay = relays(
        shutdown_timeout=shutdown_timeout,
        status_interval=1,
        kafka_linger_ms=100,
        max_in_flight_events=1000,
    )
    relay.start()
    relay.wait_streaming()
    wait_until(
        lambda: count_records(kafka_bootstrap, topic) >= 2000,
        timeout=30,
        what="the relay to publish part of the backlog",
        interval=0.02,
    )
    signalled = time.monotonic()
    relay.terminate()
    code = relay.wait(shutdown_timeout + 15)
    shutdown_s = time.monotonic() - signalled
    first_run = relay.log_text()
    in_flight = re.search(r"waiting up to \d+s for (\d+) events in flight", first_run)
    delivered_first = count_records(kafka_bootstrap, topic)
    relay.start()
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=3)
    res = check(records, result)
    # stop and start with nothing new: nothing is redelivered
    code2 = relay.stop(timeout=60)
    before = count_records(kafka_bootstrap, topic)
    relay.start()
    relay.wait_streaming()
    time.sleep(5)
    after = count_records(kafka_bootstrap, topic)
    dup_txns = duplicate_transactions(res, result)
    report(
        "sigterm in flight",
        committed=len(result.committed),
        in_flight_at_sigterm=in_flight.group(1) if in_flight else 0,
        exit_code=code,
        shutdown_s=f"{shutdown_s:.2f}",
        delivered_by_first_run=delivered_first,
        duplicates=res.duplicates,
        records_before_restart=before,
        records_after_restart=after,
        total_s=f"{time.monotonic() - t0:.1f}",
        duplicated_transactions=dup_txns,
        check=res.summary(),
    )
    assert code == 0, first_run
    assert shutdown_s <= shutdown_timeout + 5
    assert in_flight, f"no events were in flight at SIGTERM:\n{first_run}"
    assert delivered_first < len(result.committed), "the first run drained the whole backlog"
    res.assert_complete(exactly_once=True)
    assert code2 == 0, relay.log_text(-2)
    assert after == before, f"{after - before} records redelivered after a clean stop"


def test_sigterm_in_the_middle_of_large_transactions_redelivers_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    replication_slot: str,
) -> None:
    """Scenario 7 with transactions of up to 2,000 events (``publish`` in a loop, or
    ``publish_many``): the relay reads a transaction over several reads, so a SIGTERM most
    likely arrives while one is half read. A clean stop must still leave nothing to redeliver."""
    create_logical_slot(postgres_url, replication_slot)
    load = LoadGenerator(
        postgres_url,
        outbox_table,
        topic,
        events=12_000,
        keys=40,
        threads=2,
        max_batch=2000,
        rollback_every=5,
    )
    result = load.start().join(timeout=120)
    relay = relays(shutdown_timeout=20, kafka_linger_ms=100)
    relay.start()
    wait_until(
        lambda: count_records(kafka_bootstrap, topic) >= 500,
        timeout=30,
        what="the relay to publish part of the backlog",
        interval=0.02,
    )
    relay.terminate()
    code = relay.wait(35)
    stopped_log = relay.log_text()
    delivered_first = count_records(kafka_bootstrap, topic)
    relay.start()
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=3)
    res = check(records, result)
    report(
        "sigterm mid-transaction",
        committed=len(result.committed),
        transactions=result.transactions,
        exit_code=code,
        delivered_by_first_run=delivered_first,
        duplicates=res.duplicates,
        duplicated_transactions=duplicate_transactions(res, result),
        check=res.summary(),
    )
    assert code == 0, stopped_log
    res.assert_complete(exactly_once=True)


def wal_lsn(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return lsn_to_int(row[0])


def duplicate_transactions(res: CheckResult, load: LoadResult) -> dict[int, str]:
    """{transaction number: "copies/size"} of the duplicated events: shows whether they are
    whole transactions or parts of one."""
    copies = Counter(load.txn_of[i][0] for i in res.duplicate_ids)
    sizes = {load.txn_of[i][0]: load.txn_of[i][1] for i in res.duplicate_ids}
    return {txn: f"{n}/{sizes[txn]}" for txn, n in sorted(copies.items())}
