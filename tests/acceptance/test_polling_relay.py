"""Acceptance of the polling relay (issue 5) against real Kafka and, for each backend, a real
database: MariaDB, SQLite (a file in WAL journal mode) and PostgreSQL in polling mode, with
``outbox-cdc start`` as a real process.

The guarantees are those of the WAL relay: no committed event is ever lost, no rolled-back event
is ever published, events of one key stay in order, duplicates happen only after a crash and are
bounded by one poll batch (the ce_id header is the event id). Polling adds: a row is marked
(``published_at``) or deleted (``retention = 0``) only after Kafka acknowledged it, one relay polls
a table at a time, and a row whose transaction commits after a later seq was published is still
found. Each scenario prints its figures as one ``[acceptance]`` line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from outbox_cdc import Outbox
from tests.acceptance.conftest import MARIADB, POSTGRES
from tests.acceptance.harness import (
    Database,
    LoadGenerator,
    RelayProcess,
    check,
    header,
    read_topic,
    report,
    wait_until,
    write_event,
)
from tests.support.services import ServiceControl

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.timeout(240)]

Relays = Callable[..., RelayProcess]

# retention: 0 deletes a row once Kafka acknowledged it; None keeps the default (7 days), which
# marks it (published_at)
RETENTIONS = [pytest.param(0, id="delete"), pytest.param(None, id="mark")]


def _settings(retention: float | None) -> dict[str, object]:
    return {} if retention is None else {"retention": retention}


def _delivered_ids(records: list[Any]) -> list[str | None]:
    return [header(r, "ce_id") for r in records]


@pytest.mark.parametrize("retention", RETENTIONS)
def test_polling_clean_run_delivers_every_committed_event_exactly_once_in_key_order(
    polling_relays: Relays,
    polling_db: Database,
    polling_table: str,
    kafka_bootstrap: str,
    topic: str,
    retention: float | None,
) -> None:
    """Scenario 1: four producer threads, 10,000 events over 200 keys, one transaction in ten
    rolled back; the relay runs throughout. Every committed event arrives exactly once, in key
    order; afterwards the table holds no committed row (delete mode) or every row is marked
    (mark mode)."""
    t0 = time.monotonic()
    relay = polling_relays(**_settings(retention)).start()
    relay.wait_streaming()
    load = LoadGenerator(polling_db, polling_table, topic, events=10_000, keys=200, threads=4)
    result = load.start().join(timeout=120)
    write_s = load.finished_at - load.started_at
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=2)
    delivered_s = time.monotonic() - load.started_at
    res = check(records, result)

    def settled() -> tuple[int, int] | None:
        rows, unpublished = polling_db.table_state(polling_table)
        done = rows == 0 if retention == 0 else unpublished == 0
        return (rows, unpublished) if done else None

    settled_t = time.monotonic()
    try:
        rows, unpublished = wait_until(
            settled, timeout=30, what="the table to settle", interval=0.2
        )
    except AssertionError:
        rows, unpublished = polling_db.table_state(polling_table)
    settled_s = time.monotonic() - settled_t
    report(
        "polling clean run",
        backend=polling_db.name,
        mode="delete" if retention == 0 else "mark",
        committed=len(result.committed),
        rolled_back=len(result.rolled_back),
        transactions=result.transactions,
        write_s=f"{write_s:.1f}",
        all_delivered_after_s=f"{delivered_s:.1f}",
        rows_left=rows,
        unpublished_rows=unpublished,
        table_settled_after_s=f"{settled_s:.1f}",
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert relay.running, relay.log_text()
    assert len(result.rolled_back) > 500
    assert res.partitions_used == 4
    res.assert_complete(exactly_once=True)
    if retention == 0:
        assert rows == 0, f"{rows} rows left in delete mode ({unpublished} unpublished)"
    else:
        assert unpublished == 0, f"{unpublished} of {rows} rows not marked published"
        assert rows == len(result.committed), f"{rows} rows, {len(result.committed)} committed"


def test_polling_sigkill_three_times_loses_nothing_and_duplicates_stay_within_a_batch(
    polling_relays: Relays,
    polling_db: Database,
    polling_table: str,
    kafka_bootstrap: str,
    topic: str,
) -> None:
    """Scenario 2: the relay is SIGKILLed three times under load (~1,000 events/s) and restarted
    at once. Every committed event arrives at least once, in key order; one batch is in flight at
    a time, so each kill redelivers at most ``poll_batch_size`` events. Each run has its own
    ce_source, so the redeliveries of each kill can be counted."""
    batch, kills, events = 500, 3, 12_000
    t0 = time.monotonic()
    relay = polling_relays(poll_batch_size=batch)
    sources = [f"acceptance-run{n}" for n in range(1, kills + 2)]
    relay.start(source_name=sources[0])
    relay.wait_streaming()
    load = LoadGenerator(
        polling_db, polling_table, topic, events=events, keys=200, threads=4, rate=1000
    ).start()
    restart_s: list[str] = []
    pending_at_kill: list[int] = []  # unpublished rows just before each kill: the relay's lag
    for n in range(1, kills + 1):
        load.wait_written(n * events // (kills + 2), timeout=60)
        assert relay.running, relay.log_text()
        pending_at_kill.append(polling_db.table_state(polling_table)[1])
        relay.kill()
        relay.start(source_name=sources[n])
        relay.wait_streaming(timeout=30)  # may first wait as a standby until the lock is free
        restart_s.append(f"{time.monotonic() - relay.started_at:.1f}")
    result = load.join(timeout=120)
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=3)
    res = check(records, result, sources=sources)
    per_kill = [res.copies_by_source.get(s, 0) for s in sources[1:]]
    report(
        "polling sigkill x3",
        backend=polling_db.name,
        committed=len(result.committed),
        kills=kills,
        poll_batch_size=batch,
        duplicates=res.duplicates,
        duplicates_per_kill=per_kill,
        pending_at_kill=pending_at_kill,
        restart_to_streaming_s=restart_s,
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert relay.running, relay.log_text()
    res.assert_complete()
    assert res.duplicates <= kills * batch, res.summary()
    assert all(d <= batch for d in per_kill), per_kill


def test_polling_broker_down_row_stays_unpublished_until_kafka_acknowledges(
    polling_relays: Relays,
    polling_db: Database,
    polling_table: str,
    kafka_bootstrap: str,
    topic: str,
    services: ServiceControl,
) -> None:
    """Scenario 3: Kafka is stopped for 15 s under load (mark mode, default retention). A marker
    event is committed after the broker stopped, so Kafka cannot acknowledge it while it is down:
    its row must stay present with ``published_at`` NULL for the whole downtime (polled every
    200 ms). Once Kafka is back, the marker is marked and every committed event arrives."""
    downtime = 15.0
    t0 = time.monotonic()
    relay = polling_relays(poll_batch_size=500)
    relay.start()
    relay.wait_streaming()
    load = LoadGenerator(
        polling_db, polling_table, topic, events=10_000, keys=200, threads=4, rate=400
    ).start()
    load.wait_written(2000, timeout=30)
    services.stop("kafka")
    try:
        stopped_at = time.monotonic()
        written_at_stop = load.written
        _, unpublished_at_stop = polling_db.table_state(polling_table)
        marker_id = write_event(polling_db, polling_table, topic)
        samples: list[tuple[bool, Any]] = []
        while time.monotonic() - stopped_at < downtime:
            samples.append(polling_db.row_published(polling_table, marker_id))
            time.sleep(0.2)
        written_while_down = load.written - written_at_stop
        rows_at_restart, unpublished_at_restart = polling_db.table_state(polling_table)
        assert relay.running, relay.log_text()
    finally:
        services.start("kafka")  # whatever happened: the broker runs again after this test
    restarted_at = time.monotonic()
    wait_until(
        lambda: polling_db.row_published(polling_table, marker_id)[1] is not None,
        timeout=90,
        what="the marker row to be marked published once Kafka is back",
        interval=0.2,
    )
    marker_marked_s = time.monotonic() - restarted_at
    result = load.join(timeout=120)
    records = read_topic(
        kafka_bootstrap, topic, expect_ids={*result.committed, marker_id}, timeout=120, settle=2
    )
    marker_records = [r for r in records if header(r, "ce_id") == marker_id]
    records = [r for r in records if header(r, "ce_id") != marker_id]
    res = check(records, result)
    bad = [s for s in samples if not s[0] or s[1] is not None]
    report(
        "polling broker down",
        backend=polling_db.name,
        downtime_s=downtime,
        samples=len(samples),
        marker_marked_while_down=len(bad),
        unpublished_at_stop=unpublished_at_stop,
        unpublished_at_restart=unpublished_at_restart,
        rows_at_restart=rows_at_restart,
        written_while_down=written_while_down,
        marker_marked_after_restart_s=f"{marker_marked_s:.1f}",
        marker_copies=len(marker_records),
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert samples
    assert not bad, (
        f"the marker row, committed after Kafka stopped, was deleted or marked published while "
        f"Kafka was down: first bad sample {bad[0]} of {len(samples)}"
    )
    assert len(marker_records) >= 1
    assert relay.running, relay.log_text()
    res.assert_complete()


def test_polling_standby_takes_over_within_10s_after_sigkill(
    polling_relays: Relays,
    polling_db: Database,
    polling_table: str,
    kafka_bootstrap: str,
    topic: str,
) -> None:
    """Scenario 6: two relays on one table (delete mode): one polls, the other waits as a
    standby (the poller lock). SIGKILL the first under load: the second streams within 10 s,
    and nothing is lost."""
    batch = 500
    t0 = time.monotonic()
    common: dict[str, object] = {"poll_batch_size": batch, "retention": 0}
    first = polling_relays("relay-a", source_name="relay-a", **common)
    second = polling_relays("relay-b", source_name="relay-b", **common)
    first.start()
    first.wait_streaming()
    second.start()
    second.wait_for_log(r"standby: ", timeout=30)
    load = LoadGenerator(
        polling_db, polling_table, topic, events=10_000, keys=200, threads=4, rate=1000
    ).start()
    load.wait_written(4000, timeout=30)
    assert first.running, first.log_text()
    assert second.running, second.log_text()
    assert "streaming from" not in second.log_text(), second.log_text()
    killed = time.monotonic()
    first.kill()
    second.wait_streaming(timeout=30)
    takeover_s = time.monotonic() - killed
    result = load.join(timeout=120)
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=2)
    res = check(records, result, sources=("relay-a", "relay-b"))
    by_source = {
        s: sum(1 for r in records if header(r, "ce_source") == s) for s in ("relay-a", "relay-b")
    }
    report(
        "polling standby takeover",
        backend=polling_db.name,
        committed=len(result.committed),
        takeover_s=f"{takeover_s:.2f}",
        records_by_source=by_source,
        duplicates=res.duplicates,
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    assert takeover_s <= 10
    assert second.running, second.log_text()
    res.assert_complete()
    assert res.duplicates <= batch


@pytest.mark.parametrize("polling_backend", [MARIADB, POSTGRES], indirect=True)
def test_polling_late_commit_of_a_lower_seq_is_still_published(
    polling_relays: Relays,
    polling_db: Database,
    polling_connect: Callable[[], Any],
    polling_table: str,
    kafka_bootstrap: str,
    topic: str,
) -> None:
    """Connection A inserts event X (taking seq s1) and does not commit; connection B inserts and
    commits event Y (seq s2 > s1); once Y is in Kafka (the relay has polled past s2), A commits:
    X must be published too. A poller that remembers the highest seq it read would skip X.

    Not on SQLite: it has one writer at a time, so while A's transaction holds the write lock no
    other transaction can insert, let alone commit, a later seq: a late commit cannot happen."""
    t0 = time.monotonic()
    relay = polling_relays(poll_interval=0.2)
    relay.start()
    relay.wait_streaming()
    outbox = Outbox(polling_table, capture_trace_context=False)
    conn_a, conn_b = polling_connect(), polling_connect()
    try:
        x_id = str(
            outbox.publish(conn_a, topic=topic, type="acceptance.late", key="late-x", payload=b"x")
        )
        seq_x = polling_db.seq_of(conn_a, polling_table, x_id)
        y_id = str(
            outbox.publish(conn_b, topic=topic, type="acceptance.late", key="late-y", payload=b"y")
        )
        conn_b.commit()
        y_committed = time.monotonic()
        seq_y = polling_db.seq_of(conn_b, polling_table, y_id)
        conn_b.rollback()
        first = read_topic(kafka_bootstrap, topic, expect_ids={y_id}, timeout=30)
        y_s = time.monotonic() - y_committed
        assert y_id in _delivered_ids(first), (
            "Y (committed) was not published within 30 s while an earlier transaction was open"
        )
        assert x_id not in _delivered_ids(first), "X was published before its transaction committed"
        time.sleep(1.0)  # several more polls past s2 while X is still uncommitted
        x_pending_row = polling_db.row_published(polling_table, x_id)
        conn_a.commit()
        x_committed = time.monotonic()
        records = read_topic(kafka_bootstrap, topic, expect_ids={x_id, y_id}, timeout=30, settle=1)
        x_s = time.monotonic() - x_committed
    finally:
        conn_a.close()
        conn_b.close()
    ids = _delivered_ids(records)
    report(
        "polling late commit",
        backend=polling_db.name,
        seq_x=seq_x,
        seq_y=seq_y,
        y_delivered_after_s=f"{y_s:.2f}",
        x_delivered_after_commit_s=f"{x_s:.2f}",
        records=len(records),
        total_s=f"{time.monotonic() - t0:.1f}",
    )
    assert seq_x is not None and seq_y is not None and seq_x < seq_y, (seq_x, seq_y)
    assert x_pending_row == (False, None), "another connection saw X before its commit"
    assert ids.count(y_id) == 1, ids
    assert ids.count(x_id) == 1, f"X (seq {seq_x}, committed after seq {seq_y}) arrived {ids}"
    assert relay.running, relay.log_text()
