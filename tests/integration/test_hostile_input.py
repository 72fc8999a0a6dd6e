"""Hostile input end to end: what the insert API refuses, and what the real relay does with rows
other tools wrote directly into the table (WAL mode on PostgreSQL, polling on MariaDB): oversized
payloads, invalid UTF-8 keys, headers that are not a JSON object, NULLs where the relay expects
values (a "foreign schema": the project's table with its NOT NULL constraints dropped), unknown
content types, topics the broker refuses, a topic the relay may not write.

The policy (docs/reliability.md, "Hostile input"): a row the relay cannot publish is never
skipped silently. With a dead-letter topic it goes there with an ``outbox_cdc_error`` header and
every later event still arrives, in order; without one the relay stops with an error naming the
event (and its commit LSN or row seq), confirming nothing after it, and a restart after the fix
delivers everything else.

The test broker has no ACLs, so "a topic the relay's credentials may not write" is simulated by
topics the broker refuses: one that does not exist with topic creation off, one whose name
collides with an existing topic, and Kafka's internal ``__consumer_offsets`` (which no client may
append to). The bugs these tests found are listed in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from outbox_cdc import Outbox
from outbox_cdc.errors import EventDecodeError, EventValidationError, PermanentDeliveryError
from outbox_cdc.events import KafkaRecord
from outbox_cdc.schema import ddl, statements
from outbox_cdc.sinks.kafka import KafkaOptions, KafkaSink
from outbox_cdc.sources.polling import row_to_event as polling_row_to_event
from outbox_cdc.sources.polling_databases import open_database
from tests.acceptance.harness import (
    MariaDatabase,
    RelayProcess,
    create_outbox_table,
    ensure_topic,
    header,
    read_topic,
    relay_env,
)
from tests.integration.insert_support import pymysql_args
from tests.support.kafka import delete_topic
from tests.support.postgres import drop_replication_slot

pytestmark = [pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(120)]

MIB = 1024 * 1024
# Kafka's default message.max.bytes (1048588): a 1 MiB value plus the record's headers is more
BROKER_LIMIT = 1_048_588
DEEP_JSON = "[" * 3000 + "]" * 3000  # PostgreSQL's json type takes it; Python's parser would not
PG_FOREIGN = ("id", "created_at", "topic", "type", "payload", "headers", "content_type")


# -- plumbing ------------------------------------------------------------------------------------


@dataclass
class Outboxes:
    """Tables, slots and topics made by a test; removed at teardown."""

    postgres_url: str
    admin_url: str
    bootstrap: str
    unique_name: Callable[[str], str]
    tables: list[str] = field(default_factory=list)
    slots: list[str] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    mysql_tables: list[tuple[str, str]] = field(default_factory=list)
    relays: list[RelayProcess] = field(default_factory=list)

    def topic(self, prefix: str = "topic") -> str:
        name = self.unique_name(prefix)
        self.topics.append(name)
        return name

    def pg_table(self, *, foreign: bool = False) -> str:
        """The project's outbox table; ``foreign``: without its NOT NULL constraints, like a
        table another tool created."""
        table = f"public.{self.unique_name('hostile')}"
        self.tables.append(table)
        create_outbox_table(self.postgres_url, table)
        if foreign:
            drops = ", ".join(f"ALTER COLUMN {c} DROP NOT NULL" for c in PG_FOREIGN)
            with psycopg.connect(self.postgres_url, autocommit=True) as conn:
                conn.execute(f"ALTER TABLE {table} {drops}")
        return table

    def mysql_table(self, url: str, *, foreign: bool = False) -> str:
        table = self.unique_name("hostile")
        MariaDatabase(url).create_table(table)
        self.mysql_tables.append((url, table))
        if foreign:
            with mysql(url) as cur:
                cur.execute(
                    f"ALTER TABLE {table} MODIFY id CHAR(36) NULL, MODIFY topic VARCHAR(249) NULL,"
                    " MODIFY type VARCHAR(255) NULL, MODIFY payload LONGBLOB NULL,"
                    " MODIFY headers LONGTEXT NULL, MODIFY content_type VARCHAR(255) NULL,"
                    " MODIFY `key` VARBINARY(1024) NULL"
                )
        return table

    def wal_relay(self, table: str, log_dir: Path, **settings: object) -> RelayProcess:
        slot = self.unique_name("slot")
        self.slots.append(slot)
        env = relay_env(
            database_url=self.postgres_url,
            bootstrap=self.bootstrap,
            table=table,
            slot=slot,
            kafka_topic_partitions=1,
            backoff_max=2,
            **settings,
        )
        relay = RelayProcess(env, log_dir, name=f"relay-{len(self.relays)}")
        self.relays.append(relay)
        return relay

    def polling_relay(
        self, url: str, table: str, log_dir: Path, **settings: object
    ) -> RelayProcess:
        env = relay_env(
            database_url=url,
            bootstrap=self.bootstrap,
            table=table,
            slot="unused",
            kafka_topic_partitions=1,
            backoff_max=2,
            poll_interval=0.05,
            **settings,
        )
        relay = RelayProcess(env, log_dir, name=f"relay-{len(self.relays)}")
        self.relays.append(relay)
        return relay

    def cleanup(self) -> None:
        for relay in self.relays:
            relay.kill()
            print(relay.all_logs())
        for slot in self.slots:
            drop_replication_slot(self.admin_url, slot)
        with psycopg.connect(self.postgres_url, autocommit=True) as conn:
            for table in self.tables:
                conn.execute(f"DROP TABLE IF EXISTS {table}")
                conn.execute("DELETE FROM outbox_cdc_schema WHERE table_name = %s", (table,))
        for url, table in self.mysql_tables:
            MariaDatabase(url).drop_table(table)
        for topic in self.topics:
            with contextlib.suppress(Exception):
                delete_topic(self.bootstrap, topic)


@pytest.fixture
def made(
    postgres_url: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    unique_name: Callable[[str], str],
) -> Iterator[Outboxes]:
    things = Outboxes(postgres_url, postgres_admin_url, kafka_bootstrap, unique_name)
    yield things
    things.cleanup()


@contextlib.contextmanager
def mysql(url: str) -> Iterator[Any]:
    with pymysql.connect(**pymysql_args(url), autocommit=True) as conn, conn.cursor() as cur:
        yield cur


def publish(conn: Any, table: str, topic: str, n: int = 1, **event: Any) -> list[str]:
    """``n`` good events through the insert API, each committed on its own."""
    outbox = Outbox(table, capture_trace_context=False)
    event = {"type": "good", "payload": b"ok", **event}
    ids = []
    for _ in range(n):
        ids.append(str(outbox.publish(conn, topic=topic, **event)))
        conn.commit()
    return ids


def pg_raw(conn: psycopg.Connection[Any], table: str, **columns: Any) -> str:
    """A row written by another tool, with SQL: every column given explicitly (NULL included).
    Returns the id (or a fresh uuid to look the row up by, when the id is NULL)."""
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "topic": "t",
        "key": "raw",
        "type": "raw.event",
        "content_type": "application/octet-stream",
        "payload": b"\x00raw",
        "headers": "{}",
    }
    values.update(columns)
    casts = {"id": "::uuid", "headers": "::json", "payload": "::bytea"}
    names = ", ".join(f'"{n}"' for n in values)
    marks = ", ".join(f"%s{casts.get(n, '')}" for n in values)
    conn.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(values.values()))
    conn.commit()
    return str(values["id"])


def mysql_raw(url: str, table: str, **columns: Any) -> tuple[str, int]:
    """(id, seq) of a row written with SQL on MariaDB."""
    values: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "topic": "t",
        "key": "raw",
        "type": "raw.event",
        "content_type": "application/octet-stream",
        "payload": b"\x00raw",
        "headers": "{}",
    }
    values.update(columns)
    names = ", ".join(f"`{n}`" for n in values)
    marks = ", ".join("%s" for _ in values)
    with mysql(url) as cur:
        cur.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(values.values()))
        seq = cur.lastrowid
    return str(values["id"]), int(seq)


def ids_of(records: list[Any]) -> list[str | None]:
    return [header(r, "ce_id") for r in records]


def error_of(record: Any) -> str:
    return header(record, "outbox_cdc_error") or ""


def wait_all(relays: list[RelayProcess], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for relay in relays:
        with contextlib.suppress(Exception):
            relay.wait(max(0.1, deadline - time.monotonic()))
    return [relay.returncode for relay in relays]


def set_topic_config(bootstrap: str, topic: str, **configs: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="outbox-cdc-hostile")
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        admin.close()


# -- the insert API refuses, the databases refuse ----------------------------------------------


@pytest.mark.mysql
def test_insert_api_refuses_hostile_events_and_leaves_the_transaction_usable(
    postgres_url: str, mysql_url: str, made: Outboxes
) -> None:
    """Every case raises EventValidationError naming the argument, before any SQL runs: the
    caller's transaction goes on and commits its other work."""
    pg_table = made.pg_table()
    my_table = made.mysql_table(mysql_url)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("payload", {"payload": b"x" * (MIB + 1)}),  # above max_payload_bytes (1 MiB)
        ("key", {"key": b"\xff"}),  # bytes: keys are str
        ("key", {"key": "\udcff"}),  # a lone surrogate: not valid UTF-8
        ("key", {"key": "a\x00b"}),
        ("headers", {"headers": [("a", "b")]}),  # not a mapping
        ("headers", {"headers": {"ce_id": "forged"}}),
        ("headers", {"headers": {"Content-Type": "text/x"}}),
        ("headers", {"headers": {"a": 1}}),
        ("headers", {"headers": {"a": "\ud800"}}),
        ("topic", {"topic": "with space"}),
        ("topic", {"topic": "a" * 250}),
        ("topic", {"topic": ".."}),
        ("topic", {"topic": None}),
        ("type", {"type": None}),
        ("type", {"type": " "}),
        ("content_type", {"content_type": ""}),
        ("id", {"id": "not-a-uuid"}),
    ]
    conns: list[tuple[str, Any, str]] = [
        ("postgres", psycopg.connect(postgres_url), pg_table),
        ("mariadb", pymysql.connect(**pymysql_args(mysql_url)), my_table),
    ]
    try:
        for db, conn, table in conns:
            outbox = Outbox(table, capture_trace_context=False)
            base: dict[str, Any] = {"topic": "t", "type": "x", "payload": b"p"}
            for fld, change in cases:
                with pytest.raises(EventValidationError) as info:
                    outbox.publish(conn, **{**base, **change})
                assert info.value.field == fld, (db, change, info.value)
            # MariaDB's columns have lengths: checked before writing, too
            if db == "mariadb":
                with pytest.raises(EventValidationError, match="MySQL outbox column"):
                    outbox.publish(conn, **base, key="k" * 1025)
            # unknown content types are the application's business: written as given
            kept = outbox.publish(conn, **base, content_type="application/x-never-seen; v=9")
            conn.commit()
            cur = conn.cursor()
            cur.execute(f"SELECT count(*), max(content_type) FROM {table}")
            assert cur.fetchone() == (1, "application/x-never-seen; v=9"), db
            assert kept
    finally:
        for _, conn, _ in conns:
            conn.close()


@pytest.mark.mysql
def test_the_databases_refuse_invalid_utf8_keys_and_nulls_in_the_projects_schema(
    postgres_url: str, mysql_url: str, made: Outboxes
) -> None:
    """A bypassing client cannot put invalid UTF-8 into a text key (PostgreSQL always refuses;
    MariaDB in its default strict mode; without strict mode it stores '?' instead), nor NULL
    into the NOT NULL columns of the project's DDL."""
    pg_table = made.pg_table()
    with psycopg.connect(postgres_url) as conn:
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            conn.execute(
                f"INSERT INTO {pg_table} (topic, key, type, payload)"
                " VALUES ('t', convert_from('\\xff'::bytea, 'UTF8'), 'x', '')"
            )
        conn.rollback()
        for column in ("topic", "type", "payload"):
            with pytest.raises(psycopg.errors.NotNullViolation):
                pg_raw(conn, pg_table, **{column: None})
            conn.rollback()
    my_table = made.mysql_table(mysql_url)
    insert = (
        f"INSERT INTO {my_table} (id, topic, `key`, type, payload, headers)"
        " VALUES (UUID(), 't', _binary x'ff41', 'x', '', '{}')"
    )
    with mysql(mysql_url) as cur:
        with pytest.raises(pymysql.err.DataError, match="Incorrect string value"):
            cur.execute(insert)
        with pytest.raises(pymysql.err.IntegrityError, match="cannot be null"):
            cur.execute(
                f"INSERT INTO {my_table} (id, topic, type, payload, headers)"
                " VALUES (UUID(), 't', NULL, '', '{}')"
            )
        cur.execute("SET SESSION sql_mode = ''")
        cur.execute(insert)
        cur.execute(f"SELECT `key` FROM {my_table}")
        assert cur.fetchall() == (("?A",),)  # the server replaced the byte; the relay sees text


# -- rows other tools wrote: with a dead-letter topic --------------------------------------------

# (case, columns of the raw row, where it goes, what the error says)
DEAD = "dead-lettered"
PUBLISHED = "published"
ROWS: list[tuple[str, dict[str, Any], str, str]] = [
    ("headers a JSON array", {"headers": "[1,2]"}, DEAD, "must be a JSON object"),
    ("headers a JSON string", {"headers": '"text"'}, DEAD, "must be a JSON object"),
    ("headers JSON null", {"headers": "null"}, DEAD, "must be a JSON object"),
    ("headers nested 3000 deep", {"headers": DEEP_JSON}, DEAD, "recursion"),
    ("header value a number", {"headers": '{"a": 1}'}, DEAD, "must be a string or"),
    ("header value bad base64", {"headers": '{"a": {"base64": "***"}}'}, DEAD, "base64"),
    ("type NULL", {"type": None}, DEAD, "type is empty or NULL"),
    ("type empty", {"type": ""}, DEAD, "type is empty or NULL"),
    ("topic NULL", {"topic": None}, DEAD, "topic: must be a non-empty string"),
    ("topic illegal", {"topic": "with space"}, DEAD, "not a legal Kafka topic name"),
    ("payload NULL", {"payload": None}, DEAD, "payload is NULL"),
    ("id NULL", {"id": None}, DEAD, "cannot be published"),
    ("created_at NULL", {"created_at": None}, DEAD, "cannot be published"),
    ("headers NULL", {"headers": None}, PUBLISHED, ""),
    ("content_type NULL", {"content_type": None}, PUBLISHED, ""),
    ("content_type empty", {"content_type": ""}, PUBLISHED, ""),
    ("unknown content type", {"content_type": "application/x-never-seen; v=9"}, PUBLISHED, ""),
    ("key NULL", {"key": None}, PUBLISHED, ""),
]


def expected_content_type(columns: dict[str, Any]) -> bytes:
    value = columns.get("content_type", "application/octet-stream")
    return (value or "application/octet-stream").encode()


def test_wal_hostile_rows_go_to_the_dead_letter_topic_and_every_other_event_arrives_in_order(
    made: Outboxes, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """One relay, every hostile row between two good events: the good ones and the publishable
    hostile ones arrive in commit order; the others are dead-lettered in order, each with the
    reason naming the event id (the commit LSN when the id is NULL); a topic the broker refuses
    to create is dead-lettered with the original record; the relay keeps streaming."""
    table = made.pg_table(foreign=True)
    topic = made.topic()
    dlq = made.topic("dlq")
    refused = topic.replace("_", ".")  # collides with `topic`: Kafka refuses to create it
    made.topics.append(refused)
    relay = made.wal_relay(table, tmp_path / "logs", dead_letter_topic=dlq)
    relay.start()
    relay.wait_streaming()
    good: list[str] = []  # ce_id of every record expected on `topic`, in order
    dead: list[tuple[str, str, str]] = []  # (case, id or "", reason)
    published: dict[str, dict[str, Any]] = {}
    with psycopg.connect(made.postgres_url) as conn:
        good += publish(conn, table, topic)
        for case, columns, where, reason in ROWS:
            event_id = pg_raw(conn, table, **{"topic": topic, **columns})
            if where == PUBLISHED:
                good.append(event_id)
                published[event_id] = columns
            else:
                dead.append((case, "" if columns.get("id", 1) is None else event_id, reason))
            good += publish(conn, table, topic)
        refused_id = pg_raw(conn, table, topic=refused, key="r", payload=b"refused")
        good += publish(conn, table, topic, 2)
    records = read_topic(kafka_bootstrap, topic, expect_ids=good, timeout=30, settle=0.5)
    assert ids_of(records) == good, relay.log_text()
    for rec in records:
        columns = published.get(header(rec, "ce_id") or "")
        if columns is None:
            continue
        assert header(rec, "content-type") == expected_content_type(columns).decode()
        assert rec.key == (None if columns.get("key", "raw") is None else b"raw")
        assert rec.value == b"\x00raw"
        assert [k for k, _ in rec.headers][6:] == []  # no user headers
    letters = read_topic(kafka_bootstrap, dlq, timeout=30, settle=0.5)
    assert len(letters) == len(dead) + 1, [error_of(r) for r in letters]
    for rec, (case, event_id, reason) in zip(letters, dead, strict=False):
        text = error_of(rec)
        assert reason in text, (case, text)
        assert (event_id or "commit LSN") in text, (case, text)
        assert rec.value == text.encode()
    refused_rec = letters[-1]
    assert header(refused_rec, "ce_id") == refused_id
    assert header(refused_rec, "outbox_cdc_original_topic") == refused
    assert "InvalidTopicError" in error_of(refused_rec), error_of(refused_rec)
    assert (refused_rec.key, refused_rec.value) == (b"r", b"refused")
    assert relay.running, relay.log_text()


# -- without a dead-letter topic: the relay stops, a restart after the fix delivers the rest ----


@dataclass
class Stop:
    """One relay of the stop test: good event, hostile event, good event."""

    case: str
    table: str
    topic: str
    relay: RelayProcess
    names: str = ""  # what the error must name: the event id, or the commit LSN
    good: list[str] = field(default_factory=list)
    poison: str = ""
    expect_after_fix: list[str] = field(default_factory=list)


def test_wal_hostile_rows_stop_the_relay_and_a_restart_after_the_fix_delivers_the_rest(
    made: Outboxes, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Five relays at once, one hostile event each, no dead-letter topic. Each exits with code 1
    and an error naming the event (or, for a NULL id, its commit LSN), having published only the
    event before it (nothing after it is confirmed). Then the fix: for undecodable rows (which
    stay in the WAL) a restart with a dead-letter topic; for an oversized event a topic that
    takes it (max.message.bytes); for a missing topic creating it. After the restart every
    remaining event arrives, exactly once."""
    logs = tmp_path / "logs"
    stops: list[Stop] = []
    for case in ("headers nested 3000 deep", "type NULL", "id NULL", "oversized", "no topic"):
        table = made.pg_table(foreign=True)
        topic = made.topic()
        settings: dict[str, object] = {}
        if case == "no topic":
            settings["kafka_create_topics"] = "false"
            ensure_topic(kafka_bootstrap, topic, partitions=1)
        stops.append(Stop(case, table, topic, made.wal_relay(table, logs, **settings)))
    for stop in stops:
        stop.relay.start()
    for stop in stops:
        stop.relay.wait_streaming()
    missing = made.topic("missing")
    with psycopg.connect(made.postgres_url) as conn:
        for stop in stops:
            stop.good = publish(conn, stop.table, stop.topic)
            if stop.case == "oversized":  # accepted by the insert API (1 MiB), refused by Kafka
                stop.poison = publish(conn, stop.table, stop.topic, payload=b"x" * MIB)[0]
            elif stop.case == "no topic":
                stop.poison = publish(conn, stop.table, missing)[0]
            else:
                columns = {"headers": DEEP_JSON} if "headers" in stop.case else {}
                if stop.case == "type NULL":
                    columns = {"type": None}
                if stop.case == "id NULL":
                    columns = {"id": None}
                stop.poison = pg_raw(conn, stop.table, topic=stop.topic, **columns)
            stop.names = {
                "id NULL": "commit LSN",
                # open bug: names the topic, not the event (test_refused_topic_error_names_...)
                "no topic": missing,
            }.get(stop.case, stop.poison)
            stop.expect_after_fix = publish(conn, stop.table, stop.topic, 2)
    codes = wait_all([s.relay for s in stops], timeout=30)
    for stop, code in zip(stops, codes, strict=True):
        log = stop.relay.log_text()
        assert code == 1, (stop.case, log)
        assert stop.names in log, (stop.case, log)
        assert "dead-letter" in log, (stop.case, log)  # says how to get past it
        assert "Traceback" not in log, (stop.case, log)
        seen = ids_of(read_topic(kafka_bootstrap, stop.topic, expect_ids=stop.good, timeout=20))
        assert seen[: len(stop.good)] == stop.good, (stop.case, seen)
        # Events after it may have been sent while the refusal was on its way (a refusal of a
        # record in flight is known only when the broker answers): published, not confirmed.
        # Never with an undecodable row, which stops the relay before it sends the next one.
        early = seen[len(stop.good) :]
        assert set(early) <= set(stop.expect_after_fix), (stop.case, seen)
        if stop.case not in ("oversized", "no topic"):
            assert not early, (stop.case, seen)
    # the fixes
    dlq = made.topic("dlq")
    for stop in stops:
        if stop.case == "oversized":
            set_topic_config(kafka_bootstrap, stop.topic, **{"max.message.bytes": str(2 * MIB)})
            stop.relay.start()
            stop.expect_after_fix.insert(0, stop.poison)
        elif stop.case == "no topic":
            ensure_topic(kafka_bootstrap, missing, partitions=1)
            stop.relay.start()
        else:
            stop.relay.start(dead_letter_topic=dlq)
    for stop in stops:
        want = stop.good + stop.expect_after_fix
        seen = ids_of(read_topic(kafka_bootstrap, stop.topic, expect_ids=want, timeout=30))
        assert set(seen) == set(want), (stop.case, stop.relay.log_text())
        # redelivered after the restart (not confirmed): duplicates of later events only
        # (an oversized event's successors may have been published before it: see above)
        assert list(dict.fromkeys(seen)) == want or stop.case == "oversized", (stop.case, seen)
        print(f"{stop.case}: {len(seen) - len(want)} duplicates after the restart")
        assert all(seen.count(i) == 1 for i in stop.good), (stop.case, seen)
        assert stop.relay.running, (stop.case, stop.relay.log_text())
    moved = read_topic(kafka_bootstrap, missing, expect_ids=[stops[-1].poison], timeout=20)
    assert ids_of(moved) == [stops[-1].poison]
    letters = read_topic(kafka_bootstrap, dlq, timeout=20, settle=0.5)
    assert len(letters) == 3, [error_of(r) for r in letters]
    for stop in stops[:3]:
        assert any(stop.names in error_of(r) for r in letters), stop.case


# -- polling on MariaDB --------------------------------------------------------------------------

# (case, columns of the raw row, where it goes, what the error says); the table is a "foreign
# schema": the project's, without NOT NULL, and the key a VARBINARY (bytes, any encoding)
MYSQL_ROWS: list[tuple[str, dict[str, Any], str, str]] = [
    ("headers a JSON array", {"headers": "[1,2]"}, DEAD, "must be a JSON object"),
    ("headers nested 3000 deep", {"headers": DEEP_JSON}, DEAD, "recursion"),
    ("headers not JSON", {"headers": "{"}, DEAD, "Expecting property name"),
    ("header value a number", {"headers": '{"a": 1}'}, DEAD, "must be a string or"),
    ("type NULL", {"type": None}, DEAD, "type is empty or NULL"),
    ("topic NULL", {"topic": None}, DEAD, "topic: must be a non-empty string"),
    ("payload NULL", {"payload": None}, DEAD, "payload is NULL"),
    ("id NULL", {"id": None}, DEAD, "badly formed hexadecimal UUID string"),
    ("key invalid UTF-8", {"key": b"\xff\xfe"}, DEAD, "can't decode byte 0xff"),
    ("headers NULL", {"headers": None}, PUBLISHED, ""),
    ("headers empty text", {"headers": ""}, PUBLISHED, ""),
    ("content_type NULL", {"content_type": None}, PUBLISHED, ""),
    ("unknown content type", {"content_type": "application/x-never-seen; v=9"}, PUBLISHED, ""),
    ("key NULL", {"key": None}, PUBLISHED, ""),
]


@pytest.mark.mysql
def test_polling_hostile_rows_go_to_the_dead_letter_topic_and_every_other_event_arrives_in_order(
    made: Outboxes, mysql_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The same policy in polling mode on MariaDB: every hostile row between two good events,
    topic creation off. Undecodable rows are dead-lettered naming their seq and event id, an
    event for a missing topic with its original record; every row, hostile or not, is then
    marked published; the relay keeps polling."""
    table = made.mysql_table(mysql_url, foreign=True)
    topic = made.topic()
    dlq = made.topic("dlq")
    missing = made.topic("missing")
    for name in (topic, dlq):
        ensure_topic(kafka_bootstrap, name, partitions=1)
    relay = made.polling_relay(
        mysql_url,
        table,
        tmp_path / "logs",
        dead_letter_topic=dlq,
        kafka_create_topics="false",
        poll_batch_size=7,  # hostile rows in several batches
    )
    good: list[str] = []
    dead: list[tuple[str, str, int, str]] = []
    conn = pymysql.connect(**pymysql_args(mysql_url))
    try:
        good += publish(conn, table, topic)
        for case, columns, where, reason in MYSQL_ROWS:
            event_id, seq = mysql_raw(mysql_url, table, **{"topic": topic, **columns})
            if where == PUBLISHED:
                good.append(event_id)
            else:
                dead.append((case, event_id if columns.get("id", 1) else "", seq, reason))
            good += publish(conn, table, topic)
        refused = publish(conn, table, missing, key="m")[0]
        good += publish(conn, table, topic, 2)
    finally:
        conn.close()
    relay.start()
    records = read_topic(kafka_bootstrap, topic, expect_ids=good, timeout=30)
    assert ids_of(records) == good, relay.log_text()
    letters = read_topic(kafka_bootstrap, dlq, timeout=30, settle=0.5)
    assert len(letters) == len(dead) + 1, [error_of(r) for r in letters]
    for rec, (case, event_id, seq, reason) in zip(letters, dead, strict=False):
        text = error_of(rec)
        assert reason in text, (case, text)
        assert f"row seq {seq}" in text, (case, text)
        assert event_id in text, (case, text)
    assert header(letters[-1], "ce_id") == refused
    assert header(letters[-1], "outbox_cdc_original_topic") == missing
    assert "topic creation is off" in error_of(letters[-1])
    assert letters[-1].key == b"m"

    def pending() -> int:
        with mysql(mysql_url) as cur:
            cur.execute(f"SELECT count(*) FROM {table} WHERE published_at IS NULL")
            return int(cur.fetchone()[0])

    deadline = time.monotonic() + 10
    while pending() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pending() == 0, "hostile rows are marked like the others once dead-lettered"
    assert relay.running, relay.log_text()


@pytest.mark.mysql
def test_polling_hostile_rows_stop_the_relay_until_the_row_is_deleted(
    made: Outboxes, mysql_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """No dead-letter topic: the relay stops at each hostile row with an error naming it, and
    marks nothing from its batch on; deleting the row and restarting goes on to the next one,
    and in the end every other event arrives, in order. Events before a hostile row in its
    batch were delivered but not marked: sent again after the restart (duplicates, same id)."""
    table = made.mysql_table(mysql_url, foreign=True)
    topic = made.topic()
    relay = made.polling_relay(mysql_url, table, tmp_path / "logs")
    conn = pymysql.connect(**pymysql_args(mysql_url))
    hostile: list[tuple[str, str, int]] = []  # (what the error names, id, seq)
    try:
        good = publish(conn, table, topic)
        for columns in (
            {"headers": "[1,2]"},
            {"key": b"\xff"},
            {"payload": b"x" * (2 * MIB)},  # above the producer's max_request_size
        ):
            event_id, seq = mysql_raw(mysql_url, table, **{"topic": topic, **columns})
            hostile.append((event_id, event_id, seq))
            good += publish(conn, table, topic)
    finally:
        conn.close()
    for event_id, _, seq in hostile:
        relay.start()
        assert relay.wait(30) == 1, relay.log_text()
        log = relay.log_text()
        assert event_id in log, log
        assert "Traceback" not in log, log
        with mysql(mysql_url) as cur:
            cur.execute(
                f"SELECT count(*) FROM {table} WHERE published_at IS NULL AND seq >= %s", (seq,)
            )
            pending_from_here = int(cur.fetchone()[0])
            cur.execute(f"DELETE FROM {table} WHERE seq = %s", (seq,))
        assert pending_from_here == 2 * (len(hostile) - hostile.index((event_id, event_id, seq))), (
            "nothing from the hostile row on is marked"
        )
    relay.start()
    seen = ids_of(read_topic(kafka_bootstrap, topic, expect_ids=good, timeout=30, settle=0.5))
    assert list(dict.fromkeys(seen)) == good
    print(f"{len(seen) - len(good)} duplicates over {len(hostile)} restarts")
    assert relay.running, relay.log_text()


# -- what the sink does with records the broker refuses ---------------------------------------


def make_sink(client: str, bootstrap: str, **options: Any) -> Any:
    opts = KafkaOptions(
        bootstrap_servers=bootstrap, delivery_timeout_ms=10_000, request_timeout_ms=5_000, **options
    )
    if client == "confluent":
        pytest.importorskip("confluent_kafka", reason="the confluent extra is not installed")
        from outbox_cdc.sinks.confluent import ConfluentSink

        return ConfluentSink(opts)
    return KafkaSink(opts)


def deliver(sink: Any, topic: str, value: bytes = b"v", key: bytes | None = b"k") -> Any:
    """Send one record, wait for its outcome: None, or the exception (raised or reported)."""
    done = threading.Event()
    outcome: list[BaseException | None] = []

    def on_done(exc: BaseException | None) -> None:
        outcome.append(exc)
        done.set()

    record = KafkaRecord(topic, key, value, [("ce_id", b"e-1")], event_id="e-1")
    try:
        sink.send(record, on_done)
    except Exception as exc:
        return exc
    sink.flush(15)
    assert done.wait(15), "no outcome"
    return outcome[0]


CLIENTS = ["kafka-python", "confluent"]


@pytest.mark.parametrize(
    "client",
    [
        "kafka-python",  # fixed: the client's own refusal (ValueError) is a permanent error
        "confluent",
    ],
)
def test_a_topic_nobody_may_write_is_refused_for_good(
    client: str, kafka_bootstrap: str, made: Outboxes
) -> None:
    """Writing to Kafka's internal __consumer_offsets is refused by the broker (as a topic
    without WRITE permission would be): the event must be refused for good, dead-lettered or
    stopping the relay, and the producer must go on with other records."""
    topic = made.topic()
    sink = make_sink(client, kafka_bootstrap)
    try:
        outcome = deliver(sink, "__consumer_offsets")
        assert isinstance(outcome, PermanentDeliveryError), repr(outcome)
        assert deliver(sink, topic) is None
    finally:
        sink.close(5)


@pytest.mark.parametrize(
    "client",
    ["kafka-python", "confluent"],
)
def test_a_record_the_topic_refuses_is_refused_for_good(
    client: str, kafka_bootstrap: str, made: Outboxes
) -> None:
    """A compacted topic refuses a record without key (INVALID_RECORD): a retry cannot help."""
    topic = made.topic("compacted")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="outbox-cdc-hostile")
    try:
        from kafka.admin import NewTopic

        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()
    sink = make_sink(client, kafka_bootstrap)
    try:
        outcome = deliver(sink, topic, key=None)
        assert isinstance(outcome, PermanentDeliveryError), repr(outcome)
        assert deliver(sink, topic, key=b"k") is None
    finally:
        sink.close(5)


def test_kafka_python_producer_goes_on_after_the_broker_refused_a_record(
    kafka_bootstrap: str, made: Outboxes
) -> None:
    topic = made.topic()
    sink = make_sink("kafka-python", kafka_bootstrap)
    try:
        assert deliver(sink, topic) is None
        outcome = deliver(sink, topic, value=b"x" * MIB)  # above the broker's message.max.bytes
        assert isinstance(outcome, PermanentDeliveryError), repr(outcome)
        assert deliver(sink, topic) is None  # kafka-python's producer was in a fatal state
    finally:
        sink.close(5)


@pytest.mark.parametrize("client", CLIENTS)
def test_refused_topic_error_names_the_event(
    client: str, kafka_bootstrap: str, made: Outboxes
) -> None:
    topic = made.topic()
    ensure_topic(kafka_bootstrap, topic, partitions=1)
    sink = make_sink(client, kafka_bootstrap, create_topics=False)
    try:
        outcome = deliver(sink, made.topic("missing"))
        assert isinstance(outcome, PermanentDeliveryError), repr(outcome)
        assert outcome.event_id == "e-1", str(outcome)
    finally:
        sink.close(5)


def test_an_oversized_event_with_a_dead_letter_topic_does_not_stop_the_relay(
    made: Outboxes, kafka_bootstrap: str, tmp_path: Path
) -> None:
    table = made.pg_table()
    topic = made.topic()
    dlq = made.topic("dlq")
    relay = made.wal_relay(table, tmp_path / "logs", dead_letter_topic=dlq)
    relay.start()
    relay.wait_streaming()
    with psycopg.connect(made.postgres_url) as conn:
        good = publish(conn, table, topic)
        big = publish(conn, table, topic, payload=b"x" * MIB)[0]  # the insert API takes it
        good += publish(conn, table, topic, 2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        relay.wait(6)  # it used to exit here: stopped on the dead-letter record
    assert relay.running, relay.log_text()
    assert ids_of(read_topic(kafka_bootstrap, topic, expect_ids=good, timeout=10)) == good
    assert big in ids_of(read_topic(kafka_bootstrap, dlq, timeout=5))


@pytest.mark.parametrize("client", CLIENTS)
def test_refused_events_among_many_in_flight_are_dead_lettered_and_the_rest_arrive_in_order(
    client: str, made: Outboxes, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Three oversized events in the middle of 600 good ones, committed 50 per transaction, so
    that many records are in flight around each refusal (one partition, one key: any
    reordering shows). With kafka-python the refusal also fails the records sent after it (its
    producer's fatal state); they must be sent again, in order, not dead-lettered."""
    if client == "confluent":
        pytest.importorskip("confluent_kafka", reason="the confluent extra is not installed")
    table = made.pg_table()
    topic = made.topic()
    dlq = made.topic("dlq")
    relay = made.wal_relay(table, tmp_path / "logs", dead_letter_topic=dlq, kafka_client=client)
    relay.start()
    relay.wait_streaming()
    good: list[str] = []
    big: list[str] = []
    outbox = Outbox(table, capture_trace_context=False)
    with psycopg.connect(made.postgres_url) as conn:
        for i in range(603):
            if i in (150, 300, 451):
                big.append(
                    str(outbox.publish(conn, topic=topic, key="k", type="big", payload=b"x" * MIB))
                )
            else:
                good.append(
                    str(
                        outbox.publish(
                            conn, topic=topic, key="k", type="good", payload=str(i).encode()
                        )
                    )
                )
            if i % 50 == 49:
                conn.commit()
        conn.commit()
    records = read_topic(kafka_bootstrap, topic, expect_ids=good, timeout=60, settle=1)
    dead = read_topic(kafka_bootstrap, dlq, expect_ids=big, timeout=30)
    seen = ids_of(records)
    first_copies = list(dict.fromkeys(seen))
    print(
        f"[hostile] {client}: {len(seen)} records for {len(good)} good events, "
        f"{len(dead)} dead letters for {len(big)} refused, "
        f"pipeline restarts {relay.log_text().count('reconnecting')}"
    )
    assert relay.running, relay.log_text()
    if first_copies != good:  # say where, in event numbers
        number = {e: i for i, e in enumerate(good)}
        got = [number.get(e or "", -1) for e in first_copies]
        wrong = [(k, got[k - 1], got[k]) for k in range(1, len(got)) if got[k] != got[k - 1] + 1]
        trace = [
            (r.offset, number.get(header(r, "ce_id") or "", -1), r.timestamp % 100000)
            for r in records
        ]
        raise AssertionError(
            f"{len(got)} of {len(good)} good events; out of order at {wrong[:10]}; {trace}"
        )
    assert set(ids_of(dead)) == set(big)
    assert not set(ids_of(dead)) & set(good)


def test_sqlite_key_with_invalid_utf8_is_a_poison_row(tmp_path: Path) -> None:
    """No service needed: what the polling relay's SQLite adapter reads back."""
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    for stmt in statements(ddl("sqlite", "outbox")):
        conn.execute(stmt)
    conn.execute(
        'INSERT INTO outbox (id, topic, "key", type, payload, headers)'
        " VALUES (?, 't', CAST(x'ff' AS TEXT), 'x', x'00', '{}')",
        (str(uuid.uuid4()),),
    )
    conn.commit()
    conn.close()
    db = open_database(f"sqlite:///{path}", "outbox")
    db.connect()
    try:
        rows = db.fetch(10)  # today: sqlite3.OperationalError, not even a SourceError
    finally:
        db.close()
    assert isinstance(polling_row_to_event(rows[0], "outbox"), EventDecodeError)
