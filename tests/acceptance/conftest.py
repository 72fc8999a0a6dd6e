"""Fixtures of the relay acceptance suite (on top of tests/conftest.py).

WAL mode (PostgreSQL):

* ``outbox_table``  a fresh outbox table (schema v1) of its own per test, dropped at teardown;
* ``topic``         ``kafka_topic`` created with 4 partitions (per-key order means something);
* ``kafka_client``  the relay's Kafka client (``OUTBOX_CDC_KAFKA_CLIENT``): ``kafka-python``,
                    or the test's parameter (``@pytest.mark.parametrize("kafka_client",
                    CLIENTS, indirect=True)``); ``confluent`` skips when not installed;
* ``relays``        factory of relay processes on that table, slot and database, each killed at
                    teardown; their logs are attached to the report of a failing test.

Polling mode, each test once per backend of ``POLLING_BACKENDS`` (``mariadb``, ``sqlite``,
``postgres`` = PostgreSQL with ``OUTBOX_CDC_MODE=polling``); a test limits the backends with
``@pytest.mark.parametrize("polling_backend", [...], indirect=True)``:

* ``polling_backend``  the backend's name;
* ``polling_db``       its :class:`~tests.acceptance.harness.Database` (a SQLite file in
                       ``tmp_path``, in WAL journal mode);
* ``polling_url``      the relay's ``OUTBOX_CDC_DATABASE_URL``;
* ``polling_table``    a fresh outbox table of the test's own, dropped at teardown;
* ``polling_connect``  a new producer connection (psycopg, PyMySQL or sqlite3; not autocommit);
* ``polling_relays``   ``polling_relays(name="relay", database_url=None, bootstrap=None,
                       **settings)``: like ``relays``, on that table and the ``topic``.

Fault injection (tests/acceptance/faults.py):

* ``kafka_proxy``  a fault proxy to the broker's FAULT listener, on the port the broker
                   advertises for it (one at a time);
* ``pg_proxy``     a fault proxy to PostgreSQL (any free port; ``faults.proxied_url``);
* ``disk_broker``  a Kafka broker of the test's own, its data on a 64 MB tmpfs (root only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.acceptance.harness import (
    Database,
    MariaDatabase,
    PostgresDatabase,
    RelayProcess,
    SqliteDatabase,
    create_outbox_table,
    drop_outbox_table,
    ensure_topic,
    relay_env,
)
from tests.conftest import _unavailable
from tests.support.disk_broker import DiskBroker, kafka_lib
from tests.support.faultproxy import FaultProxy

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
    """``relays(name="relay", database_url=None, bootstrap=None, **settings)``: a relay process
    (not started) for this test's table and slot; ``settings`` become ``OUTBOX_CDC_<NAME>``
    variables; ``database_url`` and ``bootstrap`` replace the services' (e.g. by a proxy's).
    Killed at teardown, before the slot, topic and table go."""
    made: list[RelayProcess] = []
    request.node.stash[_RELAYS] = made

    def make(
        name: str = "relay",
        *,
        database_url: str | None = None,
        bootstrap: str | None = None,
        **settings: object,
    ) -> RelayProcess:
        env = relay_env(
            database_url=database_url or postgres_url,
            bootstrap=bootstrap or kafka_bootstrap,
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


# ------------------------------------------------------------------------------------------
# polling mode
# ------------------------------------------------------------------------------------------

MARIADB = pytest.param("mariadb", marks=pytest.mark.mysql, id="mariadb")
SQLITE = pytest.param("sqlite", id="sqlite")
POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres, id="postgres")
POLLING_BACKENDS = [MARIADB, SQLITE, POSTGRES]


@pytest.fixture(params=POLLING_BACKENDS)
def polling_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


@pytest.fixture
def polling_db(request: pytest.FixtureRequest, polling_backend: str, tmp_path: Path) -> Database:
    """The backend's database; only that backend's service is required."""
    if polling_backend == "mariadb":
        return MariaDatabase(request.getfixturevalue("mysql_url"))
    if polling_backend == "postgres":
        return PostgresDatabase(request.getfixturevalue("postgres_url"))
    assert polling_backend == "sqlite", polling_backend
    return SqliteDatabase(tmp_path / "outbox.sqlite3")


@pytest.fixture
def polling_url(polling_db: Database) -> str:
    return polling_db.url


@pytest.fixture
def polling_table(polling_db: Database, unique_name: Callable[[str], str]) -> Iterator[str]:
    """A new outbox table, created with the project's DDL for polling (``public.<unique>`` in
    PostgreSQL, with the pending-rows index of ``init --polling``; a plain name in MariaDB and
    SQLite)."""
    name = unique_name("outbox")
    table = f"public.{name}" if polling_db.dialect == "postgresql" else name
    polling_db.create_table(table, polling=True)
    yield table
    polling_db.drop_table(table)


@pytest.fixture
def polling_connect(polling_db: Database) -> Callable[[], Any]:
    return polling_db.connect


@pytest.fixture
def polling_relays(
    request: pytest.FixtureRequest,
    kafka_client: str,
    tmp_path: Path,
    polling_db: Database,
    kafka_bootstrap: str,
    polling_table: str,
    topic: str,
    unique_name: Callable[[str], str],
) -> Iterator[Callable[..., RelayProcess]]:
    """``polling_relays(name, database_url=None, bootstrap=None, **settings)``: a polling relay
    process (not started) for this test's table; ``settings`` become ``OUTBOX_CDC_<NAME>``
    variables; ``database_url`` and ``bootstrap`` replace the services'. PostgreSQL gets
    ``OUTBOX_CDC_MODE=polling``; MariaDB and SQLite rely on the default mode (auto). The slot
    and message prefix (ignored when polling) are a unique name, never created. Killed at
    teardown, before the table and topic go."""
    made: list[RelayProcess] = []
    request.node.stash[_RELAYS] = made
    slot = unique_name("unused_slot")

    def make(
        name: str = "relay",
        *,
        database_url: str | None = None,
        bootstrap: str | None = None,
        **settings: object,
    ) -> RelayProcess:
        if polling_db.dialect == "postgresql":
            settings.setdefault("mode", "polling")
        env = relay_env(
            database_url=database_url or polling_db.url,
            bootstrap=bootstrap or kafka_bootstrap,
            table=polling_table,
            slot=slot,
            kafka_client=kafka_client,
            **settings,
        )
        relay = RelayProcess(env, tmp_path / "logs", name)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.kill()


# ------------------------------------------------------------------------------------------
# fault injection (tests/acceptance/faults.py)
# ------------------------------------------------------------------------------------------


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
