"""Smoke tests of the ground the other tests stand on: each service answers for real."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import psycopg
import pymysql
import pytest
from kafka import KafkaProducer
from psycopg import sql

from tests.support.kafka import consume_all
from tests.support.postgres import Wal2JsonStream, drop_replication_slot
from tests.support.services import ServiceControl, mysql_connect_kwargs


@pytest.mark.postgres
def test_wal2json_v2_change_arrives_over_logical_replication(
    postgres_url: str, replication_slot: str, unique_name: Callable[[str], str]
) -> None:
    table = unique_name("smoke")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, payload text NOT NULL)").format(
                sql.Identifier(table)
            )
        )
    try:
        options = {"format-version": "2", "add-tables": f"public.{table}"}
        with Wal2JsonStream(postgres_url, replication_slot, options) as stream:
            marker = uuid.uuid4().hex
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("INSERT INTO {} (id, payload) VALUES (1, %s)").format(
                        sql.Identifier(table)
                    ),
                    (marker,),
                )
            seen = []
            insert = None
            for _lsn, message in stream.messages(timeout=20):
                seen.append(message)
                if message.get("action") == "I" and message.get("table") == table:
                    insert = message
                if insert is not None and message.get("action") == "C":
                    break
            stream.confirm()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))

    assert insert is not None, f"no wal2json insert for {table}; got {seen}"
    assert insert["schema"] == "public"
    columns = {c["name"]: c["value"] for c in insert["columns"]}
    assert columns == {"id": 1, "payload": marker}
    # other sessions' transactions may show up as empty B/C pairs; ours is B, I, C in a row
    at = seen.index(insert)
    assert [m["action"] for m in seen[at - 1 : at + 2]] == ["B", "I", "C"], seen


@pytest.mark.postgres
def test_replication_slot_fixture_drops_an_active_slot(
    postgres_url: str, postgres_admin_url: str, unique_name: Callable[[str], str]
) -> None:
    # what the replication_slot fixture does at teardown, on a slot still streaming
    slot = unique_name("slot")
    stream = Wal2JsonStream(postgres_url, slot)
    try:
        assert drop_replication_slot(postgres_admin_url, slot) is True
        with psycopg.connect(postgres_admin_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
        assert row == (0,)
        assert drop_replication_slot(postgres_admin_url, slot) is False
    finally:
        stream.close()


@pytest.mark.kafka
def test_kafka_record_produced_with_acks_all_is_consumed_back(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    value = json.dumps({"id": uuid.uuid4().hex}).encode()
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        acks="all",
        enable_idempotence=True,
        client_id="outbox-cdc-smoke",
    )
    try:
        metadata = producer.send(kafka_topic, key=b"k1", value=value, headers=[("h", b"v")]).get(
            timeout=30
        )
    finally:
        producer.close(timeout=10)
    assert metadata.topic == kafka_topic
    assert metadata.offset == 0

    records = consume_all(kafka_bootstrap, kafka_topic, expected_count=1, timeout=30)
    assert len(records) == 1
    record = records[0]
    assert (record.key, record.value, record.offset) == (b"k1", value, 0)
    assert list(record.headers) == [("h", b"v")]


@pytest.mark.mysql
def test_mariadb_answers(mysql_url: str) -> None:
    conn = pymysql.connect(**mysql_connect_kwargs(mysql_url), connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION(), DATABASE()")
            version, database = cur.fetchone()
    finally:
        conn.close()
    assert version
    assert database == mysql_connect_kwargs(mysql_url)["database"]


def test_unique_name_is_unique_and_safe(unique_name: Callable[[str], str]) -> None:
    names = {unique_name("Orders-Topic.v1") for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert name.startswith("orders_topic_v1_")
        assert name.replace("_", "").isalnum()
        assert name == name.lower()
        assert len(name) <= 63
    assert unique_name("9lives")[0].isalpha()
    assert len(unique_name("x" * 200)) <= 63


@pytest.mark.postgres
def test_services_restart_postgres(postgres_url: str, services: ServiceControl) -> None:
    """The fault-injection handle works: the server restarts and answers again."""
    with psycopg.connect(postgres_url) as conn:
        before = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    started = time.monotonic()
    services.restart("postgres")
    elapsed = time.monotonic() - started
    with psycopg.connect(postgres_url) as conn:
        after = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert before is not None
    assert after is not None
    assert after[0] > before[0]
    assert elapsed < 60
