"""TLS to PostgreSQL (``sslmode=verify-full``) and SASL/TLS to Kafka, end to end, with the local
CA of ``scripts/services.sh`` (fixture ``secure_endpoints``; no testcontainer provides them).

* The WAL relay streams over ``verify-full`` TLS as ``outbox_tls`` (a role the server only lets
  in over TLS), and the server's ``pg_stat_ssl`` shows TLS on the walsender and on every other
  connection of the relay; the events go to Kafka over SASL_SSL (PLAIN, SCRAM-SHA-512) or mutual
  TLS, with both clients, at least once and exactly once; ``/readyz`` is 200 (its Kafka probe
  connects with the same settings); ``check`` reaches Kafka with them.
* A CA that did not sign the server's certificate, and a host name the certificate does not
  name, are refused: the relay says why and never streams (no slot is created).
* A wrong SASL password and an untrusted broker certificate: the relay says which setting to
  fix, delivers nothing, ``/readyz`` is 503 with the same reason; never the password.

What is delivered is read back over the plaintext listener of the same broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from outbox_cdc import Outbox
from tests.acceptance.harness import RelayProcess, read_topic, relay_env
from tests.support.kafka import delete_topic
from tests.support.services import SecureEndpoints

EVENTS = 25
KAFKA = frozenset(  # the security settings, which kafka_settings() sets
    {
        "kafka_security_protocol",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_cafile",
        "kafka_ssl_certfile",
        "kafka_ssl_keyfile",
    }
)


@dataclass(frozen=True)
class KafkaCase:
    client: str  # kafka-python | confluent
    auth: str  # PLAIN | SCRAM-SHA-512 | mTLS
    exactly_once: bool

    @property
    def id(self) -> str:
        return f"{self.client}-{self.auth}-{'eo' if self.exactly_once else 'alo'}"


CASES = [
    KafkaCase("kafka-python", "PLAIN", False),
    KafkaCase("kafka-python", "SCRAM-SHA-512", True),
    KafkaCase("confluent", "PLAIN", True),
    KafkaCase("confluent", "SCRAM-SHA-512", False),
    KafkaCase("kafka-python", "mTLS", False),
    KafkaCase("confluent", "mTLS", True),
]


def kafka_settings(ep: SecureEndpoints, auth: str, **override: str) -> dict[str, str]:
    """Relay settings (by name) of the secured Kafka listener for ``auth``."""
    if auth == "mTLS":
        settings = {
            "kafka_bootstrap_servers": ep.kafka_mtls_bootstrap,
            "kafka_security_protocol": "SSL",
            "kafka_ssl_cafile": ep.ca_file,
            "kafka_ssl_certfile": ep.client_cert_file,
            "kafka_ssl_keyfile": ep.client_key_file,
        }
    else:
        settings = {
            "kafka_bootstrap_servers": ep.kafka_sasl_bootstrap,
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": auth,
            "kafka_sasl_username": ep.kafka_sasl_username,
            "kafka_sasl_password": ep.kafka_sasl_password,
            "kafka_ssl_cafile": ep.ca_file,
        }
    return {**settings, **override}


def env_for(
    ep: SecureEndpoints, table: str, slot: str, auth: str, **settings: object
) -> dict[str, str]:
    """``outbox-cdc start`` variables: WAL relay over verify-full TLS (unless ``database_url``
    is given), Kafka with ``auth``; ``settings`` override or add (kafka_sasl_password=...)."""
    kafka = kafka_settings(ep, auth, **{k: str(v) for k, v in settings.items() if k in KAFKA})
    rest = {k: v for k, v in settings.items() if k not in KAFKA}
    return relay_env(
        database_url=str(rest.pop("database_url", ep.postgres_tls_url)),
        bootstrap=kafka.pop("kafka_bootstrap_servers"),
        table=table,
        slot=slot,
        **{"kafka_max_block_ms": 4000, "shutdown_timeout": 5, "http_port": 0, **kafka, **rest},
    )


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_port(relay: RelayProcess) -> int:
    m = relay.wait_for_log(r"serving /metrics, /healthz and /readyz on [^:]+:(\d+)", 20)
    return int(m.group(1))


def wait_ready(port: int, want: int, timeout: float = 20.0) -> dict[str, object]:
    """/readyz's body once it answers ``want`` after a Kafka probe (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(port, "/readyz")
        probed = '"not probed yet"' not in body
        if (status == want and probed) or time.monotonic() > deadline:
            assert status == want, f"/readyz {status}: {body}"
            parsed: dict[str, object] = json.loads(body)
            return parsed
        time.sleep(0.2)


def ssl_of_relay(admin_url: str, slot: str, user: str) -> tuple[list[tuple[object, ...]], int]:
    """(walsender of the slot: [(ssl, version)]), number of the user's connections without TLS."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        walsender = conn.execute(
            "SELECT s.ssl, s.version FROM pg_replication_slots r"
            " JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = %s",
            (slot,),
        ).fetchall()
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)"
            " WHERE a.usename = %s AND NOT s.ssl",
            (user,),
        ).fetchone()
    return walsender, int(row[0]) if row else -1


def publish(url: str, table: str, topic: str, n: int) -> list[str]:
    outbox = Outbox(table, capture_trace_context=False)
    with psycopg.connect(url) as conn:
        ids = [
            str(
                outbox.publish(
                    conn, topic=topic, type="tls.test", payload=b"%d" % i, key=f"k{i % 5}"
                )
            )
            for i in range(n)
        ]
        conn.commit()
    return ids


def slot_exists(admin_url: str, slot: str) -> bool:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        return (
            conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
            is not None
        )


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_CDC_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_cdc.cli", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def progress_topic(kafka_bootstrap: str) -> Iterator[str]:
    name = f"progress_{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(Exception):  # best effort: the broker may be down (fault tests)
        delete_topic(kafka_bootstrap, name)


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_relay_streams_over_verify_full_tls_to_secured_kafka(
    case: KafkaCase,
    secure_endpoints: SecureEndpoints,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    replication_slot: str,
    kafka_topic: str,
    progress_topic: str,
    tmp_path: Path,
) -> None:
    ep = secure_endpoints
    env = env_for(
        ep,
        outbox_table,
        replication_slot,
        case.auth,
        kafka_client=case.client,
        exactly_once=str(case.exactly_once).lower(),
        progress_topic=progress_topic,
    )
    relay = RelayProcess(env, tmp_path, case.id).start()
    try:
        port = http_port(relay)
        relay.wait_streaming(30)
        ids = publish(ep.postgres_tls_url, outbox_table, kafka_topic, EVENTS)
        records = read_topic(
            kafka_bootstrap,
            kafka_topic,
            expect_ids=ids,
            timeout=30,
            isolation_level="read_committed" if case.exactly_once else "read_uncommitted",
        )
        got = [dict(r.headers).get("ce_id", b"").decode() for r in records]
        assert sorted(got) == sorted(ids), f"{len(got)}/{EVENTS} delivered:\n{relay.log_text()}"
        ready = wait_ready(port, 200)
        assert ready.get("kafka") == "ok", ready
        walsender, plaintext = ssl_of_relay(
            postgres_admin_url, replication_slot, urlsplit(ep.postgres_tls_url).username or ""
        )
        assert walsender and walsender[0][0] is True, walsender
        assert str(walsender[0][1]).startswith("TLSv1."), walsender
        assert plaintext == 0
    finally:
        relay.stop(timeout=20)
    log = relay.log_text()
    assert "ERROR" not in log, log
    if case.exactly_once:
        assert "exactly once" in log, log


def test_check_reaches_kafka_with_the_security_settings(
    secure_endpoints: SecureEndpoints, outbox_table: str, replication_slot: str
) -> None:
    """(With a wrong password: in the test of wrong passwords below.)"""
    ep = secure_endpoints
    good = env_for(ep, outbox_table, replication_slot, "SCRAM-SHA-512", create_slot="false")
    done = cli(["check", "--kafka-bootstrap-servers", ep.kafka_sasl_bootstrap, "--json"], good)
    kafka = [c for c in json.loads(done.stdout) if c["name"] == "kafka reachable"]
    assert kafka and kafka[0]["ok"], done.stdout + done.stderr


# -- refusals ----------------------------------------------------------------------------------


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&") if p)
    query.update(params)
    return urlunsplit(parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())))


def test_postgres_refuses_a_wrong_ca_and_a_host_name_the_certificate_does_not_name(
    secure_endpoints: SecureEndpoints,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    tmp_path: Path,
) -> None:
    ep = secure_endpoints
    wrong_ca = with_query(ep.postgres_tls_url, sslrootcert=ep.other_ca_file)
    # connects to 127.0.0.1, but verifies the certificate against the name "wronghost"
    parts = urlsplit(ep.postgres_tls_url)
    wrong_host = with_query(
        urlunsplit(parts._replace(netloc=parts.netloc.replace("@localhost:", "@wronghost:"))),
        hostaddr="127.0.0.1",
    )
    no_tls = with_query(ep.postgres_tls_url, sslmode="disable")
    expected = {
        "wrong CA": (wrong_ca, "certificate verify failed"),
        "wrong host name": (wrong_host, 'does not match host name "wronghost"'),
        "no TLS": (no_tls, "no encryption"),  # the server refuses this role without TLS
    }
    for url, message in expected.values():
        with pytest.raises(psycopg.OperationalError, match=message):
            psycopg.connect(url, connect_timeout=5).close()

    slots = {label: f"tls_refused_{uuid.uuid4().hex[:12]}" for label in ("wrong CA", "wrong host")}
    relays = {
        "wrong CA": RelayProcess(
            env_for(ep, outbox_table, slots["wrong CA"], "PLAIN", database_url=wrong_ca),
            tmp_path,
            "wrong-ca",
        ),
        "wrong host": RelayProcess(
            env_for(ep, outbox_table, slots["wrong host"], "PLAIN", database_url=wrong_host),
            tmp_path,
            "wrong-host",
        ),
    }
    try:
        for r in relays.values():
            r.start()
        relays["wrong CA"].wait_for_log(r"ERROR .*certificate verify failed", 30)
        relays["wrong host"].wait_for_log(r'ERROR .*does not match host name "wronghost"', 30)
        time.sleep(1)  # a relay that went on would be streaming by now
    finally:
        for r in relays.values():
            r.stop(timeout=20)
    for label, r in relays.items():
        log = r.log_text()
        assert "streaming" not in log, f"{label}:\n{log}"
        assert not slot_exists(postgres_admin_url, slots[label]), label
    status = cli(["status", "--slot", slots["wrong CA"]], {"OUTBOX_CDC_DATABASE_URL": wrong_ca})
    assert status.returncode == 1 and "certificate verify failed" in status.stderr, status


def test_kafka_wrong_sasl_password_and_untrusted_broker_name_the_setting(
    secure_endpoints: SecureEndpoints,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
    tmp_path: Path,
) -> None:
    """Both clients at once (4 relays), and check with a wrong password meanwhile."""
    ep = secure_endpoints
    wrong_password = f"WrongSasl{uuid.uuid4().hex}"
    runs: dict[str, tuple[str, str, dict[str, str], str]] = {}
    for client in ("kafka-python", "confluent"):
        # SCRAM with kafka-python, PLAIN with librdkafka (either reports both)
        mech = "SCRAM-SHA-512" if client == "kafka-python" else "PLAIN"
        runs[f"{client} wrong password"] = (
            client,
            mech,
            {"kafka_sasl_password": wrong_password},
            "kafka_sasl_password",
        )
        runs[f"{client} wrong CA"] = (
            client,
            "PLAIN",
            {"kafka_ssl_cafile": ep.other_ca_file},
            "kafka_ssl_cafile",
        )
    relays: dict[str, RelayProcess] = {}
    slots = []
    wrong_check = {
        **env_for(ep, outbox_table, "unused", "PLAIN", create_slot="false"),
        "OUTBOX_CDC_KAFKA_SASL_PASSWORD": wrong_password,
    }
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(
            cli, ["check", "--kafka-bootstrap-servers", ep.kafka_sasl_bootstrap], wrong_check
        )
        try:
            for label, (client, mech, override, _) in runs.items():
                slot = f"tls_kafka_{uuid.uuid4().hex[:12]}"
                slots.append(slot)
                env = env_for(ep, outbox_table, slot, mech, kafka_client=client, **override)
                relays[label] = RelayProcess(env, tmp_path, label.replace(" ", "-")).start()
            ports = {label: http_port(r) for label, r in relays.items()}
            for label, r in relays.items():
                setting = runs[label][3]
                r.wait_for_log(rf"ERROR outbox_cdc\.relay: no Kafka broker answered.*{setting}", 30)
                # a probe that ran out of its 4 s in the handshake says "timed out" instead;
                # the watchdog probes again every 5 s
                ready = wait_ready(ports[label], 503)
                deadline = time.monotonic() + 20
                while setting not in str(ready.get("kafka")) and time.monotonic() < deadline:
                    time.sleep(1)
                    ready = wait_ready(ports[label], 503)
                assert setting in str(ready.get("kafka")), (label, ready)
            publish(ep.postgres_tls_url, outbox_table, kafka_topic, 1)
            time.sleep(1)
        finally:
            for r in relays.values():  # all at once: each takes a moment to stop
                if r.running:
                    r.terminate()
            for r in relays.values():
                r.stop(timeout=20)
        done = check.result()
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "[FAIL] kafka reachable" in out and "kafka_sasl_password" in out, out
    assert wrong_password not in out
    for label, r in relays.items():
        log = r.log_text()
        assert wrong_password not in log and ep.kafka_sasl_password not in log, log
        assert "streaming" not in log, f"{label}:\n{log}"
    for slot in slots:
        assert not slot_exists(postgres_admin_url, slot)
    assert read_topic(kafka_bootstrap, kafka_topic, timeout=2) == []


def test_recover_republishes_over_tls_and_sasl(
    secure_endpoints: SecureEndpoints,
    kafka_bootstrap: str,
    outbox_table: str,
    replication_slot: str,
    kafka_topic: str,
) -> None:
    """``recover --force`` reads the outbox over verify-full TLS and re-publishes over SASL_SSL."""
    ep = secure_endpoints
    env = env_for(ep, outbox_table, replication_slot, "SCRAM-SHA-512")
    init = cli(["init", "--table", outbox_table, "--slot", replication_slot], env)
    assert init.returncode == 0, init.stdout + init.stderr
    ids = publish(ep.postgres_tls_url, outbox_table, kafka_topic, 3)
    done = cli(["recover", "--force", "--since", "2000-01-01 00:00:00"], env)
    assert done.returncode == 0 and "re-published 3 events" in done.stdout, done
    records = read_topic(kafka_bootstrap, kafka_topic, expect_ids=ids, timeout=20)
    assert sorted(dict(r.headers)["ce_id"].decode() for r in records) == sorted(ids)
