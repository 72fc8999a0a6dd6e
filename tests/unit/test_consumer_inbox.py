"""The inbox on SQLite (in memory; sqlite3 and SQLAlchemy): claim in the caller's transaction,
duplicates skipped, rollback forgets the claim, retention purge, DDL as package data."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest

from outbox_cdc.consumer import (
    ConsumedEvent,
    ConsumerMetrics,
    Inbox,
    RawRecord,
    inbox_ddl,
    parse_record,
)
from outbox_cdc.errors import ConfigurationError, EventValidationError, UnsupportedConnectionError
from outbox_cdc.events import create_event, to_record


def _event(i: int = 1) -> ConsumedEvent:
    r = to_record(create_event(topic="orders", type="t", payload={"i": i}))
    return parse_record(RawRecord("orders", 0, i, r.key, r.value, tuple(r.headers)))


@pytest.fixture
def conn() -> sqlite3.Connection:
    c = sqlite3.connect(":memory:", isolation_level=None)
    Inbox("setup").create_table(c)
    Inbox("setup").create_table(c)  # idempotent
    c.execute("CREATE TABLE effects (id TEXT)")
    return c


def test_claim_once_then_skip(conn: sqlite3.Connection) -> None:
    metrics = ConsumerMetrics()
    inbox = Inbox("billing", observer=metrics)
    event = _event()
    for _delivery in range(3):
        conn.execute("BEGIN")
        if inbox.claim(conn, event):
            conn.execute("INSERT INTO effects VALUES (?)", (event.id,))
        conn.execute("COMMIT")
    assert conn.execute("SELECT count(*) FROM effects").fetchone() == (1,)
    assert (
        metrics.registry.get_sample_value(
            "outbox_cdc_consumer_duplicates_skipped_total", {"topic": "orders"}
        )
        == 2
    )
    # another consumer has its own ids
    assert Inbox("shipping").claim(conn, event)


def test_a_rolled_back_claim_is_forgotten(conn: sqlite3.Connection) -> None:
    inbox = Inbox("billing")
    conn.execute("BEGIN")
    assert inbox.claim(conn, "e-1")
    conn.execute("ROLLBACK")  # the handler failed: its writes and the claim are gone
    conn.execute("BEGIN")
    assert inbox.claim(conn, "e-1")
    conn.execute("COMMIT")
    assert not inbox.claim(conn.cursor(), "e-1")  # a cursor works too


def test_purge_deletes_only_old_ids_of_this_consumer(conn: sqlite3.Connection) -> None:
    now = [datetime(2024, 1, 1, tzinfo=UTC)]
    inbox = Inbox("billing", clock=lambda: now[0])
    other = Inbox("shipping", clock=lambda: now[0])
    inbox.claim(conn, "old")
    other.claim(conn, "old")
    now[0] += timedelta(days=8)
    inbox.claim(conn, "new")
    assert inbox.purge(conn, older_than=timedelta(days=7)) == 1
    assert not inbox.claim(conn, "new")
    assert inbox.claim(conn, "old")  # purged: a redelivery this late would be processed again
    assert not other.claim(conn, "old")
    with pytest.raises(ConfigurationError):
        inbox.purge(conn, older_than=timedelta(0))


def test_sqlalchemy_connection() -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine("sqlite://")
    inbox = Inbox("billing", table="inbox")
    with engine.begin() as c:
        inbox.create_table(c)
        assert inbox.claim(c, "e-1")
        assert not inbox.claim(c, "e-1")
        assert inbox.purge(c, older_than=timedelta(seconds=1)) == 0


def test_refusals(conn: sqlite3.Connection) -> None:
    with pytest.raises(ConfigurationError):
        Inbox("")
    with pytest.raises(ConfigurationError):
        Inbox("x", table="bad name; drop")
    with pytest.raises(EventValidationError):
        Inbox("x").claim(conn, "e" * 256)
    with pytest.raises(UnsupportedConnectionError):
        Inbox("x").claim(object(), "e")


@pytest.mark.parametrize("dialect", ["postgresql", "mysql", "sqlite"])
def test_ddl_is_package_data(dialect: str) -> None:
    text = inbox_ddl(dialect, "app.inbox")
    assert "CREATE TABLE IF NOT EXISTS app.inbox" in text
    assert "PRIMARY KEY (consumer, event_id)" in text
    assert "inbox_processed_at" in text and "{" not in text
    with pytest.raises(ValueError, match="unknown dialect"):
        inbox_ddl("oracle")
