"""Fault scenarios an operator causes (issue 24): a topic deleted under a running relay, and the
outbox table's privileges revoked from the polling relay's role. They disturb only their own
topic, table and role (marker ``fault_proxy``, so CI runs them next to the other fault files);
neither uses the fixed-port Kafka proxy.

A topic deleted under load loses, with it, what Kafka had acknowledged into it: that is the
operator's doing, not the relay's. To tell the two apart the scenario pauses the relay
(SIGSTOP) for the moment of the deletion, until the checker's tail has read everything the
topic held; the load goes on meanwhile, and the relay goes on, into the deleted topic, right
after it. *Lost* then means: committed and never seen by the tail in any generation of the
topic.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError

from tests.acceptance.conftest import POSTGRES
from tests.acceptance.faults import Relays
from tests.acceptance.harness import (
    Arrivals,
    Database,
    LoadGenerator,
    check,
    ensure_topic,
    read_topic,
    report,
    wait_until,
)
from tests.support.kafka import delete_topic

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.kafka, pytest.mark.timeout(300)]

IN_FLIGHT = 500


class TopicTail:
    """Every record of ``topic`` in arrival order (ConsumerRecords), across deletions and
    re-creations: ``pause()`` before the topic is deleted (the consumer is closed: nothing of
    the tail asks for the deleted topic, which could make the broker auto-create it), then
    ``resume()`` reads the new one from its beginning. Never creates the topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.records: list[Any] = []
        self.first_seen: dict[str, float] = {}
        self._generation = 0
        self._stop = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._idle = threading.Event()
        self._lock = threading.Lock()
        self._positions: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, name="topic-tail", daemon=True)

    def start(self) -> TopicTail:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def pause(self) -> None:
        with self._lock:
            self._generation += 1
            self._running.clear()
        assert self._idle.wait(10), "the tail did not pause"

    def resume(self) -> None:
        self._running.set()

    def caught_up(self) -> bool:
        """The tail has read up to the end offsets of the topic as it is now."""
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, allow_auto_create_topics=False, group_id=None
        )
        try:
            parts = consumer.partitions_for_topic(self.topic) or set()
            ends = consumer.end_offsets([TopicPartition(self.topic, p) for p in parts])
        finally:
            consumer.close()
        with self._lock:
            return all(self._positions.get(tp.partition, 0) >= end for tp, end in ends.items())

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._running.is_set():
                self._idle.set()
                self._running.wait(0.2)
                continue
            self._idle.clear()
            try:
                self._tail()
            except Exception:
                time.sleep(0.2)

    def _tail(self) -> None:
        with self._lock:
            generation = self._generation
            self._positions = {}
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            reconnect_backoff_max_ms=500,
            client_id="outbox-cdc-acceptance-topic-tail",
        )
        try:
            while not consumer.partitions_for_topic(self.topic):
                if self._stop.is_set() or generation != self._generation:
                    return
                time.sleep(0.2)
                consumer.topics()
            tps = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            while not self._stop.is_set() and generation == self._generation:
                batch = consumer.poll(timeout_ms=100)
                now = time.time()
                with self._lock:
                    if generation != self._generation:
                        return  # records of a topic deleted since: already read
                    for tp, recs in batch.items():
                        for rec in recs:
                            self.records.append(rec)
                            event_id = next(
                                (bytes(v).decode() for k, v in rec.headers if k == "ce_id"), None
                            )
                            if event_id:
                                self.first_seen.setdefault(event_id, now)
                        self._positions[tp.partition] = recs[-1].offset + 1
        finally:
            consumer.close()


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="outbox-cdc-acceptance")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                admin.create_topics([NewTopic(topic, partitions, 1)])
                return
            except TopicAlreadyExistsError:
                described = admin.describe_topics([topic])
                if len(described[0]["partitions"]) == partitions:
                    return  # the broker's auto-create was quicker (num.partitions=1)
                # the deletion is still in progress: wait
                assert time.monotonic() < deadline, (
                    f"topic {topic} still exists: {admin.describe_topics([topic])}"
                )
                time.sleep(0.2)
    finally:
        admin.close()


def _delete_topic_now(bootstrap: str, topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="outbox-cdc-acceptance")
    try:
        response = admin.delete_topics([topic])
        errors = [t for t in response.get("topics", []) if t.get("error_code")]
        assert not errors, response
    except UnknownTopicOrPartitionError:
        pass
    finally:
        admin.close()


def test_topic_deleted_under_load_stops_the_relay_and_a_restart_after_the_fix_loses_nothing(
    relays: Relays,
    postgres_url: str,
    kafka_bootstrap: str,
    outbox_table: str,
    kafka_topic: str,
) -> None:
    """A 3-partition topic, 200 events/s, ``max_in_flight_events=500``. The topic is deleted
    and re-created with 1 partition (what the broker's auto-create does, with its default
    ``num.partitions=1``; done by the test so that it happens every time). The relay must stop
    with an error that names the topic and both partition counts, having confirmed nothing past
    its unacknowledged events; the operator re-creates the topic with 3 partitions and
    restarts the relay: every committed event arrives, duplicates stay within the in-flight
    limit (plus one source transaction), first copies keep per-key order."""
    t0 = time.monotonic()
    topic = f"{kafka_topic}-3p"
    ensure_topic(kafka_bootstrap, topic, partitions=3)
    tail = TopicTail(kafka_bootstrap, topic).start()
    sources = ["topic-run1", "topic-run2"]
    relay = relays(
        max_in_flight_events=IN_FLIGHT,
        kafka_topic_partitions=3,
        shutdown_timeout=5,
    )
    load = LoadGenerator(
        postgres_url, outbox_table, topic, events=200 * 40, keys=200, threads=4, rate=200
    )
    try:
        relay.start(source_name=sources[0])
        relay.wait_streaming()
        load.start()
        load.wait_written(200 * 8, timeout=30)
        # the deletion, with the relay paused until the tail has read what the topic holds
        relay.signal(signal.SIGSTOP)
        time.sleep(0.5)
        wait_until(tail.caught_up, timeout=20, what="the tail to read the whole topic")
        tail.pause()
        _delete_topic_now(kafka_bootstrap, topic)
        deleted_at = time.monotonic()
        _create_topic(kafka_bootstrap, topic, 1)  # the broker's auto-create, in effect
        tail.resume()
        relay.signal(signal.SIGCONT)
        code = relay.wait(60)
        stopped_after = time.monotonic() - deleted_at
        log = relay.log_text()
        error = next(line for line in log.splitlines() if "shrank from 3 to 1" in line)
        # the operator's fix: the topic again with 3 partitions (what the tail read of the
        # 1-partition one is kept), then a restart
        time.sleep(0.5)
        wait_until(tail.caught_up, timeout=20, what="the tail to read the 1-partition topic")
        tail.pause()
        _delete_topic_now(kafka_bootstrap, topic)
        _create_topic(kafka_bootstrap, topic, 3)
        tail.resume()
        restarted_at = time.time()
        relay.start(source_name=sources[1])
        relay.wait_streaming()
        result = load.join(timeout=120)
        wait_until(
            lambda: all(i in tail.first_seen for i in result.committed),
            timeout=60,
            what="every committed event to arrive",
        )
        time.sleep(2)  # duplicates still on their way
        tail.stop()
        res = check(tail.records, result, sources=sources)
        # until every event committed before the restart had arrived
        recovered = (
            max(
                [restarted_at]
                + [
                    tail.first_seen[i]
                    for i, w in result.committed.items()
                    if w.written_at < restarted_at
                ]
            )
            - restarted_at
        )
        report(
            "topic deleted under load, re-created with 1 partition",
            committed=len(result.committed),
            exit_code=code,
            stopped_after_deletion_s=f"{stopped_after:.1f}",
            duplicates=res.duplicates,
            duplicate_bound=IN_FLIGHT + load.max_batch,
            recovered_after_restart_s=f"{recovered:.1f}",
            total_s=f"{time.monotonic() - t0:.1f}",
            error_line=error[:160],
            check=res.summary(),
        )
        assert code not in (0, None), log
        assert "partitions" in error and "auto.create.topics.enable=false" in error
        assert "ERROR" in error
        res.assert_complete()
        assert res.duplicates <= IN_FLIGHT + load.max_batch, res.summary()
    finally:
        tail.stop()
        relay.kill()
        delete_topic(kafka_bootstrap, topic)


@pytest.mark.parametrize("polling_backend", [POSTGRES], indirect=True)
def test_privileges_revoked_from_the_polling_role_for_30s_log_a_few_lines_and_lose_nothing(
    polling_relays: Relays,
    polling_db: Database,
    polling_table: str,
    postgres_admin_url: str,
    kafka_bootstrap: str,
    topic: str,
    unique_name: Callable[[str], str],
) -> None:
    """The polling relay (PostgreSQL, its own role with the documented grants) under 200
    events/s; an operator revokes the role's privileges on the outbox table for 30 s, then
    grants them back. Every poll fails meanwhile (permission denied): the relay retries with a
    growing backoff and logs the failure once (its first reconnect once, a reminder a minute),
    not twice a second; after the grant it delivers everything, nothing lost, in key order."""
    t0 = time.monotonic()
    role, password = unique_name("poller"), uuid.uuid4().hex
    grant = f"GRANT SELECT, DELETE, UPDATE (published_at) ON {polling_table} TO {role}"
    revoke = f"REVOKE SELECT, DELETE, UPDATE ON {polling_table} FROM {role}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(grant)
    u = urlsplit(polling_db.url)
    url = urlunsplit(
        (u.scheme, f"{role}:{password}@{u.hostname}:{u.port}", u.path, u.query, u.fragment)
    )
    relay = polling_relays(database_url=url, poll_batch_size=500)
    arrivals = Arrivals(kafka_bootstrap, topic)
    try:
        relay.start()
        relay.wait_streaming()
        arrivals.start()
        load = LoadGenerator(
            polling_db, polling_table, topic, events=200 * 45, keys=200, threads=4, rate=200
        ).start()
        load.wait_written(200 * 3, timeout=30)
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(revoke)
        revoked_at = time.monotonic()
        log_before = len(relay.log_text())
        time.sleep(30)
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(grant)
        granted_at, revoked_for = time.time(), time.monotonic() - revoked_at
        during = relay.log_text()[log_before:]
        error_lines = [line for line in during.splitlines() if " ERROR " in line]
        result = load.join(timeout=120)
        records = read_topic(
            kafka_bootstrap, topic, expect_ids=result.committed, timeout=90, settle=2
        )
        res = check(records, result)
        before_grant = [w for w in result.committed.values() if w.written_at < granted_at]
        recovered = arrivals.recovered_after(granted_at, before_grant, timeout=60)
        report(
            "polling (PostgreSQL): privileges revoked 30s",
            committed=len(result.committed),
            revoked_s=f"{revoked_for:.1f}",
            error_lines_while_revoked=len(error_lines),
            lines_while_revoked=len(during.splitlines()),
            duplicates=res.duplicates,
            recovered_after_grant_s=None if recovered is None else f"{recovered:.1f}",
            total_s=f"{time.monotonic() - t0:.1f}",
            first_error=error_lines[0][:160] if error_lines else None,
            log_while_revoked=[line[11:23] + line[23:110] for line in during.splitlines()],
            check=res.summary(),
        )
        assert relay.running, relay.log_text()
        assert error_lines and "permission denied" in error_lines[0], during
        assert len(error_lines) <= 6, "\n".join(error_lines)
        assert len(during.splitlines()) <= 12, during
        res.assert_complete()
        assert res.duplicates <= 500, res.summary()
        # the backoff may have reached its maximum (30 s) just before the grant
        assert recovered is not None and recovered < 40, recovered
    finally:
        arrivals.stop()
        relay.kill()
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
