"""No secret in anything the relay prints or serves.

A role (PostgreSQL) and a user (MariaDB) are created for the test with a distinctive random
password; ``OUTBOX_CDC_KAFKA_SASL_PASSWORD`` holds another one (the test broker has no SASL: the
relay runs with PLAINTEXT, and once with SASL_PLAINTEXT against the plaintext broker, so the
secret is in the producer's and the probe's configuration). Then the relay and the CLI are made
to talk about their connections as much as possible:

* a relay that works, with ``log_level=DEBUG``, ``log_format=json`` and ``http_port``: its
  output and ``/metrics``, ``/healthz``, ``/readyz``;
* relays with a wrong password (authentication failure), a closed port (connection refused),
  an unknown table, Kafka unreachable (bootstrap on a closed port), SASL against a PLAINTEXT
  broker, invalid settings (a bad value, a bad port in the URL);
* ``status``, ``status --json``, ``check``, ``check --json``, ``recover --dry-run`` with the
  good URL, the wrong password and the closed port.

With TLS and SASL (``secure_endpoints``, from ``scripts/services.sh``): the relay over
``sslmode=verify-full`` with a role of distinctive password, to Kafka over SASL_SSL with a SCRAM
user created for the test (distinctive password) and the broker's PLAIN user, both clients
(exactly once on kafka-python), and failing relays (wrong SASL passwords, an untrusted broker,
a CA that did not sign PostgreSQL's certificate, a host name it does not name, a wrong database
password) with their endpoints, plus the CLI (``check`` with a wrong SASL password too).

Everything printed (stdout, stderr) and served is searched for each secret, raw and in its
URL-encoded forms (the passwords hold characters that URLs encode). The database servers are
shared: they are never stopped here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from outbox_cdc import Outbox
from tests.acceptance.harness import MariaDatabase, RelayProcess, read_topic, relay_env
from tests.support.postgres import drop_replication_slot
from tests.support.services import SecureEndpoints, truthy

CLOSED_PORT = 1  # nothing listens on port 1 of 127.0.0.1: connection refused


def distinctive(tag: str) -> str:
    """A password no output contains by chance, with characters a URL must encode."""
    return f"{tag}{secrets.token_hex(10)}@/%:#?"


def url_with(url: str, user: str, pw: str, *, port: int | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(pw, safe='')}@{parts.hostname or '127.0.0.1'}"
    netloc += f":{port or parts.port}" if (port or parts.port) else ""
    return urlunsplit(parts._replace(netloc=netloc))


def forms(secret: str) -> set[str]:
    core = re.sub(r"[^0-9A-Za-z]", "", secret)  # the random part alone catches any encoding
    return {secret, quote(secret, safe=""), quote(secret), quote_plus(secret), core}


@dataclass
class Transcript:
    """Everything printed and served, labelled by where it came from."""

    parts: list[tuple[str, str]] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        self.parts.append((label, text))

    def leaks(self, secrets_: dict[str, str]) -> list[str]:
        found = []
        for name, secret in secrets_.items():
            needles = forms(secret)
            for label, text in self.parts:
                for line in text.splitlines():
                    if any(n in line for n in needles):
                        found.append(f"{name} in {label}: {line}")
        return found

    def size(self) -> int:
        return sum(len(t) for _, t in self.parts)


def cli(*args: str, env: dict[str, str]) -> tuple[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_CDC_")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "outbox_cdc.cli", *args],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # what it printed still counts
        out = (exc.stdout or b"") + (exc.stderr or b"")
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        return "outbox-cdc " + " ".join(args) + " (timed out)", text
    label = "outbox-cdc " + " ".join(args) + f" (exit {proc.returncode})"
    return label, proc.stdout + proc.stderr


def run_clis(transcript: Transcript, calls: list[tuple[tuple[str, ...], dict[str, str]]]) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        for label, text in pool.map(lambda c: cli(*c[0], env=c[1]), calls):
            transcript.add(label, text)


def scrape(port: int) -> list[tuple[str, str]]:
    out = []
    for path in ("/metrics", "/healthz", "/readyz"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                body = resp.read().decode()
        except urllib.error.HTTPError as exc:  # 503: unready, with a body saying why
            body = exc.read().decode()
        out.append((f"GET {path}", body))
    return out


def serving_port(relay: RelayProcess) -> int:
    m = relay.wait_for_log(r"serving /metrics, /healthz and /readyz on [^:\"]+:(\d+)", 15)
    return int(m.group(1))


GENERIC_ERROR = r"\b(ERROR|WARNING)\b|\"level\": \"(ERROR|WARNING)\""


def start_relays(relays: dict[str, tuple[RelayProcess, str]]) -> None:
    for r, _ in relays.values():
        r.start()


def finish_relays(
    relays: dict[str, tuple[RelayProcess, str]], transcript: Transcript, timeout: float = 30.0
) -> None:
    """Wait until each relay logged its error (its pattern) or exited, then stop them all.
    A relay that logged nothing of the kind fails the test: it would prove nothing."""
    deadline = time.monotonic() + timeout
    silent = []
    for label, (r, pattern) in relays.items():
        regex = re.compile(pattern)
        while not regex.search(r.log_text()) and r.running and time.monotonic() < deadline:
            time.sleep(0.1)
        if not regex.search(r.log_text()):
            silent.append(f"{label} (exit {r.returncode}): {r.log_text()[-1500:]}")
    for r, _ in relays.values():
        if r.running:
            r.terminate()
    for label, (r, _) in relays.items():
        r.stop(timeout=10)
        transcript.add(f"relay {label}", r.all_logs())
    assert not silent, "relays that did not log their error:\n" + "\n".join(silent)


def assert_no_leak(transcript: Transcript, secrets_: dict[str, str]) -> None:
    for secret in secrets_.values():  # the search itself finds an encoded secret
        planted = Transcript([("planted", "x " + quote(secret, safe="") + " y")])
        assert planted.leaks({"s": secret})
    leaks = transcript.leaks(secrets_)
    assert not leaks, "secrets printed or served:\n" + "\n".join(leaks)
    assert transcript.size() > 2000, "too little output to be a meaningful check"


def _services_required(config: pytest.Config) -> bool:
    return bool(config.getoption("--require-services")) or truthy(os.environ.get("CI"))


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def pg_secret_role(postgres_admin_url: str, postgres_url: str) -> Iterator[tuple[str, str]]:
    """(role, password): LOGIN REPLICATION, a member of the test role (so it may use its
    tables). Dropped at teardown, after ending its sessions."""
    role = f"sec_{uuid.uuid4().hex[:12]}"
    pw = distinctive("PgSecret")
    owner = urlsplit(postgres_url).username
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(pw)
            )
        )
        conn.execute(f"GRANT {owner} TO {role}")
    try:
        yield role, pw
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            for _ in range(50):
                try:
                    conn.execute(f"DROP ROLE IF EXISTS {role}")
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.1)


def test_postgres_relay_and_cli_print_and_serve_no_secret(
    pg_secret_role: tuple[str, str],
    postgres_url: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    replication_slot: str,
    kafka_topic: str,
    tmp_path: Path,
) -> None:
    role, pw = pg_secret_role
    sasl = distinctive("SaslSecret")
    wrong = distinctive("WrongSecret")
    secrets_ = {"database password": pw, "SASL password": sasl, "wrong password": wrong}
    good_url = url_with(postgres_url, role, pw)
    wrong_pw_url = url_with(postgres_url, role, wrong)
    refused_url = url_with(postgres_url, role, pw, port=CLOSED_PORT)
    base = {
        "kafka_sasl_password": sasl,
        "log_level": "DEBUG",
        "kafka_max_block_ms": 2000,
        "shutdown_timeout": 2,
    }
    transcript = Transcript()

    def env(url: str, slot: str = replication_slot, **extra: object) -> dict[str, str]:
        return relay_env(
            database_url=url,
            bootstrap=extra.pop("bootstrap", kafka_bootstrap),  # type: ignore[arg-type]
            table=extra.pop("table", outbox_table),  # type: ignore[arg-type]
            slot=slot,
            **{**base, **extra},
        )

    # 1. a working relay: DEBUG, JSON logs, the HTTP endpoints, an event delivered
    relay = RelayProcess(env(good_url, log_format="json", http_port=0), tmp_path, "good")
    relay.start()
    other_slot = f"sec_slot_{uuid.uuid4().hex[:12]}"
    try:
        port = serving_port(relay)
        relay.wait_for_log(r"streaming from", 15)
        with psycopg.connect(good_url) as conn:
            event_id = str(
                Outbox(outbox_table, capture_trace_context=False).publish(
                    conn, topic=kafka_topic, type="sec.test", payload=b"x", key="k"
                )
            )
            conn.commit()
        records = read_topic(kafka_bootstrap, kafka_topic, expect_ids=[event_id], timeout=15)
        assert records, "the event was not delivered"
        for label, body in scrape(port):
            transcript.add(label, body)
        assert "outbox_cdc_" in transcript.parts[0][1]

        # 2. while it streams: failing relays and the CLI, all at once
        sasl_env = env(
            good_url,
            slot=other_slot,
            kafka_security_protocol="SASL_PLAINTEXT",
            kafka_sasl_mechanism="PLAIN",
            kafka_sasl_username="relay",
            create_slot="false",
        )
        failing = {
            "wrong password": (
                RelayProcess(env(wrong_pw_url), tmp_path, "wrong-pw"),
                "password authentication failed",
            ),
            "connection refused": (
                RelayProcess(env(refused_url), tmp_path, "refused"),
                "[Cc]onnection refused",
            ),
            "unknown table (polling)": (
                RelayProcess(
                    env(good_url, mode="polling", table=f"public.nosuch_{uuid.uuid4().hex[:8]}"),
                    tmp_path,
                    "no-table",
                ),
                "does not exist",
            ),
            "slot in use (standby)": (
                RelayProcess(env(good_url, log_format="json"), tmp_path, "standby"),
                "standby",
            ),
            "Kafka unreachable": (
                RelayProcess(
                    env(
                        good_url,
                        slot=other_slot,
                        bootstrap=f"127.0.0.1:{CLOSED_PORT}",
                        create_slot="false",
                    ),
                    tmp_path,
                    "no-kafka",
                ),
                GENERIC_ERROR,
            ),
            "SASL against PLAINTEXT": (RelayProcess(sasl_env, tmp_path, "sasl"), GENERIC_ERROR),
            "URL with an invalid port": (
                RelayProcess(
                    env(good_url.replace(f":{urlsplit(postgres_url).port}/", ":x/", 1)),
                    tmp_path,
                    "bad-port",
                ),
                GENERIC_ERROR + "|invalid",
            ),
        }
        invalid = [
            env(good_url, kafka_linger_ms="not-a-number"),
            env(good_url.replace("postgresql://", "postgresqlx://", 1)),
            env(good_url, http_port="99999", kafka_max_in_flight_requests="9"),
        ]
        calls: list[tuple[tuple[str, ...], dict[str, str]]] = [(("start",), e) for e in invalid]
        for url in (good_url, wrong_pw_url, refused_url):
            e = env(url)
            calls += [(("status", "--json"), e), (("check",), e), (("recover", "--dry-run"), e)]
            if url == good_url:
                calls += [(("status",), e), (("check", "--json"), e)]
        calls.append((("status", "--mode", "polling"), env(good_url, table="public.nosuch")))
        calls.append((("check", "--mode", "polling"), env(good_url, table="public.nosuch")))
        start_relays(failing)
        run_clis(transcript, calls)
        finish_relays(failing, transcript)
        for label, body in scrape(port):
            transcript.add(label + " (later)", body)
    finally:
        relay.stop(timeout=20)
        transcript.add("relay good", relay.all_logs())
        drop_replication_slot(postgres_admin_url, other_slot)

    text = "\n".join(t for _, t in transcript.parts)
    # the errors were provoked (else the check proves little)
    assert "password authentication failed" in text, text[-3000:]
    assert "Connection refused" in text or "connection refused" in text, text[-3000:]
    assert "invalid settings" in text
    for line in relay.log_text().splitlines():
        if line.strip():
            json.loads(line)  # log_format=json: one object per line
    assert_no_leak(transcript, secrets_)


# -- MariaDB -------------------------------------------------------------------------------------


def mysql_root(sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mysql", "--protocol=socket", "-uroot", "-N", "-B", "-e", sql],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def mysql_secret_user(
    request: pytest.FixtureRequest, mysql_url: str
) -> Iterator[tuple[str, str, str]]:
    """(user, password, table): a user with SELECT, INSERT, UPDATE, DELETE on a new outbox
    table, created by root over the Unix socket; dropped at teardown."""
    try:
        ok = mysql_root("SELECT 1").returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        message = "MariaDB: no root access over the Unix socket to create users"
        if _services_required(request.config):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    tag = uuid.uuid4().hex[:12]
    user, table = f"sec_{tag}", f"sec_outbox_{tag}"
    pw = distinctive("MySecret")
    database = urlsplit(mysql_url).path.lstrip("/")
    db = MariaDatabase(mysql_url)
    db.create_table(table)
    hosts = ("localhost", "127.0.0.1")
    literal = "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"
    sql = "".join(
        f"CREATE USER '{user}'@'{h}' IDENTIFIED BY {literal};"
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {database}.{table} TO '{user}'@'{h}';"
        for h in hosts
    )
    try:
        done = mysql_root(sql)
        assert done.returncode == 0, done.stderr
        yield user, pw, table
    finally:
        mysql_root("".join(f"DROP USER IF EXISTS '{user}'@'{h}';" for h in hosts))
        db.drop_table(table)


def test_mariadb_polling_relay_and_cli_print_and_serve_no_secret(
    mysql_secret_user: tuple[str, str, str],
    mysql_url: str,
    kafka_bootstrap: str,
    kafka_topic: str,
    tmp_path: Path,
) -> None:
    user, pw, table = mysql_secret_user
    sasl = distinctive("SaslSecret")
    wrong = distinctive("WrongSecret")
    secrets_ = {"database password": pw, "SASL password": sasl, "wrong password": wrong}
    good_url = url_with(mysql_url, user, pw)
    transcript = Transcript()

    def env(url: str, **extra: object) -> dict[str, str]:
        return relay_env(
            database_url=url,
            bootstrap=extra.pop("bootstrap", kafka_bootstrap),  # type: ignore[arg-type]
            table=extra.pop("table", table),  # type: ignore[arg-type]
            slot="unused",
            **{
                "kafka_sasl_password": sasl,
                "log_level": "DEBUG",
                "kafka_max_block_ms": 2000,
                "shutdown_timeout": 2,
                **extra,
            },
        )

    relay = RelayProcess(env(good_url, log_format="json", http_port=0), tmp_path, "good")
    relay.start()
    try:
        port = serving_port(relay)
        db = MariaDatabase(good_url)
        conn = db.connect()
        try:
            event_id = str(
                Outbox(table, capture_trace_context=False).publish(
                    conn, topic=kafka_topic, type="sec.test", payload=b"x", key="k"
                )
            )
            conn.commit()
        finally:
            conn.close()
        records = read_topic(kafka_bootstrap, kafka_topic, expect_ids=[event_id], timeout=15)
        assert records, "the event was not delivered"
        for label, body in scrape(port):
            transcript.add(label, body)

        failing = {
            "wrong password": (
                RelayProcess(env(url_with(mysql_url, user, wrong)), tmp_path, "wp"),
                "Access denied",
            ),
            "connection refused": (
                RelayProcess(
                    env(url_with(mysql_url, user, pw, port=CLOSED_PORT)), tmp_path, "refused"
                ),
                GENERIC_ERROR,
            ),
            "unknown table": (
                RelayProcess(
                    env(good_url, table=f"nosuch_{uuid.uuid4().hex[:8]}"), tmp_path, "no-table"
                ),
                "exist",
            ),
            "lock held (standby)": (
                RelayProcess(env(good_url, log_format="json"), tmp_path, "sb"),
                "standby",
            ),
            "Kafka unreachable": (
                RelayProcess(
                    env(good_url, bootstrap=f"127.0.0.1:{CLOSED_PORT}", table=f"nosuch_{user}"),
                    tmp_path,
                    "no-kafka",
                ),
                GENERIC_ERROR,
            ),
        }
        calls: list[tuple[tuple[str, ...], dict[str, str]]] = [
            (("start",), env(good_url, kafka_linger_ms="not-a-number")),
            (("start",), env(good_url, mode="wal")),
        ]
        for url in (
            good_url,
            url_with(mysql_url, user, wrong),
            url_with(mysql_url, user, pw, port=CLOSED_PORT),
        ):
            e = env(url)
            calls += [(("status", "--json"), e), (("check",), e)]
            if url == good_url:
                calls += [(("status",), e), (("check", "--json"), e), (("recover", "--dry-run"), e)]
        start_relays(failing)
        run_clis(transcript, calls)
        finish_relays(failing, transcript)
        for label, body in scrape(port):
            transcript.add(label + " (later)", body)
    finally:
        relay.stop(timeout=20)
        transcript.add("relay good", relay.all_logs())

    text = "\n".join(t for _, t in transcript.parts)
    assert "Access denied" in text, text[-3000:]
    assert "invalid settings" in text
    assert_no_leak(transcript, secrets_)


# -- TLS (PostgreSQL verify-full) and SASL_SSL (Kafka) -------------------------------------------


@pytest.fixture
def kafka_scram_user(kafka_bootstrap: str) -> Iterator[tuple[str, str]]:
    """(user, password): a SCRAM-SHA-512 user of the test broker with a distinctive password,
    added over the plaintext listener (no authorizer); deleted at teardown."""
    from kafka.admin import (
        KafkaAdminClient,
        UserScramCredentialDeletion,
        UserScramCredentialUpsertion,
    )

    user, pw = f"sec_{uuid.uuid4().hex[:12]}", distinctive("ScramSecret")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="outbox-cdc-tests")
    try:
        errors = admin.alter_user_scram_credentials(
            [UserScramCredentialUpsertion(user, "SCRAM-SHA-512", pw)]
        )
        assert not any(errors.values()), errors
        yield user, pw
    finally:
        try:
            admin.alter_user_scram_credentials([UserScramCredentialDeletion(user, "SCRAM-SHA-512")])
        finally:
            admin.close()


def scrape_when_probed(port: int, timeout: float = 15.0) -> list[tuple[str, str]]:
    """The endpoints, once /readyz reports a Kafka probe (ok or its error)."""
    deadline = time.monotonic() + timeout
    while True:
        out = scrape(port)
        if '"not probed yet"' not in out[2][1] or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


def test_tls_and_sasl_relays_and_cli_print_and_serve_no_secret(
    secure_endpoints: SecureEndpoints,
    pg_secret_role: tuple[str, str],
    kafka_scram_user: tuple[str, str],
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
    tmp_path: Path,
) -> None:
    """With TLS to PostgreSQL (verify-full, a role with a distinctive password) and SASL_SSL to
    Kafka (a SCRAM user with a distinctive password, and the broker's PLAIN user): working relays
    on both clients (exactly once on kafka-python), failing ones (wrong SASL passwords, an
    untrusted broker, a wrong CA and a wrong host name for PostgreSQL, a wrong database
    password), their endpoints, and the CLI print and serve no secret."""
    ep = secure_endpoints
    role, pg_pw = pg_secret_role
    scram_user, scram_pw = kafka_scram_user
    wrong_sasl = distinctive("WrongSasl")
    wrong_pg = distinctive("WrongPg")
    secrets_ = {
        "database password": pg_pw,
        "SCRAM password": scram_pw,
        "PLAIN password": ep.kafka_sasl_password,
        "wrong SASL password": wrong_sasl,
        "wrong database password": wrong_pg,
    }
    good_url = url_with(ep.postgres_tls_url, role, pg_pw)
    parts = urlsplit(good_url)
    wrong_host_url = (
        urlunsplit(parts._replace(netloc=parts.netloc.replace("@localhost:", "@wronghost:")))
        + "&hostaddr=127.0.0.1"
    )
    wrong_ca_url = good_url.replace(ep.ca_file, ep.other_ca_file)
    assert wrong_ca_url != good_url and "wronghost" in wrong_host_url
    scram = {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": scram_user,
        "kafka_sasl_password": scram_pw,
        "kafka_ssl_cafile": ep.ca_file,
    }
    plain = {
        **scram,
        "kafka_sasl_mechanism": "PLAIN",
        "kafka_sasl_username": ep.kafka_sasl_username,
        "kafka_sasl_password": ep.kafka_sasl_password,
        "kafka_client": "confluent",
    }
    transcript = Transcript()
    slots: list[str] = []

    def env(url: str = good_url, kafka: dict[str, str] = scram, **extra: object) -> dict[str, str]:
        slot = f"sec_tls_{uuid.uuid4().hex[:12]}"
        slots.append(slot)
        return relay_env(
            database_url=url,
            bootstrap=ep.kafka_sasl_bootstrap,
            table=outbox_table,
            slot=slot,
            **{
                **kafka,
                "log_level": "DEBUG",
                "kafka_max_block_ms": 3000,
                "shutdown_timeout": 2,
                "http_port": 0,
                **extra,
            },
        )

    good = {
        "kafka-python, SCRAM, exactly once, JSON": RelayProcess(
            env(log_format="json", exactly_once="true", progress_topic=f"{kafka_topic}_p"),
            tmp_path,
            "good-kp",
        ),
        "confluent, PLAIN": RelayProcess(env(kafka=plain), tmp_path, "good-cf"),
    }
    try:
        for r in good.values():
            r.start()
        ports = {label: serving_port(r) for label, r in good.items()}
        for r in good.values():
            r.wait_for_log(r"streaming from", 30)
        with psycopg.connect(good_url) as conn:
            event_id = str(
                Outbox(outbox_table, capture_trace_context=False).publish(
                    conn, topic=kafka_topic, type="sec.tls", payload=b"x", key="k"
                )
            )
            conn.commit()
        records = read_topic(kafka_bootstrap, kafka_topic, expect_ids=[event_id], timeout=20)
        assert records, "the event was not delivered"
        for label, port in ports.items():
            for path, body in scrape_when_probed(port):
                transcript.add(f"{label}: {path}", body)
                if path == "GET /readyz":
                    assert '"kafka": "ok"' in body, body

        failing_envs = {
            "kafka-python, wrong SCRAM password": (
                env(kafka={**scram, "kafka_sasl_password": wrong_sasl}, log_format="json"),
                "kafka_sasl_password",
            ),
            "confluent, wrong PLAIN password": (
                env(kafka={**plain, "kafka_sasl_password": wrong_sasl}),
                "kafka_sasl_password",
            ),
            "kafka-python, untrusted broker": (
                env(kafka={**scram, "kafka_ssl_cafile": ep.other_ca_file}),
                "kafka_ssl_cafile",
            ),
            "confluent, untrusted broker": (
                env(kafka={**plain, "kafka_ssl_cafile": ep.other_ca_file}, log_format="json"),
                "kafka_ssl_cafile",
            ),
            "PostgreSQL, wrong CA": (env(wrong_ca_url), "certificate verify failed"),
            "PostgreSQL, wrong host name": (env(wrong_host_url), "does not match host name"),
            "PostgreSQL, wrong password": (
                env(url_with(ep.postgres_tls_url, role, wrong_pg)),
                "password authentication failed",
            ),
        }
        failing = {
            label: (RelayProcess(e, tmp_path, f"fail{i}"), pattern)
            for i, (label, (e, pattern)) in enumerate(failing_envs.items())
        }
        check = env(create_slot="false")
        wrong_check = env(kafka={**plain, "kafka_sasl_password": wrong_sasl})
        bootstrap = ("--kafka-bootstrap-servers", ep.kafka_sasl_bootstrap)
        calls: list[tuple[tuple[str, ...], dict[str, str]]] = [
            (("status",), check),
            (("status", "--json"), check),
            (("check", *bootstrap), check),
            (("check", "--json", *bootstrap), check),
            (("check", *bootstrap), wrong_check),
            (("recover", "--dry-run"), check),
            (("status",), env(wrong_ca_url)),
            (("start",), env(kafka={**scram, "kafka_sasl_mechanism": ""})),  # invalid
            (("start",), {**env(), "OUTBOX_CDC_KAFKA_SASL_USERNAME": ""}),
        ]
        start_relays(failing)
        failing_ports = {label: serving_port(r) for label, (r, _) in failing.items()}
        run_clis(transcript, calls)
        for label, (r, pattern) in failing.items():
            r.wait_for_log(pattern, 30)
            for path, body in scrape_when_probed(failing_ports[label]):
                transcript.add(f"{label}: {path}", body)
        finish_relays(failing, transcript)
    finally:
        for label, r in good.items():
            r.stop(timeout=20)
            transcript.add(f"relay {label}", r.all_logs())
        for slot in slots:
            drop_replication_slot(postgres_admin_url, slot)

    text = "\n".join(t for _, t in transcript.parts)
    for provoked in (
        "kafka_sasl_password",
        "kafka_ssl_cafile",
        "certificate verify failed",
        'does not match host name "wronghost"',
        "password authentication failed",
        "invalid settings",
        "[FAIL] kafka reachable",
        "[ok  ] kafka reachable",
    ):
        assert provoked in text, f"{provoked!r} not provoked:\n{text[-4000:]}"
    assert_no_leak(transcript, secrets_)
