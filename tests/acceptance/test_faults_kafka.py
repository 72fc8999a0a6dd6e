"""Fault scenarios behind the Kafka proxy (see tests/acceptance/faults.py): a 60 s blackhole, a
slow link, connection resets, and the polling relay through blackholes and resets. They disturb
only their own proxies (marker ``fault_proxy``): CI runs this file and
test_faults_database.py at the same time (``-n 2 --dist loadfile``); the Kafka proxy listens on a
fixed port (where the broker advertises it), so the scenarios of this file run one at a time.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.acceptance.conftest import MARIADB
from tests.acceptance.faults import (
    RATE,
    Relays,
    Scenario,
    hold,
    recorded_delivered,
    start_scenario,
)
from tests.acceptance.harness import (
    Arrivals,
    Database,
    LoadGenerator,
    check,
    read_topic,
    report,
    slot_row,
)
from tests.support.faultproxy import FaultProxy
from tests.support.kafka import delete_topic
from tests.support.postgres import lsn_to_int

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(420)]


@pytest.mark.fault_proxy
def test_kafka_blackhole_60s_with_a_kill_loses_nothing(
    relays: Relays,
    postgres_url: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    replication_slot: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy,
) -> None:
    """Packets to and from Kafka dropped for 60 s (half-open connections, no RST): longer than
    the request timeout (30 s), shorter than the delivery timeout (120 s). The slot must not move
    while nothing can be acknowledged; the relay is killed 30 s in and restarted into the
    blackhole (its producer cannot even fetch metadata)."""
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy,
        seconds=75,
    )
    kafka_proxy.blackhole()
    time.sleep(2)  # what was acknowledged before the blackhole may still be confirmed
    before = slot_row(postgres_admin_url, replication_slot)
    # the restarted relay may confirm up to the position the killed one recorded as delivered
    recorded = recorded_delivered(postgres_admin_url, replication_slot)
    hold(58, s, kill_at=28)
    after = slot_row(postgres_admin_url, replication_slot)
    kafka_proxy.heal()
    s.healed()
    assert before is not None and after is not None
    acknowledged = max(lsn_to_int(before["confirmed_flush_lsn"]), recorded)
    s.finish(
        "kafka blackhole 60s + kill",
        kafka_bootstrap,
        slot_confirmed_during_blackhole=f"{before['confirmed_flush_lsn']}"
        f"->{after['confirmed_flush_lsn']}",
    )
    # nothing acknowledged during the blackhole: the slot never passed what was acknowledged
    assert lsn_to_int(after["confirmed_flush_lsn"]) <= acknowledged, (before, recorded, after)


@pytest.mark.fault_proxy
def test_slow_kafka_link_latency_then_bandwidth_with_a_kill_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy,
) -> None:
    """A slow or distant broker: 500 ms added to every chunk towards it for 20 s (the relay is
    killed 10 s in), then 15 s of a 24 KB/s link, below the load's ~35 KB/s (so a backlog
    builds up and in-flight limits apply), with closes propagated 2 s late."""
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy,
        seconds=45,
    )
    kafka_proxy.set_latency(0.5, "upstream")
    hold(20, s, kill_at=10)
    kafka_proxy.heal()
    arrived = len(s.arrivals.first_seen)
    bytes_before = kafka_proxy.stats.bytes_upstream
    kafka_proxy.set_bandwidth(24 * 1024)
    kafka_proxy.set_slow_close(2.0)
    t_limited = time.monotonic()
    hold(15, s)
    limited_rate = (kafka_proxy.stats.bytes_upstream - bytes_before) / (
        time.monotonic() - t_limited
    )
    arrived_while_limited = len(s.arrivals.first_seen) - arrived
    kafka_proxy.heal()
    s.healed()
    s.finish(
        "kafka latency 500ms + kill, then 24 KB/s",
        kafka_bootstrap,
        upstream_bytes_per_s_while_limited=int(limited_rate),
        arrived_while_limited=arrived_while_limited,
    )
    assert limited_rate <= 26 * 1024, limited_rate


@pytest.mark.fault_proxy
def test_connection_resets_every_3s_for_a_minute_with_a_kill_lose_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy,
) -> None:
    """Every 3 s for 60 s, the relay's connections are reset (RST), alternately to Kafka and
    to PostgreSQL; killed 30 s in."""
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy,
        seconds=70,
    )
    resets = {"kafka": 0, "postgres": 0}
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < 60:
        time.sleep(3)
        target = "kafka" if n % 2 == 0 else "postgres"
        resets[target] += (kafka_proxy if target == "kafka" else pg_proxy).reset()
        n += 1
        if n == 10:
            s.kill_and_restart()
    s.healed()
    s.finish(
        "resets every 3s x60s + kill",
        kafka_bootstrap,
        connections_reset=resets,
    )
    assert resets["kafka"] >= 5 and resets["postgres"] >= 5, resets


@pytest.mark.fault_proxy
@pytest.mark.mysql
@pytest.mark.parametrize("polling_backend", [MARIADB], indirect=True)
def test_polling_relay_through_blackholes_and_resets_with_a_kill_loses_nothing(
    polling_relays: Relays,
    polling_db: Database,
    kafka_bootstrap: str,
    polling_table: str,
    topic: str,
    kafka_proxy: FaultProxy,
) -> None:
    """The polling relay (MariaDB) behind both proxies, one fault after the other under the
    same load: Kafka blackholed 20 s (killed 10 s in), the database connections reset every
    3 s for 15 s, then the database blackholed 15 s. Duplicates: at most a poll batch (500)
    per kill or reconnect."""
    host, port = urlsplit(polling_db.url).hostname, urlsplit(polling_db.url).port
    with FaultProxy((host or "127.0.0.1", port or 3306), name="mariadb") as db_proxy:
        u = urlsplit(polling_db.url)
        proxied = urlunsplit(
            (u.scheme, u.netloc.rsplit("@", 1)[0] + "@" + db_proxy.address, u.path, "", "")
        )
        t0 = time.monotonic()
        sources = ["fault-run1"]
        relay = polling_relays(
            database_url=proxied, bootstrap=kafka_proxy.address, poll_batch_size=500
        )
        relay.start(source_name=sources[0])
        relay.wait_streaming()
        arrivals = Arrivals(kafka_bootstrap, topic).start()
        load = LoadGenerator(
            polling_db, polling_table, topic, events=RATE * 60, keys=200, threads=4, rate=RATE
        ).start()
        load.wait_written(RATE * 3, timeout=30)
        s = Scenario(relay, load, arrivals, sources, t0=t0)
        kafka_proxy.blackhole()
        hold(20, s, kill_at=10)
        kafka_proxy.heal()
        resets = 0
        for _ in range(5):
            time.sleep(3)
            resets += db_proxy.reset()
        db_proxy.blackhole()
        hold(15, s)
        db_proxy.heal()
        s.healed()
        res, _ = s.finish(
            "polling (MariaDB): Kafka blackhole 20s + kill, resets, database blackhole 15s",
            kafka_bootstrap,
            database_connections_reset=resets,
            duplicate_bound=500,
        )
        restarts = relay.all_logs().count("streaming from") - 1
        assert res.duplicates <= max(1, restarts) * 500, res.summary()
        assert resets >= 5


@pytest.mark.fault_proxy
def test_exactly_once_relay_warns_during_a_25s_kafka_blackhole_and_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy,
) -> None:
    """Exactly-once mode, Kafka unreachable (blackhole) for 25 s under load: the relay says
    that Kafka acknowledges nothing (the at-least-once warning) within 20 s, where it used to
    wait silently in its commit; after the heal, a read_committed consumer sees every
    committed event once, in key order."""
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy,
        seconds=40,
        exactly_once="true",
        progress_topic=f"{topic}-progress",
    )
    try:
        kafka_proxy.blackhole()
        blackholed = time.monotonic()
        match = s.relay.wait_for_log(
            r"WARNING outbox_cdc\.relay: Kafka has acknowledged nothing", 22
        )
        warned_after = time.monotonic() - blackholed
        warning = next(
            line for line in s.relay.log_text().splitlines() if "acknowledged nothing" in line
        )
        assert match
        time.sleep(max(0.0, 25 - (time.monotonic() - blackholed)))
        kafka_proxy.heal()
        s.healed()
        result = s.load.join(timeout=120)
        records = read_topic(
            kafka_bootstrap,
            topic,
            expect_ids=result.committed,
            timeout=120,
            settle=2,
            isolation_level="read_committed",
        )
        res = check(records, result, sources=s.sources)
        before_heal = [w for w in result.committed.values() if w.written_at < s.healed_at]
        recovered = s.arrivals.recovered_after(s.healed_at, before_heal)
        report(
            "exactly once: kafka blackhole 25s",
            committed=len(result.committed),
            warned_after_s=f"{warned_after:.1f}",
            warning=warning[24:150],
            read_committed_duplicates=res.duplicates,
            recovered_after_heal_s=None if recovered is None else f"{recovered:.1f}",
            total_s=f"{time.monotonic() - s.t0:.1f}",
            check=res.summary(),
        )
        assert s.relay.running, s.relay.log_text()
        assert warned_after < 20, warned_after
        res.assert_complete(exactly_once=True)
        assert recovered is not None and recovered < 60, recovered
    finally:
        s.arrivals.stop()
        s.relay.kill()
        delete_topic(kafka_bootstrap, f"{topic}-progress")
