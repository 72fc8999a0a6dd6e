"""sources/slot_gap.py against a real PostgreSQL: which rows make a gap (by transaction id
against the two snapshots), paging and resuming after a crash, one process per gap, and a first
start that is not a gap. The relay around it: tests/acceptance/test_faults_slot.py."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from outbox_cdc import Outbox
from outbox_cdc.admin import init
from outbox_cdc.errors import SourceInUseError
from outbox_cdc.events import OutboxEvent
from outbox_cdc.protocol.lsn import parse_lsn
from outbox_cdc.sources import slot_gap
from outbox_cdc.sources.wal import create_slot, save_offset

pytestmark = [pytest.mark.postgres]


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def write(url: str, table: str, n: int, tag: str) -> list[str]:
    outbox = Outbox(table, capture_trace_context=False)
    with psycopg.connect(url) as conn:
        ids = [
            str(outbox.publish(conn, topic="t", type="t", key=f"{tag}{i % 3}", payload=b"x"))
            for i in range(n)
        ]
        conn.commit()
    return ids


def ids_of(page: slot_gap.Page) -> list[str]:
    return [str(e.id) for _, e in page if isinstance(e, OutboxEvent)]


def record_delivered(url: str, slot: str) -> None:
    """What the relay records once everything written so far is delivered: the position and a
    snapshot taken now (every transaction visible in it committed before)."""
    with connect(url) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        taken = save_offset(conn, slot, parse_lsn(row[0]), None)
        assert taken is not None
        save_offset(conn, slot, parse_lsn(row[0]), None, snapshot=taken[0])


def drop(admin_url: str, slot: str) -> None:
    with connect(admin_url) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def test_the_gap_is_exactly_the_transactions_not_delivered_and_resumes_after_a_crash(
    postgres_url: str, postgres_admin_url: str, outbox_table: str, replication_slot: str
) -> None:
    with connect(postgres_url) as conn:
        create_slot(conn, replication_slot)
    delivered = write(postgres_url, outbox_table, 5, "a")
    # a transaction open while the delivered snapshot is taken, committed afterwards: its row
    # has a lower seq than rows delivered after it, and it belongs to the gap
    long_txn = psycopg.connect(postgres_url)
    long_id = str(
        Outbox(outbox_table, capture_trace_context=False).publish(
            long_txn, topic="t", type="t", key="long", payload=b"x"
        )
    )
    delivered += write(postgres_url, outbox_table, 2, "b")
    record_delivered(postgres_url, replication_slot)
    long_txn.commit()
    long_txn.close()
    # a row written inside a savepoint: txid is the top-level transaction's
    with psycopg.connect(postgres_url) as conn:
        conn.execute("SELECT 1")  # the transaction is open: transaction() is a savepoint
        with conn.transaction() as sp:
            assert sp.savepoint_name is not None
            saved = str(
                Outbox(outbox_table, capture_trace_context=False).publish(
                    conn, topic="t", type="t", key="sp", payload=b"x"
                )
            )
        conn.commit()
    gap = [long_id, saved, *write(postgres_url, outbox_table, 7, "c")]
    drop(postgres_admin_url, replication_slot)

    def open_() -> slot_gap.Backfill | None:
        return slot_gap.open_gap(
            lambda: connect(postgres_url), replication_slot, outbox_table, allow=True, page_size=4
        )

    first = open_()
    assert first is not None
    try:
        with pytest.raises(SourceInUseError):  # one process per gap
            open_()
        page = first.next_page()
        assert ids_of(page) == gap[:4]  # seq order: the long transaction's row first
        first.acknowledged(page)
        assert ids_of(first.next_page()) == gap[4:8]  # not acknowledged: a crash now
    finally:
        first.close()
    with connect(postgres_url) as conn:
        assert slot_gap.pending(conn, replication_slot) is not None
        slot = conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (replication_slot,)
        ).fetchone()
        assert slot is not None  # recreated before the rows are read

    again = open_()
    assert again is not None
    try:
        rest: list[str] = []
        while page := again.next_page():
            rest += ids_of(page)
            again.acknowledged(page)
        again.finish()
    finally:
        again.close()
    assert rest == gap[4:]
    assert not set(rest) & set(delivered)
    with connect(postgres_url) as conn:
        marker = slot_gap.read_marker(conn, replication_slot)
        assert marker is not None and marker["state"] == "done" and marker["rows"] == len(gap)
    assert open_() is None  # the slot is healthy now: no gap


def test_a_first_start_is_not_a_gap_and_automatic_recovery_off_refuses_one(
    postgres_url: str, postgres_admin_url: str, outbox_table: str, replication_slot: str
) -> None:
    def open_(allow: bool) -> slot_gap.Backfill | None:
        return slot_gap.open_gap(
            lambda: connect(postgres_url), replication_slot, outbox_table, allow=allow
        )

    assert open_(False) is None  # no slot, nothing recorded, empty table: create as before
    write(postgres_url, outbox_table, 2, "a")
    with pytest.raises(slot_gap.SlotGapError, match="may never have been published"):
        open_(False)
    # 'outbox-cdc init' does not create the slot over a gap either
    done = init(postgres_url, outbox_table, replication_slot)
    assert any("not created" in line for line in done), done
    with connect(postgres_url) as conn:
        assert (
            conn.execute(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (replication_slot,)
            ).fetchone()
            is None
        )
    bf = open_(True)  # rows without a recorded position: all of them are published
    assert bf is not None
    try:
        assert len(bf.next_page()) == 2
    finally:
        bf.close()
