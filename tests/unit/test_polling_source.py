"""The polling source with the relay, on an in-memory database whose transactions can commit in
any order: what is read, when rows are marked, and what a late commit, a lost connection or a
second relay do. The same rules run against MariaDB, SQLite and PostgreSQL in
tests/integration/test_polling_databases.py and tests/acceptance/test_polling_relay.py."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from outbox_cdc.errors import EventDecodeError, PoisonEventError, SourceError, SourceInUseError
from outbox_cdc.events import KafkaRecord
from outbox_cdc.relay import Relay, RelayOptions
from outbox_cdc.sinks.memory import MemorySink
from outbox_cdc.sources.base import BEGIN, Commit
from outbox_cdc.sources.polling import PollingSource, PollingSourceOptions, row_to_event
from outbox_cdc.sources.polling_databases import Row


class FakeDatabase:
    """Rows with a seq, a committed flag and a published flag; one lock for all instances
    sharing ``state``. ``fail_next`` makes the next call of that method raise SourceError."""

    name = "FakeDB"

    def __init__(self, state: dict[str, Any] | None = None, table: str = "outbox") -> None:
        self.state = state if state is not None else {"rows": {}, "lock": None, "seq": 0}
        self.table = table
        self.connected = False
        self.fail_next: set[str] = set()
        self.calls: list[str] = []
        self.cleanups = 0
        self.disconnect_on_failure = True

    # -- test helpers ---------------------------------------------------------------------
    def insert(self, key: str = "k", *, committed: bool = True, **columns: Any) -> int:
        self.state["seq"] += 1
        seq: int = self.state["seq"]
        row = {
            "id": str(uuid.uuid4()),
            "created_at": "2026-11-26T10:00:00.000000Z",
            "topic": "orders",
            "key": key,
            "type": "order.created",
            "content_type": "application/json",
            "payload": json.dumps({"n": seq}).encode(),
            "headers": "{}",
        }
        row.update(columns)
        self.state["rows"][seq] = {"row": row, "committed": committed, "published": False}
        return seq

    def commit(self, seq: int) -> None:
        self.state["rows"][seq]["committed"] = True

    def published(self) -> list[int]:
        return sorted(s for s, r in self.state["rows"].items() if r["published"])

    def _check(self, what: str) -> None:
        self.calls.append(what)
        if what in self.fail_next:
            self.fail_next.discard(what)
            self.connected = not self.disconnect_on_failure
            raise SourceError(f"{what} failed: connection lost")
        if not self.connected:
            raise SourceError("not connected")

    # -- PollingDatabase ------------------------------------------------------------------
    def connect(self) -> None:
        self.connected = True
        self._check("connect")

    def try_lock(self) -> bool:
        self._check("try_lock")
        if self.state["lock"] in (None, id(self)):
            self.state["lock"] = id(self)
            return True
        return False

    def lock_holder(self) -> str:
        return "the other fake"

    def check_table(self) -> list[str]:
        self._check("check_table")
        return []

    def fetch(self, limit: int) -> list[Row]:
        self._check("fetch")
        out = []
        for seq in sorted(self.state["rows"]):
            r = self.state["rows"][seq]
            if r["committed"] and not r["published"]:
                c = r["row"]
                out.append(
                    (
                        seq,
                        c["id"],
                        c["created_at"],
                        c["topic"],
                        c["key"],
                        c["type"],
                        c["content_type"],
                        c["payload"],
                        c["headers"],
                    )
                )
        return out[:limit]

    def mark(self, seqs: Sequence[int]) -> None:
        self._check("mark")
        for seq in seqs:
            self.state["rows"][seq]["published"] = True

    def delete(self, seqs: Sequence[int]) -> None:
        self._check("delete")
        for seq in seqs:
            self.state["rows"][seq]["published"] = True

    def cleanup(self, retention: float, window: int) -> int:
        self._check("cleanup")
        self.cleanups += 1
        return 0

    def wake_fd(self) -> int | None:
        return None

    def drain_wake(self) -> bool:
        return False

    def pending(self) -> tuple[int, float | None]:
        rows = [r for r in self.state["rows"].values() if r["committed"] and not r["published"]]
        return len(rows), (0.0 if rows else None)

    def close(self) -> None:
        if self.state["lock"] == id(self):
            self.state["lock"] = None
        self.connected = False


def source_on(db: FakeDatabase, **options: Any) -> PollingSource:
    opts = {"poll_interval": 0.01, "retention": 0.0, **options}
    return PollingSource(PollingSourceOptions(url="sqlite:////unused.db", **opts), database=db)


def start(
    source: PollingSource, sink: MemorySink, **options: Any
) -> tuple[Relay, threading.Thread]:
    relay = Relay(
        source,
        lambda: sink,
        RelayOptions(backoff_initial=0.01, backoff_max=0.02, standby_poll_interval=0.01, **options),
    )
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    return relay, thread


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def seqs_of(records: list[KafkaRecord]) -> list[int]:
    return [json.loads(r.value)["n"] for r in records if r.topic == "orders"]


def stop(relay: Relay, thread: threading.Thread) -> None:
    relay.stop()
    thread.join(5)
    assert not thread.is_alive()


def test_publishes_pending_rows_in_seq_order_and_marks_them_after_the_ack() -> None:
    db = FakeDatabase()
    for i in range(25):
        db.insert(key=f"k{i % 3}")
    sink = MemorySink(auto_ack=False)
    relay, thread = start(source_on(db, batch_size=10), sink)
    wait_for(lambda: len(sink.pending) == 10)
    time.sleep(0.05)
    # one batch in flight, nothing marked before Kafka acknowledged it
    assert len(sink.pending) == 10
    assert db.published() == []
    sink.complete(9)
    time.sleep(0.05)
    assert db.published() == [], "a row was marked before its whole batch was acknowledged"
    sink.complete()
    wait_for(lambda: db.published() == list(range(1, 11)))
    while len(sink.records) < 25:
        sink.complete()
        time.sleep(0.005)
    wait_for(lambda: len(db.published()) == 25)
    stop(relay, thread)
    assert seqs_of(sink.records) == list(range(1, 26))


def test_a_late_commit_of_a_lower_seq_is_published_not_skipped() -> None:
    db = FakeDatabase()
    late = db.insert(committed=False)  # seq 1: its transaction is still open
    db.insert()  # seq 2 commits first
    sink = MemorySink()
    relay, thread = start(source_on(db), sink)
    wait_for(lambda: db.published() == [2])
    time.sleep(0.05)
    db.commit(late)
    wait_for(lambda: db.published() == [1, 2])
    time.sleep(0.05)
    stop(relay, thread)
    assert seqs_of(sink.records) == [2, 1]  # commit order; each exactly once


def test_rows_acknowledged_before_a_lost_connection_are_marked_after_reconnecting() -> None:
    db = FakeDatabase()
    for _ in range(5):
        db.insert()
    db.fail_next.add("delete")  # the first marking fails: the connection is lost
    sink = MemorySink()
    source = source_on(db)
    relay, thread = start(source, sink)
    wait_for(lambda: db.published() == [1, 2, 3, 4, 5])
    time.sleep(0.05)
    stop(relay, thread)
    # marked on reconnect, before the next read: not read again, so not published twice
    assert seqs_of(sink.records) == [1, 2, 3, 4, 5]
    assert db.calls.count("connect") >= 2
    first_fetch_after_reconnect = db.calls.index("fetch", db.calls.index("connect", 1))
    assert "delete" in db.calls[db.calls.index("connect", 1) : first_fetch_after_reconnect]


def test_a_second_relay_waits_while_the_first_holds_the_lock_and_then_takes_over() -> None:
    state: dict[str, Any] = {"rows": {}, "lock": None, "seq": 0}
    first_db, second_db = FakeDatabase(state), FakeDatabase(state)
    first_db.insert()
    sink1, sink2 = MemorySink(), MemorySink()
    relay1, thread1 = start(source_on(first_db), sink1)
    wait_for(lambda: first_db.published() == [1])
    relay2, thread2 = start(source_on(second_db), sink2)
    wait_for(lambda: relay2._state == "standby")
    first_db.insert()
    wait_for(lambda: first_db.published() == [1, 2])
    assert sink2.records == []
    stop(relay1, thread1)  # releases the lock
    first_db.insert()
    wait_for(lambda: first_db.published() == [1, 2, 3])
    stop(relay2, thread2)
    assert seqs_of(sink1.records) == [1, 2]
    assert seqs_of(sink2.records) == [3]


def test_the_lock_is_checked_before_anything_is_read() -> None:
    state: dict[str, Any] = {"rows": {}, "lock": "someone", "seq": 0}
    db = FakeDatabase(state)
    db.insert()
    with pytest.raises(SourceInUseError, match="polled by the other fake"):
        source_on(db).open(0)
    assert "fetch" not in db.calls
    assert not db.connected


def test_an_undecodable_row_goes_to_the_dead_letter_topic_and_is_marked() -> None:
    db = FakeDatabase()
    db.insert()
    bad = db.insert(headers="[1, 2]")
    db.insert()
    sink = MemorySink()
    relay, thread = start(source_on(db), sink, dead_letter_topic="dlq")
    wait_for(lambda: db.published() == [1, 2, 3])
    stop(relay, thread)
    assert seqs_of(sink.records) == [1, 3]
    (dead,) = [r for r in sink.records if r.topic == "dlq"]
    assert f"row seq {bad}" in dict(dead.headers)["outbox_cdc_error"].decode()
    assert "headers must be a JSON object" in dead.value.decode()


def test_an_undecodable_row_without_dead_letter_topic_stops_the_relay_unmarked() -> None:
    db = FakeDatabase()
    db.insert()
    db.insert(topic="")
    sink = MemorySink()
    relay = Relay(source_on(db), lambda: sink, RelayOptions())
    with pytest.raises(PoisonEventError, match="row seq 2"):
        relay.run()
    assert db.published() == []  # the batch holding it was never confirmed


def test_large_payloads_cut_the_batch_and_the_rest_follows() -> None:
    db = FakeDatabase()
    for _ in range(10):
        db.insert(payload=b"x" * 1000)
    source = source_on(db, batch_max_bytes=3000)
    source.open(0)
    items = source.read(0.1, _never_readable(), 100)
    assert items[0] is BEGIN and isinstance(items[-1], Commit)
    assert len(items) == 2 + 3  # 3 rows reach 3,000 bytes
    source.confirm(items[-1].end, items[-1].end)
    assert db.published() == [1, 2, 3]
    items = source.read(0.1, _never_readable(), 100)
    assert len(items) == 2 + 3
    source.close()


def test_retention_zero_deletes_and_otherwise_marks_and_cleans_up() -> None:
    for retention, marking in ((0.0, "delete"), (3600.0, "mark")):
        db = FakeDatabase()
        db.insert()
        source = source_on(db, retention=retention)
        source.open(0)
        items = source.read(0.1, _never_readable(), 100)
        source.confirm(items[-1].end, items[-1].end)
        assert marking in db.calls
        assert db.cleanups == (0 if retention == 0 else 1)
        source.close()


def test_a_failing_cleanup_does_not_stop_publishing(caplog: pytest.LogCaptureFixture) -> None:
    db = FakeDatabase()
    db.insert()
    db.fail_next.add("cleanup")
    db.disconnect_on_failure = False  # e.g. a lock wait timeout
    source = source_on(db, retention=60.0)
    source.open(0)
    items = source.read(0.1, _never_readable(), 100)
    items = items or source.read(0.1, _never_readable(), 100)
    assert [type(i).__name__ for i in items] == ["Begin", "OutboxEvent", "Commit"]
    assert "clean-up of published rows failed" in caplog.text


def test_a_full_batch_is_followed_by_the_next_poll_at_once() -> None:
    db = FakeDatabase()
    for _ in range(6):
        db.insert()
    source = source_on(db, batch_size=3, poll_interval=30.0)
    source.open(0)
    first = source.read(0.1, _never_readable(), 100)
    source.confirm(first[-1].end, first[-1].end)
    second = source.read(0.1, _never_readable(), 100)
    assert len(second) == 5, "a full batch must not wait for the poll interval"
    source.confirm(second[-1].end, second[-1].end)
    db.insert()
    started = time.monotonic()
    third = source.read(0.2, _never_readable(), 100)
    # the last poll found a full batch again: polls at once; the one after an empty poll waits
    assert len(third) == 3 and time.monotonic() - started < 0.2
    source.confirm(third[-1].end, third[-1].end)
    assert source.read(0.1, _never_readable(), 100) == []
    db.insert()
    assert source.read(0.1, _never_readable(), 100) == []  # within the 30 s interval
    source.close()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("id", "not-a-uuid", "badly formed hexadecimal UUID string"),
        ("payload", None, "payload is NULL"),
        ("headers", "{", "Expecting property name"),
        ("headers", '{"a": 1}', "header 'a'"),
        ("type", "", "type is empty"),
        ("topic", "bad topic!", "topic"),
        ("created_at", "yesterday", "Invalid isoformat"),
    ],
)
def test_row_decoding_errors_name_the_row_and_the_problem(
    column: str, value: Any, message: str
) -> None:
    row = {
        "seq": 7,
        "id": str(uuid.uuid4()),
        "created_at": "2026-11-26T10:00:00Z",
        "topic": "t",
        "key": "k",
        "type": "x",
        "content_type": "text/plain",
        "payload": b"p",
        "headers": "{}",
    }
    row[column] = value
    result = row_to_event(tuple(row.values()), "shop.outbox")
    assert isinstance(result, EventDecodeError)
    assert "outbox row of shop.outbox cannot be published" in str(result)
    assert "row seq 7" in str(result)
    assert message in str(result)


def test_rows_of_each_driver_decode_to_the_same_event() -> None:
    from datetime import UTC, datetime

    event_id = uuid.uuid4()
    when = datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)
    common = ("t", "k", "x", "text/plain")
    headers = '{"a":"1","b":{"base64":"AAE="}}'
    variants = [
        (1, event_id, when, *common, b"p", headers),  # psycopg
        (1, str(event_id), when.replace(tzinfo=None), *common, b"p", headers),  # PyMySQL
        (1, str(event_id), "2026-11-26T10:00:00.123456Z", *common, b"p", headers),  # sqlite3
        (1, str(event_id), "2026-11-26 10:00:00.123456", *common, "p", headers),  # other tools
    ]
    events = [row_to_event(v, "outbox") for v in variants]
    assert all(e == events[0] for e in events), events
    assert events[0].headers == (("a", b"1"), ("b", b"\x00\x01"))  # type: ignore[union-attr]


def _never_readable() -> int:
    import os

    r, _w = os.pipe()
    _KEEP.append(_w)
    return r


_KEEP: list[int] = []


def test_exactly_once_restore_marks_the_last_committed_batch_before_the_first_poll() -> None:
    """A relay killed between the Kafka commit and the UPDATE: the progress record lists the
    batch's seqs, and the next relay marks them before it polls, so they are not sent again."""
    db = FakeDatabase()
    for _ in range(3):
        db.insert()
    source = source_on(db)
    source.check_available()  # takes the lock, kept for open()
    assert "try_lock" in db.calls
    source.restore({"seqs": [1, 2]})
    source.open(0)
    assert db.published() == [1, 2]
    first = db.calls.index("delete")
    assert "fetch" not in db.calls[:first]
    items = source.read(0.1, _never_readable(), 100)
    assert len(items) == 3  # only seq 3 is read
    assert source.progress_state(items[-1].end) == {"seqs": [3]}
    assert source.progress_key() == "polling/FakeDB//unused.db/outbox"
    source.close()
