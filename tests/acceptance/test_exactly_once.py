"""Acceptance of exactly-once mode (issue "Exactly-once delivery into Kafka with transactions")
against real PostgreSQL and Kafka, ``outbox-cdc start`` as a process: three SIGKILLs, a broker
restart and a database restart under load, and a read_committed consumer sees every committed
event exactly once, in key order, and no rolled-back one. Both Kafka clients."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.acceptance.conftest import CLIENTS
from tests.acceptance.harness import (
    Database,
    LoadGenerator,
    RelayProcess,
    check,
    read_topic,
    report,
)
from tests.support.kafka import delete_topic
from tests.support.services import ServiceControl

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(400)]

Relays = Callable[..., RelayProcess]


@pytest.mark.parametrize("kafka_client", CLIENTS, indirect=True)
def test_kills_broker_and_database_restarts_deliver_each_event_exactly_once(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    services: ServiceControl,
) -> None:
    t0 = time.monotonic()
    events, kills = 12_000, 3
    request_cleanup = f"{topic}-progress"
    relay = relays(exactly_once="true", progress_topic=f"{topic}-progress", status_interval=1)
    relay.start().wait_streaming(timeout=60)
    load = LoadGenerator(
        postgres_url,
        outbox_table,
        topic,
        events=events,
        keys=200,
        threads=4,
        rate=500,
        tolerate_restarts=True,
    ).start()
    steps: list[str] = []
    for n in range(1, kills + 1):
        load.wait_written(n * events // 6, timeout=90)
        relay.kill()
        steps.append(f"kill{n}")
        relay.start()
        relay.wait_streaming(timeout=60)
    load.wait_written(4 * events // 6, timeout=90)
    services.restart("kafka")
    steps.append("kafka restart")
    load.wait_written(5 * events // 6, timeout=120)
    services.restart("postgres")
    steps.append("postgres restart")
    result = load.join(timeout=240)
    records = read_topic(
        kafka_bootstrap,
        topic,
        expect_ids=result.committed,
        timeout=180,
        settle=3,
        isolation_level="read_committed",
    )
    res = check(records, result)
    uncommitted_view = read_topic(kafka_bootstrap, topic, timeout=30, settle=1)
    report(
        "exactly once",
        committed=len(result.committed),
        rolled_back=len(result.rolled_back),
        steps=steps,
        read_committed_records=len(records),
        duplicates=res.duplicates,
        records_incl_aborted=len(uncommitted_view),
        relay_streams=sum(
            relay.log_text(i).count("streaming from") for i in range(len(relay.logs))
        ),
        total_s=f"{time.monotonic() - t0:.1f}",
        check=res.summary(),
    )
    try:
        assert relay.running, relay.log_text()
        res.assert_complete(exactly_once=True)
    finally:
        relay.kill()
        delete_topic(kafka_bootstrap, request_cleanup)


@pytest.mark.mysql
@pytest.mark.parametrize("polling_backend", ["mariadb"], indirect=True)
@pytest.mark.parametrize("kafka_client", CLIENTS, indirect=True)
def test_polling_kills_and_broker_restart_deliver_each_event_exactly_once(
    polling_relays: Relays,
    polling_db: Database,
    polling_table: str,
    kafka_bootstrap: str,
    topic: str,
    services: ServiceControl,
) -> None:
    """Polling (MariaDB) in exactly-once mode: each batch goes out in one Kafka transaction
    with a progress record listing its seqs; a relay killed between the Kafka commit and the
    UPDATE marks those rows at its next start instead of publishing them again."""
    t0 = time.monotonic()
    events, kills = 8_000, 3
    relay = polling_relays(
        exactly_once="true", progress_topic=f"{topic}-progress", poll_batch_size=200
    )
    relay.start().wait_streaming(timeout=60)
    load = LoadGenerator(
        polling_db, polling_table, topic, events=events, keys=200, threads=4, rate=500
    ).start()
    steps: list[str] = []
    try:
        for n in range(1, kills + 1):
            load.wait_written(n * events // 5, timeout=90)
            relay.kill()
            steps.append(f"kill{n}")
            relay.start()
            relay.wait_streaming(timeout=60)
        load.wait_written(4 * events // 5, timeout=90)
        services.restart("kafka")
        steps.append("kafka restart")
        result = load.join(timeout=240)
        records = read_topic(
            kafka_bootstrap,
            topic,
            expect_ids=result.committed,
            timeout=180,
            settle=3,
            isolation_level="read_committed",
        )
        res = check(records, result)
        report(
            "polling exactly once",
            backend=polling_db.name,
            committed=len(result.committed),
            steps=steps,
            duplicates=res.duplicates,
            records_incl_aborted=len(read_topic(kafka_bootstrap, topic, timeout=30, settle=1)),
            total_s=f"{time.monotonic() - t0:.1f}",
            check=res.summary(),
        )
        assert relay.running, relay.log_text()
        res.assert_complete(exactly_once=True)
    finally:
        relay.kill()
        delete_topic(kafka_bootstrap, f"{topic}-progress")
