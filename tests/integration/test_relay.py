"""The relay process and its CLI on real PostgreSQL and Kafka, without load: the table-less mode,
poison rows (stop, or dead-letter), ``check`` / ``status`` / ``init``, invalid settings.

The relay runs as ``python -m outbox_cdc.cli`` with ``OUTBOX_CDC_*`` variables, like a user
runs it; its log is attached to the report of a failing test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_cdc import Outbox, OutboxEvent, to_record
from outbox_cdc.events import envelope_to_json
from tests.acceptance.harness import (
    RelayProcess,
    drop_outbox_table,
    header,
    read_topic,
    relay_env,
)
from tests.support.kafka import delete_topic
from tests.support.postgres import drop_replication_slot

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(120)]


@pytest.fixture
def relay(
    tmp_path: Path,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    replication_slot: str,
    kafka_topic: str,
) -> Iterator[RelayProcess]:
    """A relay process (not started) on this test's table and slot, creating topics with one
    partition (so the order of all records is the commit order). Killed at teardown; its logs
    are printed then (pytest shows them when the test failed)."""
    env = relay_env(
        database_url=postgres_url,
        bootstrap=kafka_bootstrap,
        table=outbox_table,
        slot=replication_slot,
        kafka_topic_partitions=1,
    )
    proc = RelayProcess(env, tmp_path / "logs")
    yield proc
    proc.kill()
    print(proc.all_logs())


@pytest.fixture
def dead_letter_topic(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Iterator[str]:
    name = unique_name("dlq")
    yield name
    delete_topic(kafka_bootstrap, name)


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None) -> Any:
    """Run ``outbox-cdc ARGS``; only ``env`` (plus PATH) as OUTBOX_CDC_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_CDC_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_cdc.cli", *args],
        env={**base, **(env or {})},
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def records_by_id(records: list[Any]) -> dict[str, Any]:
    return {header(r, "ce_id") or "": r for r in records}


def as_tuple(rec: Any) -> tuple[Any, ...]:
    return (rec.key, rec.value, [(k, bytes(v)) for k, v in rec.headers])


# -- table-less mode ---------------------------------------------------------------------------


def test_table_less_events_arrive_with_the_same_mapping_as_table_events(
    relay: RelayProcess,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
) -> None:
    """The same events, written once as outbox rows and once as logical decoding messages,
    arrive as records equal to ``to_record(event)`` (value, key, CloudEvents headers, user
    headers in order), byte for byte. Messages with another prefix, and non-transactional
    ones, are not published."""
    table_outbox = Outbox(outbox_table, capture_trace_context=False)
    prefix = relay.env["OUTBOX_CDC_MESSAGE_PREFIX"]
    message_outbox = Outbox(mode="message", message_prefix=prefix, capture_trace_context=False)
    specs: list[dict[str, Any]] = [
        {"payload": b"\x00binary\xff", "key": "k-1", "headers": {"b": "2", "a": b"\xff\x00"}},
        {"payload": {"n": 1, "text": "h\u00e9llo"}, "key": "k\u00e9y"},
        {"payload": "plain text", "key": None, "content_type": "text/x-custom"},
    ]
    written: list[tuple[str, OutboxEvent]] = []
    relay.start()
    relay.wait_streaming()
    with psycopg.connect(postgres_url) as conn:
        for mode, outbox in (("table", table_outbox), ("message", message_outbox)):
            for spec in specs:
                event = outbox.event(topic=kafka_topic, type="order.created", **spec)
                outbox.publish_many(conn, [event])
                written.append((mode, event))
            conn.commit()
        # rolled back in both modes; a non-transactional message (emitted even on rollback)
        never = [
            table_outbox.publish(conn, topic=kafka_topic, type="x", payload=b"no"),
            message_outbox.publish(conn, topic=kafka_topic, type="x", payload=b"no"),
        ]
        loose = message_outbox.event(topic=kafka_topic, type="x", payload=b"no")
        conn.execute(
            "SELECT pg_logical_emit_message(false, %s, %s)", (prefix, envelope_to_json(loose))
        )
        never.append(loose.id)
        conn.rollback()
        # committed, but with another prefix
        other = Outbox(mode="message", message_prefix=f"{prefix}-other")
        never.append(other.publish(conn, topic=kafka_topic, type="x", payload=b"no"))
        conn.commit()
    ids = {str(e.id) for _, e in written}
    records = read_topic(kafka_bootstrap, kafka_topic, expect_ids=ids, timeout=60, settle=1)
    got = records_by_id(records)
    assert len(records) == len(written), [header(r, "ce_id") for r in records]
    for mode, event in written:
        expected = to_record(event)
        rec = got[str(event.id)]
        assert as_tuple(rec) == (expected.key, expected.value, expected.headers), mode
    assert not {str(i) for i in never} & set(got)
    # one partition: the order of the records is the commit order
    assert [header(r, "ce_id") for r in records] == [str(e.id) for _, e in written]


# -- poison rows --------------------------------------------------------------------------------


def insert_raw(dsn: str, table: str, topic: str, headers: str = "{}", event_id: str = "") -> str:
    """A row written with SQL, bypassing the insert API's validation."""
    event_id = event_id or str(uuid.uuid4())
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {table} (id, topic, type, payload, headers)"
            " VALUES (%s, %s, 'raw.event', '\\x0001'::bytea, %s::json)",
            (event_id, topic, headers),
        )
    return event_id


def publish(dsn: str, table: str, topic: str, n: int) -> list[str]:
    outbox = Outbox(table, capture_trace_context=False)
    with psycopg.connect(dsn) as conn:
        ids = [str(outbox.publish(conn, topic=topic, type="good", payload=b"ok")) for _ in range(n)]
        conn.commit()
    return ids


@pytest.mark.parametrize(
    ("what", "headers", "bad_topic"),
    [
        ("headers is a JSON array", "[1,2]", False),
        ("topic name with a space", "{}", True),
    ],
)
def test_poison_row_stops_the_relay_with_an_error_naming_the_event(
    relay: RelayProcess,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
    what: str,
    headers: str,
    bad_topic: bool,
) -> None:
    """A committed row that cannot become a record: the relay exits non-zero naming the event
    id, and confirms nothing from it on: a restart stops at the same row again."""
    relay.start()
    relay.wait_streaming()
    good = publish(postgres_url, outbox_table, kafka_topic, 3)
    topic = f"{kafka_topic} with space" if bad_topic else kafka_topic
    poison = insert_raw(postgres_url, outbox_table, topic, headers)
    after = publish(postgres_url, outbox_table, kafka_topic, 2)
    code = relay.wait(60)
    log = relay.log_text()
    assert code == 1, log
    assert poison in log, log
    assert "dead-letter" in log  # says how to get past it
    records = read_topic(kafka_bootstrap, kafka_topic, expect_ids=good, timeout=30, settle=1)
    seen = [header(r, "ce_id") for r in records]
    assert seen == good, f"{what}: events after the poison row were published: {seen}"
    relay.start()  # nothing past the poison row was confirmed: it stops there again
    assert relay.wait(60) == 1
    assert poison in relay.log_text()
    assert not set(after) & set(seen)


@pytest.mark.parametrize("kafka_client", ["kafka-python", "confluent"])
def test_poison_rows_go_to_the_dead_letter_topic_and_later_events_still_arrive(
    relay: RelayProcess,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
    dead_letter_topic: str,
    kafka_client: str,
) -> None:
    if kafka_client == "confluent":
        pytest.importorskip("confluent_kafka", reason="the confluent extra is not installed")
    relay.start(dead_letter_topic=dead_letter_topic, kafka_client=kafka_client)
    relay.wait_streaming()
    before = publish(postgres_url, outbox_table, kafka_topic, 3)
    poison_headers = insert_raw(postgres_url, outbox_table, kafka_topic, "[1,2]")
    middle = publish(postgres_url, outbox_table, kafka_topic, 2)
    poison_topic = insert_raw(postgres_url, outbox_table, f"{kafka_topic} x")
    after = publish(postgres_url, outbox_table, kafka_topic, 3)
    good = before + middle + after
    records = read_topic(kafka_bootstrap, kafka_topic, expect_ids=good, timeout=60, settle=1)
    assert [header(r, "ce_id") for r in records] == good
    dead = read_topic(kafka_bootstrap, dead_letter_topic, timeout=30, settle=2)
    texts = [(r.value or b"").decode(errors="replace") for r in dead]
    assert len(dead) == 2, texts
    assert poison_headers in texts[0]
    assert poison_topic in texts[1]
    for rec in dead:
        assert header(rec, "outbox_cdc_error")
    assert relay.running, relay.log_text()
    log = relay.log_text()
    assert poison_headers in log
    assert poison_topic in log


# -- CLI: check, status, init ------------------------------------------------------------------


def test_check_passes_on_a_working_setup(
    postgres_url: str, kafka_bootstrap: str, outbox_table: str, replication_slot: str
) -> None:
    env = {
        "OUTBOX_CDC_DATABASE_URL": postgres_url,
        "OUTBOX_CDC_TABLE": outbox_table,
        "OUTBOX_CDC_SLOT": replication_slot,
        "OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
    }
    text = cli("check", env=env)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "FAIL" not in text.stdout
    out = cli("check", "--json", env=env)
    assert out.returncode == 0, out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert all(c["ok"] for c in checks.values()), checks
    for name in (
        "database reachable",
        "wal_level",
        "replication role",
        "wal2json",
        "outbox table",
        "replication slot",
        "kafka reachable",
    ):
        assert name in checks
    # and a missing table fails, with its fix
    bad = cli("check", "--table", "public.no_such_outbox", env=env)
    assert bad.returncode == 1
    assert "outbox-cdc init" in bad.stdout


def test_init_twice_then_status(
    postgres_url: str, unique_name: Callable[[str], str], replication_slot: str
) -> None:
    table = f"public.{unique_name('outbox')}"
    env = {"OUTBOX_CDC_DATABASE_URL": postgres_url}
    try:
        first = cli("init", "--table", table, "--slot", replication_slot, env=env)
        assert first.returncode == 0, first.stderr
        assert f"table {table}: created" in first.stdout
        assert f"slot {replication_slot}: created" in first.stdout
        second = cli("init", "--table", table, "--slot", replication_slot, env=env)
        assert second.returncode == 0, second.stderr
        assert f"table {table}: already present" in second.stdout
        assert f"slot {replication_slot}: already present" in second.stdout

        status = cli("status", "--json", "--slot", replication_slot, env=env)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["exists"] is True
        assert info["plugin"] == "wal2json"
        assert info["active"] is False
        assert info["active_process"] is None
        for key in (
            "confirmed_flush_lsn",
            "restart_lsn",
            "retained_wal_bytes",
            "lag_bytes",
            "current_wal_lsn",
            "wal_status",
        ):
            assert key in info
        human = cli("status", "--slot", replication_slot, env=env)
        assert human.returncode == 0
        assert "confirmed LSN" in human.stdout
        missing = cli("status", "--json", "--slot", "no_such_slot_here", env=env)
        assert json.loads(missing.stdout)["exists"] is False
    finally:
        drop_outbox_table(postgres_url, table)


def columns(dsn: str, table: str) -> list[tuple[Any, ...]]:
    schema, name = table.split(".")
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT column_name, ordinal_position, data_type, is_nullable, column_default,"
            " is_identity, identity_generation FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
            (schema, name),
        ).fetchall()


def test_init_print_sql_applied_with_psql_gives_the_same_schema(
    postgres_url: str, postgres_admin_url: str, unique_name: Callable[[str], str]
) -> None:
    by_init = f"public.{unique_name('outbox')}"
    by_psql = f"public.{unique_name('outbox')}"
    slot = unique_name("slot")
    env = {"OUTBOX_CDC_DATABASE_URL": postgres_url}
    try:
        assert cli("init", "--table", by_init, "--no-slot", env=env).returncode == 0
        sql = cli("init", "--print-sql", "--table", by_psql, "--slot", slot, env=env)
        assert sql.returncode == 0, sql.stderr
        assert "CREATE TABLE IF NOT EXISTS" in sql.stdout
        for _ in range(2):  # idempotent, like init
            applied = subprocess.run(
                ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", postgres_url, "-f", "-"],
                input=sql.stdout,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert applied.returncode == 0, applied.stderr
        assert columns(postgres_url, by_init) == columns(postgres_url, by_psql)
        assert columns(postgres_url, by_init)
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute(
                "SELECT plugin, slot_type FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            ).fetchone()
        assert row == ("wal2json", "logical")
        # with --dialect and no URL at all
        offline = cli(
            "init", "--print-sql", "--dialect", "postgresql", "--table", by_psql, "--slot", slot
        )
        assert offline.stdout == sql.stdout
    finally:
        drop_outbox_table(postgres_url, by_init)
        drop_outbox_table(postgres_url, by_psql)
        drop_replication_slot(postgres_admin_url, slot)


# -- invalid settings ---------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55word"


@pytest.mark.parametrize(
    ("variable", "value", "names"),
    [
        ("OUTBOX_CDC_KAFKA_LINGER_MS", "abc", "OUTBOX_CDC_KAFKA_LINGER_MS"),
        ("OUTBOX_CDC_MAX_IN_FLIGHT_EVENTS", "0", "OUTBOX_CDC_MAX_IN_FLIGHT_EVENTS"),
        ("OUTBOX_CDC_KAFKA_COMPRESSION_TYPE", "brotli", "OUTBOX_CDC_KAFKA_COMPRESSION_TYPE"),
        ("OUTBOX_CDC_STATUS_INTERVAL", "-1", "OUTBOX_CDC_STATUS_INTERVAL"),
        ("OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS", None, "OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS"),
        ("OUTBOX_CDC_SLOT", "Bad Slot!", "slot"),
        ("OUTBOX_CDC_TABLE", "public.outbox; drop table x", "table"),
        (
            "OUTBOX_CDC_DATABASE_URL",
            f"oracle://outbox:{SECRET}@127.0.0.1/outbox_test",
            "OUTBOX_CDC_DATABASE_URL",
        ),
    ],
)
def test_invalid_setting_fails_at_start_with_exit_2_naming_it_and_no_password(
    postgres_url: str, variable: str, value: str | None, names: str
) -> None:
    # a database URL with a password that must never be printed
    url = postgres_url.replace("outbox:outbox@", f"outbox:{SECRET}@", 1)
    env = {
        "OUTBOX_CDC_DATABASE_URL": url,
        "OUTBOX_CDC_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
    }
    if value is None:
        env.pop(variable)
    else:
        env[variable] = value
    proc = cli("start", env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert names in output, output
    assert SECRET not in output
    assert len(output.splitlines()) <= 5, output  # a message, not a traceback
