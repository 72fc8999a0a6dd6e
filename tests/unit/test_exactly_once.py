"""Exactly-once mode of the relay with an in-memory source and a fake transactional sink that
behaves like Kafka: records become visible only when their transaction commits, the progress
record is read back as committed, a new producer aborts what the previous one left open.
The same rules run end to end against PostgreSQL and Kafka in
tests/acceptance/test_exactly_once.py."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from outbox_cdc.errors import (
    EventDecodeError,
    PoisonEventError,
    ProducerFencedError,
    SinkError,
    SlotInUseError,
)
from outbox_cdc.events import KafkaRecord
from outbox_cdc.exactly_once import Progress, parse_progress
from outbox_cdc.relay import Relay, RelayOptions
from outbox_cdc.sinks.base import DeliveryCallback
from outbox_cdc.sources.base import BEGIN, Commit, Item
from tests.unit.test_relay import FakeSource, txn

KEY = "postgresql/1/db/slot"
TOPIC = "progress"


class Kafka:
    """The broker: committed records (what read_committed consumers see) and the
    transactional id's epoch."""

    def __init__(self) -> None:
        self.committed: list[KafkaRecord] = []
        self.epoch = 0
        self.fail_commits = 0

    def record(self, key: str) -> dict[str, Any] | None:
        found = None
        for r in self.committed:
            if r.topic == TOPIC and r.key == key.encode():
                found = parse_progress(key, r.value)
        return found

    def progress(self, key: str) -> int | None:
        record = self.record(key)
        return record["position"] if record else None

    def events(self) -> list[bytes]:
        return [r.value for r in self.committed if r.topic != TOPIC]


class TxnSink:
    def __init__(self, kafka: Kafka) -> None:
        self.kafka = kafka
        kafka.epoch += 1  # init_transactions: fences the older producers
        self.epoch = kafka.epoch
        self.open: list[KafkaRecord] | None = None
        self.closed = False

    def _check_epoch(self) -> None:
        if self.epoch != self.kafka.epoch:
            raise ProducerFencedError("fenced")

    def begin_transaction(self) -> None:
        self._check_epoch()
        assert self.open is None, "a transaction is already open"
        self.open = []

    def send(self, record: KafkaRecord, on_done: DeliveryCallback) -> None:
        assert self.open is not None, "send outside a transaction"
        self.open.append(record)
        on_done(None)

    def commit_transaction(self, timeout: float) -> None:
        self._check_epoch()
        assert self.open is not None
        if self.kafka.fail_commits:
            self.kafka.fail_commits -= 1
            self.open = None
            raise SinkError("Kafka failed committing a transaction: broker gone")
        self.kafka.committed.extend(self.open)
        self.open = None

    def abort_transaction(self) -> None:
        self.open = None

    def flush(self, timeout: float) -> None:
        pass

    def close(self, timeout: float) -> None:
        self.closed = True


class SlotSource(FakeSource):
    def __init__(self, items: list[Item], **kw: Any) -> None:
        super().__init__(items, **kw)
        self.in_use = 0

    def check_available(self) -> None:
        if self.in_use:
            self.in_use -= 1
            raise SlotInUseError("slot", 42)

    def progress_key(self) -> str:
        return KEY


class Store:
    def __init__(self, kafka: Kafka) -> None:
        self.kafka = kafka
        self.loads = 0

    def load(self, key: str) -> dict[str, Any] | None:
        self.loads += 1
        return self.kafka.record(key)


def run_eos(source: SlotSource, kafka: Kafka, **opts: Any) -> Relay:
    relay = Relay(
        source,
        lambda: TxnSink(kafka),  # type: ignore[arg-type,return-value]
        RelayOptions(
            exactly_once=True,
            progress_topic=TOPIC,
            backoff_initial=0.01,
            backoff_max=0.02,
            standby_poll_interval=0.01,
            **opts,
        ),
        progress_store=Store(kafka),
    )
    source.relay = relay
    t = threading.Thread(target=relay.run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "relay did not stop"
    return relay


def items(n: int) -> list[Item]:
    out: list[Item] = []
    for i in range(1, n + 1):
        out += txn(i * 10, i)
    return out


def test_events_and_progress_commit_together_and_the_source_is_confirmed_after() -> None:
    kafka = Kafka()
    source = SlotSource(items(25))
    run_eos(source, kafka, transaction_max_events=10)
    assert kafka.events() == [str(i).encode() for i in range(1, 26)]
    assert kafka.progress(KEY) == 250
    assert source.confirmed == 250
    progress_records = [r for r in kafka.committed if r.topic == TOPIC]
    assert len(progress_records) >= 3  # at most 10 events per Kafka transaction
    assert json.loads(progress_records[-1].value)["lsn"] == "0/FA"


def test_a_failed_commit_resumes_from_the_committed_progress_without_duplicates() -> None:
    kafka = Kafka()
    kafka.fail_commits = 2
    source = SlotSource(items(30))
    run_eos(source, kafka, transaction_max_events=5)
    assert kafka.events() == [str(i).encode() for i in range(1, 31)]
    assert len(source.opens) >= 3  # reopened after each failed commit


def test_a_crash_after_the_kafka_commit_before_the_slot_confirm_redelivers_nothing() -> None:
    kafka = Kafka()
    first = SlotSource(items(12))
    first.confirm = lambda confirmed, delivered: None  # type: ignore[method-assign]
    run_eos(first, kafka, transaction_max_events=4)
    assert kafka.progress(KEY) == 120
    # the next relay: the slot was never confirmed (it would resend everything), but the
    # progress record says where Kafka is
    second = SlotSource(items(15))
    run_eos(second, kafka, transaction_max_events=4)
    assert second.opens[0] == 120
    assert kafka.events() == [str(i).encode() for i in range(1, 16)]


def test_a_standby_does_not_fence_the_active_relay() -> None:
    kafka = Kafka()
    source = SlotSource(items(3))
    source.in_use = 3  # the slot is active elsewhere for the first three checks
    run_eos(source, kafka)
    assert kafka.epoch == 1, "producers were created while the slot was in use elsewhere"
    assert kafka.events() == [b"1", b"2", b"3"]


def test_a_fenced_relay_steps_down_and_takes_over_again_without_duplicates() -> None:
    kafka = Kafka()
    source = SlotSource(items(20))
    original_commit = TxnSink.commit_transaction
    commits = [0]

    def commit(self: TxnSink, timeout: float) -> None:
        commits[0] += 1
        if commits[0] == 2:  # another relay initialised the same transactional id
            self.kafka.epoch += 1
            source.in_use = 2
        original_commit(self, timeout)

    TxnSink.commit_transaction = commit  # type: ignore[method-assign]
    try:
        run_eos(source, kafka, transaction_max_events=3)
    finally:
        TxnSink.commit_transaction = original_commit  # type: ignore[method-assign]
    assert kafka.events() == [str(i).encode() for i in range(1, 21)]
    assert kafka.epoch >= 3  # fenced once, then a new producer when it took over


def test_an_undecodable_row_goes_to_the_dead_letter_topic_inside_the_transaction() -> None:
    kafka = Kafka()
    bad = EventDecodeError("outbox row cannot be published: type is NULL", seq=2)
    source = SlotSource([*txn(10, 1), BEGIN, bad, Commit(20), *txn(30, 3)])
    run_eos(source, kafka, dead_letter_topic="dlq")
    assert [r.topic for r in kafka.committed if r.topic != TOPIC] == ["t", "dlq", "t"]
    assert kafka.progress(KEY) == 30


def test_an_undecodable_row_without_dead_letter_topic_stops_before_committing_it() -> None:
    kafka = Kafka()
    bad = EventDecodeError("outbox row cannot be published: type is NULL", seq=2)
    source = SlotSource([*txn(10, 1), BEGIN, bad, Commit(20)])
    relay = Relay(
        source,
        lambda: TxnSink(kafka),  # type: ignore[arg-type,return-value]
        RelayOptions(exactly_once=True, progress_topic=TOPIC, transaction_max_events=1),
        progress_store=Store(kafka),
    )
    with pytest.raises(PoisonEventError):
        relay.run()
    assert kafka.progress(KEY) in (None, 10)
    assert source.confirmed <= 10


def test_progress_records_of_other_sources_or_versions_are_ignored() -> None:
    record = Progress(KEY, 4096).record(TOPIC)
    assert parse_progress(KEY, record.value) == {"position": 4096, "state": None}
    with_state = Progress(KEY, 7, {"seqs": [1, 2]}).record(TOPIC)
    assert parse_progress(KEY, with_state.value) == {"position": 7, "state": {"seqs": [1, 2]}}
    assert parse_progress("postgresql/2/db/slot", record.value) is None
    assert parse_progress(KEY, b"not json") is None
    assert (
        parse_progress(KEY, b'{"version": 99, "source": "%s", "position": 1}' % KEY.encode())
        is None
    )
    assert parse_progress(KEY, None) is None
