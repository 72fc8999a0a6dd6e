"""Fault scenarios on the relay's database connection and on a broker of their own (see
tests/acceptance/faults.py): a 60 s blackhole to PostgreSQL past ``wal_sender_timeout``, an idle
relay noticing a silent connection, a full broker disk. They disturb only their own proxy or
broker (marker ``fault_proxy``): CI runs them next to test_faults_kafka.py.
"""

from __future__ import annotations

import time

import pytest

from tests.acceptance.faults import (
    Relays,
    hold,
    proxied_url,
    start_scenario,
)
from tests.acceptance.harness import (
    LoadGenerator,
    check,
    ensure_topic,
    read_topic,
    report,
    wait_until,
)
from tests.support.disk_broker import DiskBroker
from tests.support.faultproxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(420)]


@pytest.mark.fault_proxy
def test_postgres_blackhole_60s_longer_than_wal_sender_timeout_with_a_kill_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
) -> None:
    """Packets between the relay and PostgreSQL dropped for 60 s (Kafka reached directly), with
    wal_sender_timeout 20 s (set on the relay's connections): the server ends the walsender
    during the blackhole; the relay, hearing nothing, takes its connection for dead
    (replication_timeout 20 s) and reconnects into the blackhole (connect timeout). Killed 30 s
    in: the restarted relay waits for the database too. After the heal it resumes from the slot,
    which the old walsender may still hold for a moment (standby until it is free)."""
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy=None,
        seconds=80,
        replication_timeout=20,
        url_params={"options": "-c%20wal_sender_timeout%3D20s"},
    )
    pg_proxy.blackhole()
    hold(60, s, kill_at=30)
    pg_proxy.heal()
    s.healed()
    s.finish("postgres blackhole 60s + kill", kafka_bootstrap)


@pytest.mark.fault_proxy
def test_an_idle_relay_notices_a_silent_database_connection_and_reconnects(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
) -> None:
    """No load, so nothing would ever tell the relay that its replication connection is dead
    (a blackhole closes nothing, and here the proxy's kernel even acknowledges what the relay
    sends): after replication_timeout / 2 of silence it asks the server for a reply, after the
    other half it gives the connection up and reconnects once the network is back."""
    relay = relays(
        database_url=proxied_url(postgres_url, pg_proxy, options="-c%20wal_sender_timeout%3D10s"),
        replication_timeout=6,
    )
    relay.start()
    relay.wait_streaming()
    pg_proxy.blackhole()
    t0 = time.monotonic()
    relay.wait_for_log("taken for dead", timeout=20)
    detected_s = time.monotonic() - t0
    time.sleep(max(0.0, 12 - detected_s))  # the walsender's own timeout (10 s) ends it too
    pg_proxy.heal()
    healed = time.monotonic()
    wait_until(
        lambda: relay.log_text().count("INFO outbox_cdc.relay: streaming from") >= 2,
        timeout=60,
        what="the relay to stream again",
    )
    streaming_again_s = time.monotonic() - healed
    load = LoadGenerator(postgres_url, outbox_table, topic, events=500, keys=20, threads=2)
    result = load.start().join(timeout=60)
    records = read_topic(kafka_bootstrap, topic, expect_ids=result.committed, timeout=60)
    res = check(records, result)
    report(
        "idle relay, silent database connection",
        replication_timeout_s=6,
        detected_after_s=f"{detected_s:.1f}",
        streaming_again_after_heal_s=f"{streaming_again_s:.1f}",
        check=res.summary(),
    )
    assert detected_s < 10, detected_s
    res.assert_complete(exactly_once=True)


@pytest.mark.fault_proxy
def test_broker_disk_full_with_a_kill_loses_nothing(
    relays: Relays,
    postgres_url: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
    disk_broker: DiskBroker,
) -> None:
    """A broker of its own whose data directory is a 64 MB tmpfs, filled up under load: appends
    fail (KAFKA_STORAGE_ERROR, the log directory goes offline and the broker stops). Nothing is
    acknowledged, so nothing is confirmed; the relay is killed and restarted meanwhile. Space is
    freed and the broker restarted: every committed event arrives."""
    bootstrap = disk_broker.bootstrap
    ensure_topic(bootstrap, topic, partitions=4)
    s = start_scenario(
        relays,
        postgres_url,
        bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy=None,
        seconds=40,
    )
    filled = disk_broker.fill()
    hold(15, s, kill_at=8)
    broker_stopped_by_itself = not disk_broker.running
    disk_broker.free()
    disk_broker.stop()
    disk_broker.start()
    s.healed()
    s.finish(
        "broker disk full + kill",
        bootstrap,
        filled_mb=round(filled / 2**20, 1),
        broker_stopped_by_itself=broker_stopped_by_itself,
    )
    assert "No space left on device" in disk_broker.log_tail(10_000)
