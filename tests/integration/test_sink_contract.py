"""The Sink contract (outbox_cdc/sinks/base.py) against a real broker, for every backend:
kafka-python (KafkaSink) and confluent-kafka (ConfluentSink, skipped when not installed).

What a backend must do, whatever its library: acknowledge (``on_done(None)``) only what the
broker acknowledged, exactly once per record; keep per-key order, in the partition the Java
client's murmur2 hash picks (so that switching backends keeps it); refuse for good, naming the
event, what the broker can never take; fail retriably and quickly when no broker answers; never
wait longer than asked in ``flush``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator

import pytest
from kafka.partitioner.default import murmur2

from outbox_cdc.errors import PermanentDeliveryError, SinkError
from outbox_cdc.events import KafkaRecord
from outbox_cdc.sinks.base import Sink
from outbox_cdc.sinks.kafka import KafkaOptions, KafkaSink
from tests.support.kafka import consume_all

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(120)]

SinkFactory = Callable[..., Sink]


def _confluent(options: KafkaOptions) -> Sink:
    pytest.importorskip("confluent_kafka", reason="the confluent extra is not installed")
    from outbox_cdc.sinks.confluent import ConfluentSink

    return ConfluentSink(options)


BACKENDS: dict[str, Callable[[KafkaOptions], Sink]] = {
    "kafka-python": KafkaSink,
    "confluent": _confluent,
}


@pytest.fixture(params=list(BACKENDS))
def make_sink(request: pytest.FixtureRequest, kafka_bootstrap: str) -> Iterator[SinkFactory]:
    """``make_sink(**options)``: a sink of this backend on the test broker; closed at teardown."""
    made: list[Sink] = []

    def make(**options: object) -> Sink:
        options.setdefault("bootstrap_servers", kafka_bootstrap)
        opts = KafkaOptions(**options)  # type: ignore[arg-type]
        sink = BACKENDS[request.param](opts)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close(5)


class Completions:
    """Collects on_done calls per event id, from any thread."""

    def __init__(self) -> None:
        self.calls: dict[str, list[BaseException | None]] = defaultdict(list)
        self._lock = threading.Lock()

    def callback(self, event_id: str) -> Callable[[BaseException | None], None]:
        def on_done(exc: BaseException | None) -> None:
            with self._lock:
                self.calls[event_id].append(exc)

        return on_done

    def wait(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(len(v) for v in self.calls.values()) < count and time.monotonic() < deadline:
            time.sleep(0.02)


def record(topic: str, n: int, key: str | None = "k", size: int = 0) -> KafkaRecord:
    return KafkaRecord(
        topic=topic,
        key=None if key is None else key.encode(),
        value=f"value-{n}".encode() + b"x" * size,
        headers=[("ce_id", f"id-{n}".encode()), ("n", str(n).encode()), ("empty", b"")],
        event_id=f"id-{n}",
    )


def send_refused(sink: Sink, rec: KafkaRecord, done: Completions) -> BaseException | None:
    """What the contract allows for a record the broker can never take: ``send`` raises, or
    ``on_done`` is called with the error."""
    try:
        sink.send(rec, done.callback(rec.event_id))
    except SinkError as exc:
        return exc
    sink.flush(30)
    done.wait(1, 30)
    calls = done.calls[rec.event_id]
    assert len(calls) == 1, calls
    return calls[0]


def test_acked_records_are_readable_back_with_key_value_headers(
    make_sink: SinkFactory, kafka_bootstrap: str, kafka_topic: str
) -> None:
    sink = make_sink()
    done = Completions()
    sent = [record(kafka_topic, n, key=None if n % 5 == 0 else f"key-{n % 3}") for n in range(50)]
    for rec in sent:
        sink.send(rec, done.callback(rec.event_id))
    sink.flush(30)
    done.wait(len(sent), 10)
    assert {eid: calls for eid, calls in done.calls.items()} == {
        rec.event_id: [None] for rec in sent
    }, "on_done must be called exactly once per record, with None"
    got = consume_all(kafka_bootstrap, kafka_topic, len(sent), timeout=30, settle=1)
    assert len(got) == len(sent)
    by_id = {dict(r.headers)["ce_id"].decode(): r for r in got}
    for rec in sent:
        back = by_id[rec.event_id]
        assert back.key == rec.key
        assert back.value == rec.value
        assert [(k, bytes(v)) for k, v in back.headers] == rec.headers


def test_per_key_order_across_4_partitions_in_the_java_clients_partition(
    make_sink: SinkFactory, kafka_bootstrap: str, kafka_topic: str
) -> None:
    """500 records over 40 keys into a topic the sink creates with 4 partitions: per key, one
    partition (the one murmur2 picks, like the Java client and kafka-python) and send order."""
    sink = make_sink(topic_partitions=4, linger_ms=20, max_in_flight_requests=5)
    done = Completions()
    keys = [f"order-{i}" for i in range(40)]
    sent = [record(kafka_topic, n, key=keys[n % len(keys)]) for n in range(500)]
    for rec in sent:
        sink.send(rec, done.callback(rec.event_id))
    sink.flush(30)
    done.wait(len(sent), 10)
    assert Counter(len(c) for c in done.calls.values()) == Counter({1: len(sent)})
    assert all(c == [None] for c in done.calls.values())
    got = consume_all(kafka_bootstrap, kafka_topic, len(sent), timeout=30, settle=1)
    assert len(got) == len(sent)
    order: dict[bytes, list[int]] = defaultdict(list)
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for r in sorted(got, key=lambda r: (r.partition, r.offset)):
        order[r.key].append(int(dict(r.headers)["n"]))
        partitions[r.key].add(r.partition)
    assert {p for ps in partitions.values() for p in ps} == {0, 1, 2, 3}
    for key, ns in order.items():
        assert ns == sorted(ns), f"key {key!r} out of order"
        assert partitions[key] == {(murmur2(key) & 0x7FFFFFFF) % 4}, key


def test_record_larger_than_max_request_size_is_refused_for_good_naming_the_event(
    make_sink: SinkFactory, kafka_topic: str
) -> None:
    sink = make_sink(max_request_size=100_000)
    done = Completions()
    ok = record(kafka_topic, 1)
    sink.send(ok, done.callback(ok.event_id))
    big = record(kafka_topic, 2, size=200_000)
    exc = send_refused(sink, big, done)
    assert isinstance(exc, PermanentDeliveryError), repr(exc)
    assert exc.event_id == big.event_id
    assert big.event_id in str(exc)
    sink.flush(30)
    done.wait(len(done.calls), 10)
    assert done.calls[ok.event_id] == [None]


def test_missing_topic_with_topic_creation_off_is_refused_for_good(
    make_sink: SinkFactory, kafka_topic: str
) -> None:
    sink = make_sink(create_topics=False)
    done = Completions()
    exc = send_refused(sink, record(kafka_topic, 1), done)
    assert isinstance(exc, PermanentDeliveryError), repr(exc)
    assert exc.topic == kafka_topic


def test_unreachable_bootstrap_is_a_retriable_error_within_max_block_ms(
    make_sink: SinkFactory,
) -> None:
    def make_and_send() -> None:  # the construction or the first send may raise
        sink = make_sink(bootstrap_servers="127.0.0.1:1", max_block_ms=1000)
        sink.send(record(f"t_{uuid.uuid4().hex}", 1), lambda exc: None)

    t0 = time.monotonic()
    with pytest.raises(SinkError) as info:
        make_and_send()
    elapsed = time.monotonic() - t0
    assert info.value.retriable
    assert not isinstance(info.value, PermanentDeliveryError)
    assert elapsed < 5, f"took {elapsed:.1f}s with max_block_ms=1000"


def test_flush_returns_within_its_timeout_and_completes_later(
    make_sink: SinkFactory, kafka_topic: str
) -> None:
    """30 MB handed to the producer at once, then flush(0.05): it returns after about 0.05 s
    without raising (what is pending stays pending); a later flush completes every record,
    each exactly once with None."""
    sink = make_sink(topic_partitions=4, max_request_size=200_000, batch_size=200_000)
    done = Completions()
    sent = [record(kafka_topic, n, key=f"k{n % 100}", size=60_000) for n in range(500)]
    for rec in sent:
        sink.send(rec, done.callback(rec.event_id))
    t0 = time.monotonic()
    sink.flush(0.05)
    elapsed = time.monotonic() - t0
    pending = len(sent) - len(done.calls)
    print(f"flush(0.05): {elapsed:.3f}s, {pending} of {len(sent)} records still pending")
    assert elapsed < 0.05 + 0.5, f"flush(0.05) took {elapsed:.2f}s"
    sink.flush(60)
    done.wait(len(sent), 10)
    assert len(done.calls) == len(sent)
    assert all(c == [None] for c in done.calls.values())
