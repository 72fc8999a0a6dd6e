"""The fault-injection scenarios' shared parts (tests/acceptance/test_faults_*.py): the relay
behind fault proxies (tests/support/faultproxy.py), the steady load, the kill in the middle of the
fault, and the end-to-end check with the time to recover.

Each scenario: 4 producer threads at a steady rate over 200 keys, one transaction in ten rolled
back; the fault; the relay SIGKILLed in the middle of it and restarted at once (still under the
fault); the fault healed; then the end-to-end check (every committed event, no rolled-back one,
per-key order, exact content; duplicates counted, per relay run by their ce_source) and the time
to recover (from the heal until every event committed before it had arrived). Each scenario
prints one ``[acceptance]`` line; docs/reliability.md has the table of the last run.

The proxies: one between the relay and PostgreSQL, one between the relay and Kafka (the broker's
FAULT listener is advertised at the proxy's address, so every broker connection the client opens
goes through it too); fixtures ``kafka_proxy``, ``pg_proxy`` and ``disk_broker`` in conftest.py.
The load generator and the checker talk to the services directly: only the relay's network is
faulty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psycopg
from kafka import KafkaAdminClient

from tests.acceptance.harness import (
    Arrivals,
    CheckResult,
    LoadGenerator,
    LoadResult,
    RelayProcess,
    check,
    read_topic,
    report,
)
from tests.support.faultproxy import FaultProxy
from tests.support.postgres import lsn_to_int

Relays = Callable[..., RelayProcess]

IN_FLIGHT_BOUND = 2000  # max_in_flight_events: what a kill can make the relay send again
RATE = 200  # events per second, all producer threads together


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
    tolerate_restarts: bool = False,
    **settings: object,
) -> Scenario:
    """The relay (behind ``pg_proxy``, and ``kafka_proxy`` unless None) streaming, the arrivals
    tail, and ``seconds`` of load at ``RATE``, of which 3 s have passed on return.
    ``tolerate_restarts``: the producers survive a database restart (see LoadGenerator)."""
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
        tolerate_restarts=tolerate_restarts,
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


def recorded_delivered(admin_url: str, slot: str) -> int:
    """The delivered position the relay records in outbox_cdc_offsets (0 if none yet)."""
    with psycopg.connect(admin_url) as conn:
        row = conn.execute(
            "SELECT delivered_lsn::text FROM outbox_cdc_offsets WHERE slot_name = %s", (slot,)
        ).fetchone()
    return lsn_to_int(row[0]) if row else 0


def leader_epoch(bootstrap: str, topic: str) -> int:
    """The current leader epoch of the topic's partition 0, from the broker's metadata."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="outbox-cdc-acceptance")
    try:
        partitions = admin.describe_topics([topic])[0]["partitions"]
        return int(next(p["leader_epoch"] for p in partitions if p["partition_index"] == 0))
    finally:
        admin.close()
