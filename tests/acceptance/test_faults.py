"""Network and server faults under steady load (issue "Fault-injection ... suite"), with the WAL
relay as a real process behind fault proxies (tests/support/faultproxy.py): one between the relay
and PostgreSQL, one between the relay and Kafka (the broker's FAULT listener is advertised at
the proxy's address, so every broker connection the client opens goes through it too). The load
generator and the checker talk to the services directly: only the relay's network is faulty.

Each scenario: 4 producer threads at a steady rate over 200 keys, one transaction in ten rolled
back; the fault; the relay SIGKILLed in the middle of it and restarted at once (still under the
fault); the fault healed; then the end-to-end check (every committed event, no rolled-back one,
per-key order, exact content; duplicates counted, per relay run by their ce_source) and the time
to recover (from the heal until every event committed before it had arrived). Each scenario
prints one ``[acceptance]`` line; docs/reliability.md has the table of the last run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.acceptance.conftest import MARIADB
from tests.acceptance.harness import (
    Arrivals,
    CheckResult,
    Database,
    LoadGenerator,
    LoadResult,
    RelayProcess,
    check,
    ensure_topic,
    read_topic,
    report,
    slot_row,
    wait_until,
)
from tests.conftest import _unavailable
from tests.support.disk_broker import DiskBroker, kafka_lib
from tests.support.faultproxy import FaultProxy
from tests.support.postgres import lsn_to_int
from tests.support.services import ServiceControl

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(420)]

Relays = Callable[..., RelayProcess]

IN_FLIGHT_BOUND = 2000  # max_in_flight_events: what a kill can make the relay send again
RATE = 200  # events per second, all producer threads together


@pytest.fixture
def kafka_proxy(request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    """A proxy on the broker's FAULT listener, listening where the broker advertises it."""
    listener = os.environ.get("OUTBOX_CDC_TEST_KAFKA_FAULT_LISTENER")
    advertised = os.environ.get("OUTBOX_CDC_TEST_KAFKA_FAULT_ADVERTISED")
    if not listener or not advertised:
        _unavailable(
            request.config,
            "the fault-injection tests need Kafka's FAULT listener "
            "(OUTBOX_CDC_TEST_KAFKA_FAULT_LISTENER/_ADVERTISED): scripts/services.sh up && "
            ". ./.services.env",
        )
    host, port = listener.rsplit(":", 1)
    listen_host, listen_port = advertised.rsplit(":", 1)
    proxy = FaultProxy(
        (host, int(port)), listen_host=listen_host, listen_port=int(listen_port), name="kafka"
    )
    with proxy:
        yield proxy


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[FaultProxy]:
    u = urlsplit(postgres_url)
    with FaultProxy((u.hostname or "127.0.0.1", u.port or 5432), name="postgres") as proxy:
        yield proxy


def proxied_url(postgres_url: str, proxy: FaultProxy, **params: str) -> str:
    u = urlsplit(postgres_url)
    netloc = u.netloc.rsplit("@", 1)[0] + "@" + proxy.address
    query = "&".join([*filter(None, [u.query]), *(f"{k}={v}" for k, v in params.items())])
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


@dataclass
class Scenario:
    """The relay behind both proxies, the load, the arrivals tail; one relay run per source."""

    relay: RelayProcess
    load: LoadGenerator
    arrivals: Arrivals
    sources: list[str]
    kills: int = 0
    healed_at: float = 0.0  # time.time()
    t0: float = 0.0

    def kill_and_restart(self) -> None:
        assert self.relay.running, self.relay.log_text()
        self.relay.kill()
        self.kills += 1
        self.sources.append(f"fault-run{len(self.sources) + 1}")
        self.relay.start(source_name=self.sources[-1])

    def healed(self) -> None:
        self.healed_at = time.time()

    def finish(
        self, name: str, kafka_bootstrap: str, **figures: object
    ) -> tuple[CheckResult, LoadResult]:
        result = self.load.join(timeout=240)
        records = read_topic(
            kafka_bootstrap, self.load.topic, expect_ids=result.committed, timeout=240, settle=2
        )
        res = check(records, result, sources=self.sources)
        before_heal = [w for w in result.committed.values() if w.written_at < self.healed_at]
        recovered = self.arrivals.recovered_after(self.healed_at, before_heal)
        self.arrivals.stop()
        report(
            name,
            committed=len(result.committed),
            rolled_back=len(result.rolled_back),
            kills=self.kills,
            duplicates=res.duplicates,
            duplicates_per_run=[res.copies_by_source.get(s, 0) for s in self.sources[1:]],
            recovered_after_heal_s=None if recovered is None else f"{recovered:.1f}",
            relay_connects=self.relay.all_logs().count("streaming from"),
            total_s=f"{time.monotonic() - self.t0:.1f}",
            **figures,
            check=res.summary(),
        )
        assert self.relay.running, self.relay.log_text()
        res.assert_complete()
        # a kill re-sends at most what was in flight; a sink restarted after a delivery timeout
        # re-reads from the slot, also at most what was in flight
        restarts = self.relay.all_logs().count("streaming from") - 1
        assert res.duplicates <= max(1, restarts) * IN_FLIGHT_BOUND, res.summary()
        assert recovered is not None and recovered < 120, recovered
        return res, result


def start_scenario(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    table: str,
    topic: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy | None,
    *,
    seconds: float,
    url_params: dict[str, str] | None = None,
    **settings: object,
) -> Scenario:
    t0 = time.monotonic()
    sources = ["fault-run1"]
    relay = relays(
        database_url=proxied_url(postgres_url, pg_proxy, **(url_params or {})),
        bootstrap=kafka_proxy.address if kafka_proxy is not None else kafka_bootstrap,
        max_in_flight_events=IN_FLIGHT_BOUND,
        **settings,
    )
    relay.start(source_name=sources[0])
    relay.wait_streaming()
    arrivals = Arrivals(kafka_bootstrap, topic).start()
    load = LoadGenerator(
        postgres_url,
        table,
        topic,
        events=int(RATE * seconds),
        keys=200,
        threads=4,
        rate=RATE,
    ).start()
    load.wait_written(RATE * 3, timeout=30)  # 3 s of normal operation first
    return Scenario(relay, load, arrivals, sources, t0=t0)


def hold(seconds: float, scenario: Scenario, *, kill_at: float | None = None) -> None:
    """Let the fault last ``seconds``; SIGKILL and restart the relay ``kill_at`` s into it."""
    start = time.monotonic()
    if kill_at is not None:
        time.sleep(kill_at)
        scenario.kill_and_restart()
    time.sleep(max(0.0, seconds - (time.monotonic() - start)))


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
    recorded = _recorded_delivered(postgres_admin_url, replication_slot)
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


def _recorded_delivered(admin_url: str, slot: str) -> int:
    """The delivered position the relay records in outbox_cdc_offsets (0 if none yet)."""
    import psycopg

    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "SELECT delivered_lsn::text FROM outbox_cdc_offsets WHERE slot_name = %s", (slot,)
        ).fetchone()
    return lsn_to_int(row[0]) if row else 0


def test_postgres_blackhole_60s_longer_than_wal_sender_timeout_with_a_kill_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy,
) -> None:
    """Packets between the relay and PostgreSQL dropped for 60 s, with wal_sender_timeout 20 s
    (set on the relay's connections): the server ends the walsender during the blackhole; the
    relay, hearing nothing, takes its connection for dead (replication_timeout 20 s) and
    reconnects into the blackhole (connect timeout). Killed 30 s in: the restarted relay waits
    for the database too. After the heal it resumes from the slot, which the old walsender may
    still hold for a moment (standby until it is free)."""
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy,
        seconds=80,
        replication_timeout=20,
        url_params={"options": "-c%20wal_sender_timeout%3D20s"},
    )
    pg_proxy.blackhole()
    hold(60, s, kill_at=30)
    pg_proxy.heal()
    s.healed()
    s.finish("postgres blackhole 60s + kill", kafka_bootstrap)


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


def _leader_epoch(bootstrap: str, topic: str) -> int:
    """The current leader epoch of the topic's partition 0, from the broker's metadata."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="outbox-cdc-acceptance")
    try:
        partitions = admin.describe_topics([topic])[0]["partitions"]
        return int(next(p["leader_epoch"] for p in partitions if p["partition_index"] == 0))
    finally:
        admin.close()


def test_broker_restart_with_a_new_leader_epoch_and_a_kill_while_down_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy,
    services: ServiceControl,
) -> None:
    """The broker is stopped and started again (its partitions get a new leader epoch); the
    relay is killed while the broker is down and restarted at once."""
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy,
        seconds=40,
    )
    wait_until(lambda: len(s.arrivals.first_seen) > 0, timeout=30, what="a first event")
    epoch_before = _leader_epoch(kafka_bootstrap, topic)
    services.stop("kafka")
    try:
        time.sleep(5)
        s.kill_and_restart()
        time.sleep(5)
    finally:
        services.start("kafka")
    s.healed()
    epoch_after = _leader_epoch(kafka_bootstrap, topic)
    s.finish(
        "broker restart + kill while down",
        kafka_bootstrap,
        leader_epoch=f"{epoch_before}->{epoch_after}",
    )
    assert epoch_after > epoch_before


def test_database_restart_with_a_kill_while_down_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    topic: str,
    pg_proxy: FaultProxy,
    kafka_proxy: FaultProxy,
    services: ServiceControl,
) -> None:
    """PostgreSQL is stopped (fast shutdown: open transactions roll back) and started again;
    the relay is killed while it is down and restarted at once, so it starts against a
    database that is not there."""
    t0 = time.monotonic()
    sources = ["fault-run1"]
    relay = relays(
        database_url=proxied_url(postgres_url, pg_proxy),
        bootstrap=kafka_proxy.address,
        max_in_flight_events=IN_FLIGHT_BOUND,
    )
    relay.start(source_name=sources[0])
    relay.wait_streaming()
    arrivals = Arrivals(kafka_bootstrap, topic).start()
    load = LoadGenerator(
        postgres_url,
        outbox_table,
        topic,
        events=RATE * 30,
        keys=200,
        threads=4,
        rate=RATE,
        tolerate_restarts=True,
    ).start()
    load.wait_written(RATE * 3, timeout=30)
    s = Scenario(relay, load, arrivals, sources, t0=t0)
    services.stop("postgres")
    try:
        time.sleep(3)
        s.kill_and_restart()
        time.sleep(3)
    finally:
        services.start("postgres")
    s.healed()
    s.finish("database restart + kill while down", kafka_bootstrap)


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


@pytest.fixture
def disk_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DiskBroker]:
    if os.geteuid() != 0 or not kafka_lib().is_dir():
        _unavailable(
            request.config,
            "the disk-full test needs root (mount -t tmpfs) and the Kafka jars of "
            f"scripts/services.sh in {kafka_lib()}",
        )
    broker = DiskBroker(tmp_path / "disk-broker", data_mb=64)
    try:
        broker.setup().start()
        yield broker
    finally:
        broker.close()


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
