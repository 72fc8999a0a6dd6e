"""Fixtures of the WAL relay acceptance suite (on top of tests/conftest.py).

* ``outbox_table``  a fresh outbox table (schema v1) of its own per test, dropped at teardown;
* ``topic``         ``kafka_topic`` created with 4 partitions (per-key order means something);
* ``kafka_client``  the relay's Kafka client (``OUTBOX_CDC_KAFKA_CLIENT``): ``kafka-python``,
                    or the test's parameter (``@pytest.mark.parametrize("kafka_client",
                    CLIENTS, indirect=True)``); ``confluent`` skips when not installed;
* ``relays``        factory of relay processes on that table, slot and database, each killed at
                    teardown; their logs are attached to the report of a failing test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.harness import (
    RelayProcess,
    create_outbox_table,
    drop_outbox_table,
    ensure_topic,
    relay_env,
)

_RELAYS = pytest.StashKey[list[RelayProcess]]()
LOG_TAIL_LINES = 150


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.failed:
        for relay in item.stash.get(_RELAYS, []):
            for path in relay.logs:
                lines = path.read_text(errors="replace").splitlines() if path.exists() else []
                tail = "\n".join(lines[-LOG_TAIL_LINES:])
                report.sections.append(
                    (f"relay log {path} (last {min(len(lines), LOG_TAIL_LINES)} lines)", tail)
                )
    return report


@pytest.fixture
def outbox_table(postgres_url: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    """A new outbox table ``public.<unique>``, created with the project's DDL."""
    table = f"public.{unique_name('outbox')}"
    create_outbox_table(postgres_url, table)
    yield table
    drop_outbox_table(postgres_url, table)


@pytest.fixture
def topic(kafka_bootstrap: str, kafka_topic: str) -> str:
    ensure_topic(kafka_bootstrap, kafka_topic, partitions=4)
    return kafka_topic


CLIENTS = ["kafka-python", "confluent"]


@pytest.fixture
def kafka_client(request: pytest.FixtureRequest) -> str:
    client: str = getattr(request, "param", "kafka-python")
    if client == "confluent":
        pytest.importorskip("confluent_kafka", reason="the confluent extra is not installed")
    return client


@pytest.fixture
def relays(
    request: pytest.FixtureRequest,
    kafka_client: str,
    tmp_path: Path,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    replication_slot: str,
    topic: str,
) -> Iterator[Callable[..., RelayProcess]]:
    """``relays(name="relay", **settings)``: a relay process (not started) for this test's
    table and slot; ``settings`` become ``OUTBOX_CDC_<NAME>`` variables. Killed at teardown,
    before the slot, topic and table go."""
    made: list[RelayProcess] = []
    request.node.stash[_RELAYS] = made

    def make(name: str = "relay", **settings: object) -> RelayProcess:
        env = relay_env(
            database_url=postgres_url,
            bootstrap=kafka_bootstrap,
            table=outbox_table,
            slot=replication_slot,
            kafka_client=kafka_client,
            **settings,
        )
        relay = RelayProcess(env, tmp_path / "logs", name)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.kill()
