"""Broker and database restarts under steady load, with the relay killed while the server is
down (see tests/acceptance/faults.py). They stop shared services, so they run with the rest of the
suite, never next to other tests.
"""

from __future__ import annotations

import time

import pytest

from tests.acceptance.faults import (
    Relays,
    leader_epoch,
    start_scenario,
)
from tests.acceptance.harness import (
    wait_until,
)
from tests.support.faultproxy import FaultProxy
from tests.support.services import ServiceControl

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(420)]


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
    epoch_before = leader_epoch(kafka_bootstrap, topic)
    services.stop("kafka")
    try:
        time.sleep(5)
        s.kill_and_restart()
        time.sleep(5)
    finally:
        services.start("kafka")
    s.healed()
    epoch_after = leader_epoch(kafka_bootstrap, topic)
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
    s = start_scenario(
        relays,
        postgres_url,
        kafka_bootstrap,
        outbox_table,
        topic,
        pg_proxy,
        kafka_proxy,
        seconds=30,
        tolerate_restarts=True,
    )
    services.stop("postgres")
    try:
        time.sleep(3)
        s.kill_and_restart()
        time.sleep(3)
    finally:
        services.start("postgres")
    s.healed()
    s.finish("database restart + kill while down", kafka_bootstrap)
