"""The relay loop with an in-memory source and sink: what is confirmed, when, and what happens
on failures. The same rules are checked end to end against real servers in tests/acceptance."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest

from outbox_cdc.errors import (
    EventDecodeError,
    PermanentDeliveryError,
    PoisonEventError,
    SinkError,
    SlotInUseError,
    SourceError,
)
from outbox_cdc.events import KafkaRecord, OutboxEvent
from outbox_cdc.relay import Relay, RelayOptions
from outbox_cdc.sinks.memory import MemorySink
from outbox_cdc.sources.base import BEGIN, Commit, Item


def event(n: int, key: str = "k") -> OutboxEvent:
    return OutboxEvent(
        id=uuid.UUID(int=n),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        topic="t",
        type="x",
        payload=str(n).encode(),
        content_type="text/plain",
        key=key,
    )


def txn(end: int, *ns: int) -> list[Item]:
    return [BEGIN, *(event(n) for n in ns), Commit(end)]


class FakeSource:
    """Serves scripted items; replays from the last confirmed position after a reconnect,
    like a replication slot does."""

    name = "FakeDB"

    def __init__(self, items: list[Item], *, fail_open: list[Exception] | None = None) -> None:
        self.items = items
        self.fail_open = list(fail_open or [])
        self.cursor = 0
        self.confirmed = 0
        self.delivered = 0
        self.opens: list[int] = []
        self.closed = 0
        self.relay: Relay | None = None
        self.stop_when_drained = True
        self.fail_read_at: int | None = None

    def _position_index(self, position: int) -> int:
        """Index of the first item after the commit at ``position`` (the server's resend)."""
        for i, item in enumerate(self.items):
            if isinstance(item, Commit) and item.end == position:
                return i + 1
        return 0

    @staticmethod
    def describe(position: int) -> str:
        return f"#{position}"

    def open(self, resume_from: int) -> int:
        if self.fail_open:
            raise self.fail_open.pop(0)
        start = max(resume_from, self.confirmed)
        self.opens.append(start)
        self.cursor = self._position_index(start)
        return start

    def read(self, timeout: float, wake_fd: int, max_items: int) -> list[Item]:
        if self.fail_read_at is not None and self.cursor >= self.fail_read_at:
            self.fail_read_at = None
            raise SourceError("connection lost")
        out = self.items[self.cursor : self.cursor + min(3, max_items)]
        self.cursor += len(out)
        relay = self.relay
        if (
            not out
            and self.stop_when_drained
            and relay is not None
            and relay.tracker.in_flight == 0
        ):
            relay.stop()
        return out

    def idle_position(self) -> int | None:
        return None

    def confirm(self, confirmed: int, delivered: int) -> None:
        assert confirmed >= self.confirmed, "confirmed went backwards"
        self.confirmed = confirmed
        self.delivered = max(self.delivered, delivered)

    def tick(self) -> None:
        pass

    def close(self) -> None:
        self.closed += 1


def run(source: FakeSource, sink_factory: object, **opts: object) -> Relay:
    relay = Relay(
        source,
        sink_factory,  # type: ignore[arg-type]
        RelayOptions(backoff_initial=0.01, backoff_max=0.02, standby_poll_interval=0.01, **opts),
    )  # type: ignore[arg-type]
    source.relay = relay
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "relay did not stop"
    return relay


def payloads(records: list[KafkaRecord]) -> list[bytes]:
    return [r.value for r in records]


def test_publishes_in_order_and_confirms_the_last_commit() -> None:
    sink = MemorySink()
    source = FakeSource(txn(10, 1, 2) + txn(20) + txn(30, 3))
    run(source, lambda: sink)
    assert payloads(sink.records) == [b"1", b"2", b"3"]
    assert (source.confirmed, source.delivered) == (30, 30)
    assert sink.records[0].headers[1] == ("ce_id", str(uuid.UUID(int=1)).encode())


class StuckSink(MemorySink):
    """A broker that does not answer: flush acknowledges nothing."""

    def flush(self, timeout: float) -> None:
        threading.Event().wait(min(timeout, 0.05))


def test_nothing_is_confirmed_while_the_sink_has_not_acknowledged() -> None:
    sink = StuckSink(auto_ack=False)
    source = FakeSource(txn(10, 1) + txn(20, 2))
    source.stop_when_drained = False
    relay = Relay(source, lambda: sink, RelayOptions(shutdown_timeout=0.2))
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    for _ in range(100):
        if len(sink.pending) == 2:
            break
        threading.Event().wait(0.01)
    assert len(sink.pending) == 2
    assert source.confirmed == 0
    sink.complete(1)  # only the first event
    for _ in range(100):
        if source.confirmed == 10:
            break
        threading.Event().wait(0.01)
    assert source.confirmed == 10
    relay.stop()
    t.join(5)
    assert source.confirmed == 10, "the unacknowledged second transaction must not be confirmed"


def test_backpressure_bounds_events_in_flight() -> None:
    sink = MemorySink(auto_ack=False)
    items: list[Item] = []
    for n in range(1, 51):
        items += txn(n * 10, n)
    source = FakeSource(items)
    source.stop_when_drained = False
    relay = Relay(source, lambda: sink, RelayOptions(max_in_flight_events=5, shutdown_timeout=1))
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    threading.Event().wait(0.3)
    assert len(sink.pending) <= 5
    while len(sink.records) < 50:
        sink.complete()
        threading.Event().wait(0.01)
    relay.stop()
    t.join(5)
    assert payloads(sink.records) == [str(n).encode() for n in range(1, 51)]
    assert source.confirmed == 500


def test_permanent_rejection_stops_without_confirming_the_event() -> None:
    class Refusing(MemorySink):
        def send(self, record: KafkaRecord, on_done: object) -> None:
            if record.value == b"2":
                on_done(PermanentDeliveryError("too large", event_id=record.event_id))  # type: ignore[operator]
                return
            super().send(record, on_done)  # type: ignore[arg-type]

    sink = Refusing()
    source = FakeSource(txn(10, 1) + txn(20, 2) + txn(30, 3))
    source.stop_when_drained = False
    relay = Relay(source, lambda: sink, RelayOptions())
    with pytest.raises(PermanentDeliveryError, match="dead-letter"):
        relay.run()
    assert source.confirmed == 10


def test_permanent_rejection_goes_to_the_dead_letter_topic() -> None:
    class Refusing(MemorySink):
        def send(self, record: KafkaRecord, on_done: object) -> None:
            if record.value == b"2" and record.topic == "t":
                on_done(PermanentDeliveryError("too large"))  # type: ignore[operator]
                return
            super().send(record, on_done)  # type: ignore[arg-type]

    sink = Refusing()
    source = FakeSource(txn(10, 1) + txn(20, 2) + txn(30, 3))
    run(source, lambda: sink, dead_letter_topic="dlq")
    assert [(r.topic, r.value) for r in sink.records] == [("t", b"1"), ("dlq", b"2"), ("t", b"3")]
    dlq = sink.records[1]
    assert ("outbox_cdc_original_topic", b"t") in dlq.headers
    assert source.confirmed == 30


def test_undecodable_row_stops_the_relay_before_its_commit_is_confirmed() -> None:
    sink = MemorySink()
    bad = EventDecodeError("headers must be a JSON object", event_id="e-1", lsn="0/14")
    source = FakeSource([*txn(10, 1), BEGIN, bad, Commit(20), *txn(30, 3)])
    source.stop_when_drained = False
    with pytest.raises(PoisonEventError, match="e-1"):
        Relay(source, lambda: sink, RelayOptions()).run()
    assert source.confirmed == 10
    assert payloads(sink.records) == [b"1"]


def test_retriable_sink_failure_reconnects_and_resends_from_the_confirmed_position() -> None:
    sinks: list[MemorySink] = []

    class FlakyOnce(MemorySink):
        def send(self, record: KafkaRecord, on_done: object) -> None:
            if record.value == b"2" and len(sinks) == 1:
                on_done(SinkError("broker down"))  # type: ignore[operator]
                return
            super().send(record, on_done)  # type: ignore[arg-type]

    def factory() -> MemorySink:
        sinks.append(FlakyOnce())
        return sinks[-1]

    source = FakeSource(txn(10, 1) + txn(20, 2) + txn(30, 3))
    run(source, factory)
    assert len(sinks) == 2
    assert source.opens == [0, 10]  # resumed after the last delivered commit
    delivered = [r.value for s in sinks for r in s.records]
    assert delivered.count(b"1") == 1 and b"2" in delivered and b"3" in delivered
    assert source.confirmed == 30


def test_source_failure_reconnects_without_losing_events() -> None:
    sink = MemorySink()
    source = FakeSource(txn(10, 1) + txn(20, 2) + txn(30, 3), fail_open=[SourceError("refused")])
    source.fail_read_at = 4
    run(source, lambda: sink)
    assert sorted(set(payloads(sink.records))) == [b"1", b"2", b"3"]
    assert source.confirmed == 30
    assert len(source.opens) >= 2


def test_standby_waits_while_the_slot_is_in_use() -> None:
    sink = MemorySink()
    source = FakeSource(txn(10, 1), fail_open=[SlotInUseError("s", 42)] * 3)
    relay = run(source, lambda: sink)
    assert payloads(sink.records) == [b"1"]
    assert relay.delivered == 10


def test_a_silent_broker_is_reported_once_and_its_return_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = StuckSink(auto_ack=False)
    source = FakeSource(txn(10, 1) + txn(20, 2))
    source.stop_when_drained = False
    relay = Relay(source, lambda: sink, RelayOptions(stall_warning=0.2, shutdown_timeout=1))
    t = threading.Thread(target=relay.run, daemon=True)
    with caplog.at_level("INFO", logger="outbox_cdc.relay"):
        t.start()
        threading.Event().wait(1.5)
        sink.complete()
        threading.Event().wait(0.3)
        relay.stop()
        t.join(5)
    stalled = [r for r in caplog.records if "acknowledged nothing" in r.getMessage()]
    assert len(stalled) == 1
    assert stalled[0].levelname == "WARNING"
    assert "2 events waiting" in stalled[0].getMessage()
    assert any("acknowledges again" in r.getMessage() for r in caplog.records)
    assert source.confirmed == 20


def test_stop_reads_on_to_the_end_of_a_partly_read_transaction() -> None:
    """Events of an open transaction already sent become confirmable at once (no
    redelivery after restart), rather than being abandoned at stop."""
    sink = MemorySink()
    items = [BEGIN, *(event(n) for n in range(1, 8)), Commit(70)]
    source = FakeSource(items)
    source.stop_when_drained = False
    relay = Relay(source, lambda: sink, RelayOptions(shutdown_timeout=5))
    original_read = source.read

    def read_then_stop(timeout: float, wake_fd: int, max_items: int) -> list[Item]:
        out = original_read(timeout, wake_fd, max_items)
        if source.cursor == 3:  # BEGIN and two events read: stop mid-transaction
            relay.stop()
        return out

    source.read = read_then_stop  # type: ignore[method-assign]
    relay.run()
    assert len(sink.records) == 7
    assert source.confirmed == 70


def test_an_acknowledgment_during_the_wake_drain_is_not_lost() -> None:
    """The IO thread acknowledges while the loop reads the wake-up socket: afterwards the next
    acknowledgment must still make the socket readable (else the loop sleeps out its timeout)."""
    import select

    relay = Relay(FakeSource([]), MemorySink, RelayOptions())
    real = relay._wake_r

    class AckDuringRecv:
        calls = 0

        def recv(self, n: int) -> bytes:
            self.calls += 1
            if self.calls == 1:
                relay._wake()  # the client's IO thread, right now
            return real.recv(n)

        def fileno(self) -> int:
            return real.fileno()

    relay._wake()  # an earlier acknowledgment's byte
    relay._wake_r = AckDuringRecv()  # type: ignore[assignment]
    relay._drain_wake()
    relay._wake_r = real
    relay._wake()  # the next acknowledgment
    readable, _, _ = select.select([real], [], [], 0)
    assert readable, "the wake-up byte of the next acknowledgment was never sent"


def test_acknowledged_events_behind_a_stuck_one_stop_reading_at_the_in_flight_limit() -> None:
    """One record never acknowledged (a partition that no longer exists), every later one
    acknowledged: reading stops once the events since the confirmed position reach the limit,
    so a restart sends at most that many again."""

    class OneStuck(MemorySink):
        def send(self, record: KafkaRecord, on_done: object) -> None:
            if record.value == b"1":
                return  # never acknowledged
            super().send(record, on_done)  # type: ignore[arg-type]

    sink = OneStuck()
    items: list[Item] = []
    for n in range(1, 101):
        items += txn(n * 10, n)
    source = FakeSource(items)
    source.stop_when_drained = False
    relay = Relay(source, lambda: sink, RelayOptions(max_in_flight_events=10, shutdown_timeout=0.2))
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    threading.Event().wait(0.5)
    relay.stop()
    t.join(5)
    assert len(sink.records) == 9  # events 2..10: 10 unconfirmed with the stuck one
    assert source.confirmed == 0


def test_a_transaction_larger_than_the_in_flight_limit_still_flows() -> None:
    sink = MemorySink()
    source = FakeSource([BEGIN, *(event(n) for n in range(1, 51)), Commit(500), *txn(510, 51)])
    run(source, lambda: sink, max_in_flight_events=5)
    assert payloads(sink.records) == [str(n).encode() for n in range(1, 52)]
    assert source.confirmed == 510


class FailingReads(FakeSource):
    """Opens fine, then every read fails (privileges revoked) ``failures`` times."""

    def __init__(self, items: list[Item], failures: int) -> None:
        super().__init__(items)
        self.failures = failures

    def read(self, timeout: float, wake_fd: int, max_items: int) -> list[Item]:
        if self.failures:
            self.failures -= 1
            raise SourceError("FakeDB: permission denied for table outbox")
        return super().read(timeout, wake_fd, max_items)


def test_a_failure_right_after_connecting_backs_off_further_and_logs_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backoff is not reset by a successful connect, only by progress; the log has one
    ERROR line, one "streaming from" for the first reconnect, a reminder a minute, and one
    line when delivery resumes."""
    import outbox_cdc.relay as relay_module

    monkeypatch.setattr(relay_module, "REMINDER_INTERVAL", 0.05)
    sink = MemorySink()
    source = FailingReads(txn(10, 1) + txn(20, 2), failures=7)
    relay = Relay(
        source,
        lambda: sink,
        RelayOptions(backoff_initial=0.001, backoff_max=0.064, standby_poll_interval=0.01),
    )
    source.relay = relay
    delays: list[float] = []
    real_sleep = relay._sleep

    def sleep(seconds: float) -> None:
        delays.append(seconds)
        real_sleep(seconds)

    relay._sleep = sleep  # type: ignore[method-assign]
    with caplog.at_level("DEBUG", logger="outbox_cdc.relay"):
        relay.run()
    assert len(delays) == 7
    nominal = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064]
    for delay, expected in zip(delays, nominal, strict=True):
        assert 0.75 * expected <= delay <= expected  # doubling, with jitter
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    errors = [m for level, m in lines if level == "ERROR"]
    assert errors[0].startswith("FakeDB: permission denied")
    assert all(m.startswith("still failing after") for m in errors[1:]), errors
    assert len(errors) <= 4, errors  # the first line and reminders, not one per retry
    streaming = [m for level, m in lines if level == "INFO" and "streaming from" in m]
    assert len(streaming) == 2, streaming  # the start, and the first reconnect
    assert any(level == "INFO" and m.startswith("delivering again after") for level, m in lines)
    assert payloads(sink.records) == [b"1", b"2"]
    assert source.confirmed == 20


def test_progress_resets_the_backoff() -> None:
    sink = MemorySink()
    source = FailingReads(txn(10, 1) + txn(20, 2), failures=3)
    relay = Relay(source, lambda: sink, RelayOptions(backoff_initial=0.001, backoff_max=1.0))
    source.relay = relay
    relay.run()
    assert source.confirmed == 20
    assert relay._backoff.current == 0.001


def test_a_dead_letter_sent_again_after_each_restart_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An undecodable row (WAL: replayed after every pipeline restart) whose dead letter keeps
    failing (retriably): its ERROR line once, not once per restart."""
    sinks: list[MemorySink] = []

    class DeadLetterFails(MemorySink):
        def send(self, record: KafkaRecord, on_done: object) -> None:
            if record.topic == "dlq" and len(sinks) < 6:
                on_done(SinkError("dead-letter topic unavailable"))  # type: ignore[operator]
                return
            super().send(record, on_done)  # type: ignore[arg-type]

    def factory() -> MemorySink:
        sinks.append(DeadLetterFails())
        return sinks[-1]

    bad = EventDecodeError("headers must be a JSON object", event_id="e-1", lsn="0/14")
    source = FakeSource([*txn(10, 1), BEGIN, bad, Commit(20), *txn(30, 3)])
    with caplog.at_level("INFO", logger="outbox_cdc.relay"):
        run(source, factory, dead_letter_topic="dlq")
    assert source.confirmed == 30
    assert len(sinks) == 6
    dead_letter_lines = [r for r in caplog.records if "sending it to dead-letter" in r.getMessage()]
    assert len(dead_letter_lines) == 1, [r.getMessage() for r in dead_letter_lines]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2, [r.getMessage() for r in errors]  # the dead letter, the failure


def test_a_record_holding_the_confirmed_position_back_is_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Kafka acknowledges everything but one record: a warning names it (topic, key, age)
    after the stall threshold, once, and the recovery has one line too."""

    class OneStuck(MemorySink):
        def send(self, record: KafkaRecord, on_done: object) -> None:
            if record.value == b"1":
                self.stuck = on_done
                return
            super().send(record, on_done)  # type: ignore[arg-type]

    sink = OneStuck()
    items: list[Item] = []
    for n in range(1, 31):
        items += txn(n * 10, n)
    source = FakeSource(items)
    source.stop_when_drained = False
    relay = Relay(
        source,
        lambda: sink,
        RelayOptions(max_in_flight_events=20, stall_warning=0.3, shutdown_timeout=1),
    )
    t = threading.Thread(target=relay.run, daemon=True)
    with caplog.at_level("INFO", logger="outbox_cdc.relay"):
        t.start()
        threading.Event().wait(1.2)
        sink.stuck(None)
        threading.Event().wait(0.5)
        relay.stop()
        t.join(5)
    held = [r for r in caplog.records if "has not moved" in r.getMessage()]
    assert len(held) == 1, [r.getMessage() for r in held]
    assert held[0].levelname == "WARNING"
    message = held[0].getMessage()
    assert "20 events (19 acknowledged)" in message, message
    assert "topic t, key 'k', sent" in message, message
    assert not any("acknowledged nothing" in r.getMessage() for r in caplog.records)
    assert any("moves again" in r.getMessage() for r in caplog.records)
    assert source.confirmed == 300


def test_exactly_once_warns_when_kafka_acknowledges_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The at-least-once warning, in exactly-once mode: the Kafka transaction's records wait
    (a broker outage) while the relay flushes before committing."""

    class TransactionalMemorySink(MemorySink):
        def begin_transaction(self) -> None:
            pass

        def commit_transaction(self, timeout: float) -> None:
            if self.pending:
                raise SinkError("not acknowledged")

        def abort_transaction(self) -> None:
            pass

        def flush(self, timeout: float) -> None:
            if self.auto_ack:
                self.complete()
            else:
                threading.Event().wait(min(timeout, 0.05))

    sink = TransactionalMemorySink(auto_ack=False)
    source = FakeSource(txn(10, 1) + txn(20, 2))
    source.stop_when_drained = False
    source.check_available = lambda: None  # type: ignore[attr-defined]
    source.progress_key = lambda: "fake"  # type: ignore[attr-defined]

    class Store:
        def load(self, key: str) -> None:
            return None

    relay = Relay(
        source,
        lambda: sink,
        RelayOptions(exactly_once=True, stall_warning=0.5, transaction_timeout=30),
        progress_store=Store(),
    )
    t = threading.Thread(target=relay.run, daemon=True)
    with caplog.at_level("INFO", logger="outbox_cdc.relay"):
        t.start()
        threading.Event().wait(2.5)
        assert source.confirmed == 0
        sink.auto_ack = True
        sink.complete()
        threading.Event().wait(1.5)
        relay.stop()
        t.join(10)
    stalled = [r for r in caplog.records if "acknowledged nothing" in r.getMessage()]
    assert len(stalled) == 1, [r.getMessage() for r in caplog.records]
    assert stalled[0].levelname == "WARNING"
    assert any("acknowledges again" in r.getMessage() for r in caplog.records)
    assert source.confirmed == 20


def test_a_broker_outage_with_a_few_acknowledged_events_is_still_a_silent_broker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The outage began in the middle of a transaction (its first event acknowledged): that is
    "Kafka has acknowledged nothing", not one record holding the others back."""

    class AcksFirstOnly(StuckSink):
        def send(self, record: KafkaRecord, on_done: object) -> None:
            if record.value == b"1":
                on_done(None)  # type: ignore[operator]
                return
            super().send(record, on_done)  # type: ignore[arg-type]

    sink = AcksFirstOnly(auto_ack=False)
    source = FakeSource(txn(10, 1, 2) + txn(20, 3) + txn(30, 4) + txn(40, 5))
    source.stop_when_drained = False
    relay = Relay(source, lambda: sink, RelayOptions(stall_warning=0.3, shutdown_timeout=0.5))
    t = threading.Thread(target=relay.run, daemon=True)
    with caplog.at_level("INFO", logger="outbox_cdc.relay"):
        t.start()
        threading.Event().wait(1.0)
        relay.stop()
        t.join(5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("acknowledged nothing" in m and "4 events waiting" in m for m in messages), messages
    assert not any("has not moved" in m for m in messages), messages
