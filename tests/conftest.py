"""Fixtures that give tests real services: PostgreSQL 15 + wal2json, Kafka, MariaDB.

Each service comes from its environment variable (``scripts/services.sh up`` writes them to
``.services.env``), else from a testcontainers container when a Docker engine answers, else the
test is skipped -- or fails, when ``CI=true`` or ``pytest --require-services``.

Fixture contract (keep the names):

* ``postgres_url``        session  postgresql://outbox:outbox@host:port/outbox_test
                                   (role with LOGIN REPLICATION CREATEDB, owns the database)
* ``postgres_admin_url``  session  superuser URL for the same server and database
* ``kafka_bootstrap``     session  "host:port"
* ``mysql_url``           session  mysql://user:pass@host:port/db
* ``unique_name``         function factory: unique_name(prefix) -> "prefix_<hex>", [a-z0-9_]
* ``replication_slot``    function a unique slot name; the slot is dropped at teardown
* ``kafka_topic``         function a unique topic name; the topic is deleted at teardown
* ``services``            session  .stop(name) / .start(name) / .restart(name) for
                                   name in postgres|kafka|mysql (fault injection)
* ``secure_endpoints``    session  SecureEndpoints: PostgreSQL verify-full URL, Kafka SASL_SSL
                                   and mutual-TLS listeners, the local CA (services.sh only)
"""

from __future__ import annotations

import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import NoReturn

import pytest

from tests.support.kafka import delete_topic
from tests.support.postgres import drop_replication_slot
from tests.support.services import (
    SecureEndpoints,
    ServiceControl,
    ServiceResolver,
    ServiceUnavailable,
    describe_services,
    secure_endpoints,
    truthy,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-services",
        action="store_true",
        default=False,
        help="fail (instead of skip) tests whose PostgreSQL/Kafka/MariaDB is missing or not "
        "answering; implied by CI=true",
    )


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0 loads its protocol schemas with a deprecated importlib.resources API
    config.addinivalue_line(
        "filterwarnings", r"ignore:(read_text|open_text) is deprecated:DeprecationWarning"
    )


def _services_required(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-services")) or truthy(os.environ.get("CI"))


def pytest_report_header(config: pytest.Config) -> list[str]:
    mode = (
        "required (missing ones fail)"
        if _services_required(config)
        else "optional (missing ones skip)"
    )
    lines = [f"outbox-cdc services: {mode}"]
    try:
        lines += [f"  {line}" for line in describe_services()]
    except Exception as exc:  # the header must never break the run
        lines.append(f"  (could not describe the services: {exc!r})")
    return lines


def _unavailable(config: pytest.Config, message: str) -> NoReturn:
    if _services_required(config):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def _service_resolver() -> Iterator[ServiceResolver]:
    resolver = ServiceResolver()
    yield resolver
    resolver.close()  # removes the containers it started, if any


def _require(request: pytest.FixtureRequest, resolver: ServiceResolver, key: str) -> str:
    res = resolver.resolve(key)
    if res.value is None:
        _unavailable(request.config, res.error or f"{key} is not available")
    return res.value


@pytest.fixture(scope="session")
def postgres_url(request: pytest.FixtureRequest, _service_resolver: ServiceResolver) -> str:
    """postgresql://outbox:outbox@host:port/outbox_test (LOGIN REPLICATION CREATEDB)."""
    return _require(request, _service_resolver, "postgres")


@pytest.fixture(scope="session")
def postgres_admin_url(request: pytest.FixtureRequest, _service_resolver: ServiceResolver) -> str:
    """A superuser URL for the server of ``postgres_url`` (ALTER SYSTEM, kill backends...)."""
    return _require(request, _service_resolver, "postgres_admin")


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest, _service_resolver: ServiceResolver) -> str:
    """Bootstrap servers "host:port" of a broker that answered a metadata request."""
    return _require(request, _service_resolver, "kafka")


@pytest.fixture(scope="session")
def mysql_url(request: pytest.FixtureRequest, _service_resolver: ServiceResolver) -> str:
    """mysql://user:pass@host:port/db of a MariaDB (or MySQL) server that answered."""
    return _require(request, _service_resolver, "mysql")


_NON_NAME = re.compile(r"[^a-z0-9_]+")


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Factory: unique_name("orders") -> "orders_3f9c0a1b2d4e" (lower-case, [a-z0-9_]).

    Unique on every call; starts with a letter; at most 63 characters, so it fits PostgreSQL
    identifiers and slot names as well as Kafka topic names.
    """

    def make(prefix: str = "t") -> str:
        clean = _NON_NAME.sub("_", prefix.lower()).strip("_") or "t"
        if not clean[0].isalpha():
            clean = f"t_{clean}"
        return f"{clean[:48]}_{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
def replication_slot(postgres_admin_url: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    """A unique replication slot name (not created). At teardown the slot, if it exists, is
    dropped, after terminating the walsender that holds it."""
    name = unique_name("slot")
    yield name
    drop_replication_slot(postgres_admin_url, name)


@pytest.fixture
def kafka_topic(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    """A unique topic name (not created: the broker auto-creates topics with 1 partition, or
    create it yourself). Deleted at teardown."""
    name = unique_name("topic")
    yield name
    try:
        delete_topic(kafka_bootstrap, name)
    except Exception as exc:  # e.g. a fault-injection test left the broker down
        warnings.warn(f"could not delete Kafka topic {name}: {exc!r}", stacklevel=1)


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> ServiceControl:
    """Fault injection: services.stop("kafka"), services.start("kafka"),
    services.restart("postgres"), ... through $OUTBOX_CDC_TEST_SERVICES_SCRIPT.
    When unavailable (e.g. the services are testcontainers), the call skips the test, or fails
    it when services are required."""
    return ServiceControl(lambda message: _unavailable(request.config, message))


@pytest.fixture(scope="session", name="secure_endpoints")
def _secure_endpoints(request: pytest.FixtureRequest) -> SecureEndpoints:
    """The TLS/SASL endpoints of ``scripts/services.sh up`` (see SecureEndpoints), checked.
    Missing: skip, or fail when services are required."""
    try:
        return secure_endpoints()
    except ServiceUnavailable as exc:
        _unavailable(request.config, f"TLS/SASL endpoints: {exc}")
