"""Where the test suite finds PostgreSQL, Kafka and MariaDB, and how it checks that they answer.

Each service is looked up in this order:

1. its environment variable (``scripts/services.sh up`` writes them to ``.services.env``);
2. a container started through testcontainers, when a Docker engine answers;
3. nothing: the tests that need it are skipped, or fail when services are required
   (``CI=true`` or ``pytest --require-services``).

The pytest fixtures built on this live in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
HOW_TO_START_ALL = "scripts/services.sh up && . ./.services.env"
SERVICES_SCRIPT_ENV = "OUTBOX_CDC_TEST_SERVICES_SCRIPT"
POSTGRES_ADMIN_ENV = "OUTBOX_CDC_TEST_POSTGRES_ADMIN_URL"
# answer time allowed to a service named by an environment variable
PROBE_TIMEOUT = 10.0
# set to 1 to never start containers, even when a Docker engine answers
NO_DOCKER_ENV = "OUTBOX_CDC_TEST_NO_DOCKER"


@dataclass(frozen=True)
class Service:
    name: str  # as scripts/services.sh names it
    label: str
    env_var: str
    image_env: str
    default_image: str


POSTGRES = Service(
    "postgres",
    "PostgreSQL",
    "OUTBOX_CDC_TEST_POSTGRES_URL",
    "OUTBOX_CDC_TEST_POSTGRES_IMAGE",
    # the official image; wal2json is installed with apt when the container starts (see
    # start_postgres_container). An image set in OUTBOX_CDC_TEST_POSTGRES_IMAGE must already
    # have wal2json.
    "postgres:15",
)
KAFKA = Service(
    "kafka",
    "Kafka",
    "OUTBOX_CDC_TEST_KAFKA_BOOTSTRAP_SERVERS",
    "OUTBOX_CDC_TEST_KAFKA_IMAGE",
    "apache/kafka:4.1.1",
)
MYSQL = Service(
    "mysql",
    "MariaDB",
    "OUTBOX_CDC_TEST_MYSQL_URL",
    "OUTBOX_CDC_TEST_MYSQL_IMAGE",
    "mariadb:11",
)
SERVICES: dict[str, Service] = {s.name: s for s in (POSTGRES, KAFKA, MYSQL)}


class ServiceUnavailable(Exception):
    """A service is missing or does not answer; the message says how to get it."""


def truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def how_to_start(service: Service) -> str:
    return (
        f"start it with `scripts/services.sh start {service.name}` "
        f"(or everything: `{HOW_TO_START_ALL}`)"
    )


def redact(url: str) -> str:
    """host:port/db of a URL, without the credentials."""
    parts = urlsplit(url)
    where = parts.hostname or "?"
    if parts.port:
        where = f"{where}:{parts.port}"
    return f"{where}{parts.path}"


# ------------------------------------------------------------------------------------------
# probes: a real request to each service
# ------------------------------------------------------------------------------------------
def probe_postgres(url: str, timeout: float = PROBE_TIMEOUT, *, superuser: bool = False) -> str:
    """Return the server version; raise if it does not answer or cannot do logical decoding."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout)), autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), current_setting('wal_level'),"
                " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
            ).fetchone()
    except psycopg.Error as exc:
        raise ServiceUnavailable(f"did not answer within {timeout:.0f} s ({exc})") from exc
    assert row is not None
    version, wal_level, is_super = row
    if wal_level != "logical":
        raise ServiceUnavailable(
            f"answers but has wal_level={wal_level}; the tests need wal_level=logical"
        )
    if superuser and not is_super:
        raise ServiceUnavailable("answers but the user of this URL is not a superuser")
    return str(version)


@contextlib.contextmanager
def _quiet_kafka_client() -> Iterator[None]:
    """Mute kafka-python's connection errors while probing: the probe reports them itself."""
    logger = logging.getLogger("kafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def probe_kafka(bootstrap: str, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
    """One metadata request (DescribeCluster); return it. Raise if no unfenced broker answers."""
    with _quiet_kafka_client():
        return _probe_kafka(bootstrap, timeout)


def _probe_kafka(bootstrap: str, timeout: float) -> dict[str, Any]:
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    ms = int(timeout * 1000)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="outbox-cdc-tests-probe",
            request_timeout_ms=ms,
            bootstrap_timeout_ms=ms,
        )
    except KafkaError as exc:
        raise ServiceUnavailable(
            f"did not answer a metadata request within {timeout:.0f} s ({exc})"
        ) from exc
    try:
        cluster: dict[str, Any] = admin.describe_cluster()
        brokers = [b for b in cluster.get("brokers") or [] if not b.get("is_fenced")]
        if not brokers:
            raise ServiceUnavailable(f"answered, but lists no unfenced broker: {cluster}")
        with contextlib.suppress(Exception):
            data = admin.get_broker_version_data(brokers[0]["broker_id"])
            cluster["version"] = ".".join(str(part) for part in data.broker_version)
        return cluster
    except KafkaError as exc:
        raise ServiceUnavailable(
            f"did not answer a metadata request within {timeout:.0f} s ({exc})"
        ) from exc
    finally:
        admin.close()


def mysql_connect_kwargs(url: str) -> dict[str, Any]:
    """pymysql.connect() keyword arguments for mysql://user:pass@host:port/db."""
    parts = urlsplit(url)
    if parts.scheme not in {"mysql", "mariadb", "mysql+pymysql"}:
        raise ValueError(f"not a mysql:// URL: {redact(url)}")
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": parts.path.lstrip("/") or None,
    }


def probe_mysql(url: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Return VERSION(); raise if it does not answer."""
    import pymysql

    try:
        conn = pymysql.connect(
            **mysql_connect_kwargs(url),
            connect_timeout=max(1, round(timeout)),
            read_timeout=round(timeout),
        )
    except pymysql.MySQLError as exc:
        raise ServiceUnavailable(f"did not answer within {timeout:.0f} s ({exc})") from exc
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    return str(row[0])


# ------------------------------------------------------------------------------------------
# Docker / testcontainers (not available on every machine; never required)
# ------------------------------------------------------------------------------------------
_docker_reason: list[str | None] = []


def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers a ping; else why not (cached)."""
    if not _docker_reason:
        _docker_reason.append(_check_docker())
    return _docker_reason[0]


def _check_docker() -> str | None:
    if truthy(os.environ.get(NO_DOCKER_ENV)):
        return f"{NO_DOCKER_ENV} is set"
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return "the docker package is not installed"
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker engine answered ({type(exc).__name__})"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(what: str, check: Callable[[], Any], timeout: float, logs: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return check()
        except Exception as exc:
            last = exc
            time.sleep(0.5)
    raise ServiceUnavailable(
        f"{what} was not ready within {timeout:.0f} s (last error: {last})\n"
        f"container log tail:\n{logs()}"
    )


def _log_tail(container: Any, lines: int = 40) -> str:
    try:
        out, err = container.get_logs()
        text = (out or b"").decode(errors="replace") + (err or b"").decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    except Exception as exc:
        return f"(no logs: {exc})"


def _put_file(container: Any, path: str, content: bytes) -> None:
    """Copy one small file into a created or running container."""
    directory, name = path.rsplit("/", 1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(content))
    container.get_wrapped_container().put_archive(directory or "/", buf.getvalue())


class Containers:
    """Containers started for this test session; all removed by stop_all()."""

    def __init__(self) -> None:
        self._started: list[Any] = []
        self._lock = threading.Lock()

    def _track(self, container: Any) -> Any:
        with self._lock:
            self._started.append(container)
        return container

    def stop_all(self) -> None:
        with self._lock:
            started, self._started = self._started, []
        for container in reversed(started):
            with contextlib.suppress(Exception):
                container.stop()

    def postgres(self) -> tuple[str, str]:
        """Start PostgreSQL 15 with wal2json; return (outbox URL, superuser URL)."""
        from testcontainers.core.container import DockerContainer

        image = os.environ.get(POSTGRES.image_env) or POSTGRES.default_image
        server = [
            "postgres",
            "-c", "wal_level=logical",
            "-c", "max_replication_slots=40",
            "-c", "max_wal_senders=40",
            "-c", "max_slot_wal_keep_size=2GB",
        ]  # fmt: skip
        if os.environ.get(POSTGRES.image_env):
            command: list[str] = server  # a custom image must bring wal2json itself
        else:
            # The official image is Debian with PostgreSQL's apt repository configured, and
            # starts as root: install wal2json, then hand over to the usual entrypoint.
            command = [
                "bash",
                "-c",
                "set -e; export DEBIAN_FRONTEND=noninteractive;"
                " apt-get update -qq >/dev/null;"
                ' apt-get install -y -qq --no-install-recommends "postgresql-$PG_MAJOR-wal2json"'
                " >/dev/null;"
                ' exec docker-entrypoint.sh "$@"',
                "bash",
                *server,
            ]
        container = (
            DockerContainer(image)
            .with_env("POSTGRES_USER", "outbox_admin")
            .with_env("POSTGRES_PASSWORD", "outbox_admin")
            .with_env("POSTGRES_DB", "outbox_test")
            .with_exposed_ports(5432)
            .with_command(command)
        )
        self._track(container.start())
        host = container.get_container_host_ip()
        port = container.get_exposed_port(5432)
        admin_url = f"postgresql://outbox_admin:outbox_admin@{host}:{port}/outbox_test"
        url = f"postgresql://outbox:outbox@{host}:{port}/outbox_test"
        # the entrypoint's first, socket-only server does not count: wait for TCP
        _wait(
            f"PostgreSQL container {image}",
            lambda: probe_postgres(admin_url, timeout=5, superuser=True),
            timeout=300,  # includes the apt-get install of wal2json
            logs=lambda: _log_tail(container),
        )
        import psycopg

        with psycopg.connect(admin_url, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'outbox'").fetchone()
            if not exists:
                conn.execute("CREATE ROLE outbox LOGIN REPLICATION CREATEDB PASSWORD 'outbox'")
            conn.execute("ALTER DATABASE outbox_test OWNER TO outbox")
            # fails here, not in the first test, if the image has no wal2json
            conn.execute(
                "SELECT pg_create_logical_replication_slot("
                "'outbox_cdc_probe_' || pg_backend_pid(), 'wal2json', true)"
            )
        return url, admin_url

    def kafka(self) -> str:
        """Start a single-node KRaft broker from the official image; return bootstrap servers."""
        from testcontainers.core.container import DockerContainer

        image = os.environ.get(KAFKA.image_env) or KAFKA.default_image
        env_file = "/tmp/outbox-cdc-kafka.env"  # a path inside the container
        # The advertised listener must name the host port that Docker maps, known only once the
        # container exists: the container waits for a file that sets it, then runs the image's
        # own start script (/etc/kafka/docker/run, which turns KAFKA_* variables into config).
        command = [
            "sh",
            "-c",
            f"while [ ! -f {env_file} ]; do sleep 0.1; done; . {env_file}; "
            "exec /etc/kafka/docker/run",
        ]
        container = DockerContainer(image).with_exposed_ports(9092).with_command(command)
        settings = {
            "CLUSTER_ID": "b3V0Ym94LWNkYy10ZXN0cw",
            "KAFKA_NODE_ID": "1",
            "KAFKA_LOG_DIRS": "/tmp/kraft-combined-logs",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:9092,CONTROLLER://localhost:9093",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
            "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
            "KAFKA_NUM_PARTITIONS": "1",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "1",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        }
        for key, value in settings.items():
            container.with_env(key, value)
        self._track(container.start())
        host = container.get_container_host_ip()
        port = container.get_exposed_port(9092)
        bootstrap = f"{host}:{port}"
        _put_file(
            container,
            env_file,
            f"export KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://{bootstrap}\n".encode(),
        )
        _wait(
            f"Kafka container {image}",
            lambda: probe_kafka(bootstrap, timeout=5),
            timeout=180,
            logs=lambda: _log_tail(container),
        )
        return bootstrap

    def mysql(self) -> str:
        """Start MariaDB; return mysql://outbox:outbox@host:port/outbox_test."""
        from testcontainers.core.container import DockerContainer

        image = os.environ.get(MYSQL.image_env) or MYSQL.default_image
        container = (
            DockerContainer(image)
            .with_env("MARIADB_ROOT_PASSWORD", "outbox_root")
            .with_env("MARIADB_DATABASE", "outbox_test")
            .with_env("MARIADB_USER", "outbox")
            .with_env("MARIADB_PASSWORD", "outbox")
            # the same variables under their MySQL names, for a mysql:* image
            .with_env("MYSQL_ROOT_PASSWORD", "outbox_root")
            .with_env("MYSQL_DATABASE", "outbox_test")
            .with_env("MYSQL_USER", "outbox")
            .with_env("MYSQL_PASSWORD", "outbox")
            .with_exposed_ports(3306)
        )
        self._track(container.start())
        host = container.get_container_host_ip()
        port = container.get_exposed_port(3306)
        url = f"mysql://outbox:outbox@{host}:{port}/outbox_test"
        _wait(
            f"MariaDB container {image}",
            lambda: probe_mysql(url, timeout=5),
            timeout=180,
            logs=lambda: _log_tail(container),
        )
        return url


# ------------------------------------------------------------------------------------------
# resolution: environment variable, else container, else unavailable
# ------------------------------------------------------------------------------------------
@dataclass
class Resolution:
    value: str | None = None
    source: str = ""  # "env" | "container" | ""
    error: str | None = None


class ServiceResolver:
    """Finds each service once per test session and remembers the answer (or the reason)."""

    def __init__(self) -> None:
        self.containers = Containers()
        self._cache: dict[str, Resolution] = {}
        self._lock = threading.Lock()

    def resolve(self, key: str) -> Resolution:
        """key: postgres | postgres_admin | kafka | mysql."""
        with self._lock:
            if key not in self._cache:
                if key in {"postgres", "postgres_admin"}:
                    self._resolve_postgres()
                else:
                    self._cache[key] = self._resolve_one(SERVICES[key])
            return self._cache[key]

    def close(self) -> None:
        self.containers.stop_all()

    # -- internals --------------------------------------------------------------------------
    def _no_service(self, service: Service, docker_reason: str) -> Resolution:
        return Resolution(
            error=(
                f"{service.label} is not available: {service.env_var} is not set and "
                f"testcontainers cannot start one ({docker_reason}). "
                f"Get the local services with `{HOW_TO_START_ALL}` "
                "(scripts/test.sh does both), then rerun pytest."
            )
        )

    def _container_failed(self, service: Service, exc: Exception) -> Resolution:
        image = os.environ.get(service.image_env) or service.default_image
        return Resolution(
            error=(
                f"{service.label}: {service.env_var} is not set, and the {image} container "
                f"did not start: {exc}. Without Docker: `{HOW_TO_START_ALL}`."
            )
        )

    def _env_failed(self, service: Service, env_var: str, value: str, exc: Exception) -> str:
        where = value if service is KAFKA else redact(value)
        return f"{service.label} at {where} ({env_var}) {exc}: {how_to_start(service)}."

    def _resolve_one(self, service: Service) -> Resolution:
        probe: Callable[[str], Any] = probe_kafka if service is KAFKA else probe_mysql
        value = os.environ.get(service.env_var, "").strip()
        if value:
            try:
                probe(value)
            except ServiceUnavailable as exc:
                return Resolution(error=self._env_failed(service, service.env_var, value, exc))
            return Resolution(value=value, source="env")
        reason = docker_unavailable_reason()
        if reason:
            return self._no_service(service, reason)
        try:
            start = self.containers.kafka if service is KAFKA else self.containers.mysql
            return Resolution(value=start(), source="container")
        except Exception as exc:
            return self._container_failed(service, exc)

    def _resolve_postgres(self) -> None:
        url = os.environ.get(POSTGRES.env_var, "").strip()
        admin_url = os.environ.get(POSTGRES_ADMIN_ENV, "").strip()
        if url or admin_url:
            self._cache["postgres"] = self._postgres_from_env(POSTGRES.env_var, url, False)
            self._cache["postgres_admin"] = self._postgres_from_env(
                POSTGRES_ADMIN_ENV, admin_url, True
            )
            return
        reason = docker_unavailable_reason()
        if reason:
            res = self._no_service(POSTGRES, reason)
            self._cache["postgres"] = self._cache["postgres_admin"] = res
            return
        try:
            url, admin_url = self.containers.postgres()
        except Exception as exc:
            res = self._container_failed(POSTGRES, exc)
            self._cache["postgres"] = self._cache["postgres_admin"] = res
            return
        self._cache["postgres"] = Resolution(value=url, source="container")
        self._cache["postgres_admin"] = Resolution(value=admin_url, source="container")

    def _postgres_from_env(self, env_var: str, value: str, superuser: bool) -> Resolution:
        if not value:
            return Resolution(
                error=(
                    f"PostgreSQL: {env_var} is not set (set both {POSTGRES.env_var} and "
                    f"{POSTGRES_ADMIN_ENV}; `{HOW_TO_START_ALL}` writes them)."
                )
            )
        try:
            probe_postgres(value, superuser=superuser)
        except ServiceUnavailable as exc:
            return Resolution(error=self._env_failed(POSTGRES, env_var, value, exc))
        return Resolution(value=value, source="env")


# ------------------------------------------------------------------------------------------
# fault injection through scripts/services.sh
# ------------------------------------------------------------------------------------------
class ServiceControlUnavailable(Exception):
    pass


def run_services_script(command: str, name: str, timeout: float = 300.0) -> str:
    """Run `$OUTBOX_CDC_TEST_SERVICES_SCRIPT command name`; return its output."""
    if name not in SERVICES:
        raise ValueError(f"unknown service {name!r}; expected one of {sorted(SERVICES)}")
    service = SERVICES[name]
    script = os.environ.get(SERVICES_SCRIPT_ENV, "").strip()
    if not script:
        raise ServiceControlUnavailable(
            f"cannot {command} {service.label}: {SERVICES_SCRIPT_ENV} is not set. Fault injection "
            f"needs the local services: `{HOW_TO_START_ALL}`."
        )
    if not os.environ.get(service.env_var):
        raise ServiceControlUnavailable(
            f"cannot {command} {service.label}: {service.env_var} is not set, so the tests do not "
            f"use the service that {script} controls (a testcontainer cannot be stopped and "
            f"started on the same port). Use the local services: `{HOW_TO_START_ALL}`."
        )
    proc = subprocess.run(
        [script, command, name],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise RuntimeError(f"`{script} {command} {name}` exited {proc.returncode}:\n{output}")
    return output


class ServiceControl:
    """Stops and starts the local services through ``$OUTBOX_CDC_TEST_SERVICES_SCRIPT``
    (scripts/services.sh) for fault injection. ``start`` and ``restart`` return once the service
    answers again; each returns the script's output. A failing script raises RuntimeError.

    When the tests do not use the script's services (variable unset, testcontainers), the call
    goes to ``on_unavailable(message)``, which skips or fails the test (it must raise).
    """

    names = tuple(SERVICES)

    def __init__(self, on_unavailable: Callable[[str], NoReturn]) -> None:
        self._on_unavailable = on_unavailable

    def stop(self, name: str) -> str:
        return self._run("stop", name)

    def start(self, name: str) -> str:
        return self._run("start", name)

    def restart(self, name: str) -> str:
        return self._run("restart", name)

    def _run(self, command: str, name: str) -> str:
        try:
            return run_services_script(command, name)
        except ServiceControlUnavailable as exc:
            self._on_unavailable(str(exc))


# ------------------------------------------------------------------------------------------
# versions for the pytest report header (never raises)
# ------------------------------------------------------------------------------------------
def _wal2json_package_version() -> str | None:
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "postgresql-15-wal2json"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _describe_postgres(url: str, timeout: float) -> str:
    import psycopg

    with psycopg.connect(url, connect_timeout=max(1, round(timeout)), autocommit=True) as conn:
        version, wal_level = conn.execute(
            "SELECT current_setting('server_version'), current_setting('wal_level')"
        ).fetchone() or ("?", "?")
        try:
            conn.execute("SET statement_timeout = '3s'")
            conn.execute(
                "SELECT pg_create_logical_replication_slot("
                "'outbox_cdc_header_' || pg_backend_pid(), 'wal2json', true)"
            )
            wal2json = "wal2json loads"
        except psycopg.errors.QueryCanceled:
            wal2json = "wal2json not checked (slot creation waited on an open transaction)"
        except psycopg.Error as exc:
            wal2json = f"wal2json NOT usable ({str(exc).strip().splitlines()[0]})"
    package = _wal2json_package_version()
    if package:
        wal2json = f"{wal2json} (package {package})"
    return f"PostgreSQL {version}, wal_level={wal_level}, {wal2json}"


def describe_services(timeout: float = 3.0) -> list[str]:
    """One line per service, from the environment variables only (starts no container)."""
    lines: list[str] = []
    describers: list[tuple[Service, Callable[[str], str]]] = [
        (POSTGRES, lambda url: _describe_postgres(url, timeout)),
        (KAFKA, lambda b: "Apache Kafka "
            + str(probe_kafka(b, timeout).get("version", "?"))
            + ".x (as its ApiVersions tell)"),
        (MYSQL, lambda url: f"server {probe_mysql(url, timeout)}"),
    ]  # fmt: skip
    for service, describe in describers:
        value = os.environ.get(service.env_var, "").strip()
        if not value:
            docker = "testcontainers" if docker_unavailable_reason() is None else "unavailable"
            lines.append(f"{service.name}: {service.env_var} not set ({docker})")
            continue
        where = value if service is KAFKA else redact(value)
        try:
            lines.append(f"{service.name}: {where}: {describe(value)}")
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            lines.append(f"{service.name}: {where}: NOT ANSWERING ({first})")
    return lines


# ------------------------------------------------------------------------------------------
# TLS and SASL endpoints (scripts/services.sh only: no container provides them)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SecureEndpoints:
    """What ``scripts/services.sh up`` sets up for the TLS/SASL tests (its ``.services.env``).

    * ``postgres_tls_url``: role outbox_tls (TLS only, member of the test role), ``localhost``,
      ``sslmode=verify-full&sslrootcert=<ca_file>``;
    * ``kafka_sasl_bootstrap``: SASL_SSL listener, PLAIN and SCRAM-SHA-512 for
      ``kafka_sasl_username``; ``kafka_mtls_bootstrap``: SSL listener requiring a client
      certificate the CA signed (``client_cert_file``, ``client_key_file``);
    * ``other_ca_file``: a CA that signed none of the servers' certificates.

    The brokers' certificate is the servers' one, for ``localhost`` and ``127.0.0.1``.
    """

    ca_file: str
    other_ca_file: str
    client_cert_file: str
    client_key_file: str
    postgres_tls_url: str
    kafka_sasl_bootstrap: str
    kafka_sasl_username: str
    kafka_sasl_password: str
    kafka_mtls_bootstrap: str


SECURE_ENV = {
    "ca_file": "OUTBOX_CDC_TEST_CA_FILE",
    "other_ca_file": "OUTBOX_CDC_TEST_OTHER_CA_FILE",
    "client_cert_file": "OUTBOX_CDC_TEST_CLIENT_CERT_FILE",
    "client_key_file": "OUTBOX_CDC_TEST_CLIENT_KEY_FILE",
    "postgres_tls_url": "OUTBOX_CDC_TEST_POSTGRES_TLS_URL",
    "kafka_sasl_bootstrap": "OUTBOX_CDC_TEST_KAFKA_SASL_BOOTSTRAP_SERVERS",
    "kafka_sasl_username": "OUTBOX_CDC_TEST_KAFKA_SASL_USERNAME",
    "kafka_sasl_password": "OUTBOX_CDC_TEST_KAFKA_SASL_PASSWORD",
    "kafka_mtls_bootstrap": "OUTBOX_CDC_TEST_KAFKA_MTLS_BOOTSTRAP_SERVERS",
}
_SECURE_HOW = (
    "the TLS/SASL endpoints come from scripts/services.sh only (no testcontainer provides "
    f"them): `{HOW_TO_START_ALL}`"
)


def _port_answers(hostport: str, timeout: float) -> bool:
    host, _, port = hostport.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def secure_endpoints(timeout: float = 5.0, wait: float = 60.0) -> SecureEndpoints:
    """The TLS/SASL endpoints of the environment, checked: the files exist, PostgreSQL answers
    over verify-full TLS (``pg_stat_ssl``), the Kafka listeners accept connections (within
    ``wait`` seconds). Raises ServiceUnavailable saying what is missing and how to get it."""
    import psycopg

    values: dict[str, str] = {}
    missing = []
    for attr, env_var in SECURE_ENV.items():
        value = os.environ.get(env_var, "").strip()
        if value:
            values[attr] = value
        else:
            missing.append(env_var)
    if missing:
        raise ServiceUnavailable(f"{', '.join(missing)} not set: {_SECURE_HOW}")
    found = SecureEndpoints(**values)
    for attr in ("ca_file", "other_ca_file", "client_cert_file", "client_key_file"):
        if not Path(values[attr]).is_file():
            raise ServiceUnavailable(
                f"{SECURE_ENV[attr]}={values[attr]}: no such file; {_SECURE_HOW}"
            )
    try:
        with psycopg.connect(
            found.postgres_tls_url, connect_timeout=max(1, round(timeout))
        ) as conn:
            row = conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).fetchone()
    except psycopg.Error as exc:
        raise ServiceUnavailable(
            f"PostgreSQL over TLS ({redact(found.postgres_tls_url)}, verify-full) did not answer: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; "
            f"{_SECURE_HOW}"
        ) from exc
    if not row or row[0] is not True:
        raise ServiceUnavailable(f"PostgreSQL answered without TLS: {_SECURE_HOW}")
    for attr in ("kafka_sasl_bootstrap", "kafka_mtls_bootstrap"):
        # a fault-injection test may be restarting the broker: give it time to come back
        deadline = time.monotonic() + wait
        while not _port_answers(values[attr], timeout) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not _port_answers(values[attr], timeout):
            raise ServiceUnavailable(
                f"Kafka listener {values[attr]} ({SECURE_ENV[attr]}) refuses connections; "
                f"{_SECURE_HOW}"
            )
    return found
