"""Exactly-once mode's durable progress: the last source position delivered, written to a
compacted Kafka topic inside the same Kafka transaction as the events (so both are visible
together or not at all), and read back with ``read_committed`` when the relay starts.

The record's key names the source (PostgreSQL system identifier, database, slot), so a record
from another database or slot is never taken for ours; its value is JSON. Only the relay writes
it; nobody needs to read it but the relay (and an operator, with any console consumer).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from outbox_cdc.errors import SinkError
from outbox_cdc.events import KafkaRecord
from outbox_cdc.protocol.lsn import format_lsn

log = logging.getLogger(__name__)

PROGRESS_VERSION = 1


@dataclass(frozen=True)
class Progress:
    """``position``: the source's position after the transaction (WAL: commit LSN); ``state``:
    what else the source needs to resume (polling: the seqs of the batch)."""

    key: str
    position: int
    state: dict[str, Any] | None = None

    def record(self, topic: str) -> KafkaRecord:
        value: dict[str, Any] = {
            "version": PROGRESS_VERSION,
            "source": self.key,
            "position": self.position,
            "written_at": datetime.now(UTC).isoformat(),
        }
        if self.key.startswith("postgresql/"):
            value["lsn"] = format_lsn(self.position)
        if self.state:
            value["state"] = self.state
        return KafkaRecord(
            topic=topic,
            key=self.key.encode(),
            value=json.dumps(value, separators=(",", ":")).encode(),
            headers=[],
            event_id="",
        )


def parse_progress(key: str, value: bytes | None) -> dict[str, Any] | None:
    """A progress record of ``key`` (``position``, and ``state`` if any), or None (deleted,
    foreign, unreadable)."""
    if value is None:
        return None
    try:
        obj = json.loads(value)
        if obj.get("version") != PROGRESS_VERSION or obj.get("source") != key:
            return None
        position = obj["position"]
        if not isinstance(position, int) or position < 0:
            return None
        state = obj.get("state")
        return {"position": position, "state": state if isinstance(state, dict) else None}
    except (ValueError, KeyError, AttributeError):
        return None


class ProgressStore:
    """Reads the last committed progress record of a key (kafka-python consumer, whatever the
    relay's Kafka client), creating the compacted topic if it is missing."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        client_config: dict[str, Any] | None = None,
        timeout: float = 30.0,
        replication_factor: int = 1,
    ) -> None:
        self.bootstrap = bootstrap_servers.split(",")
        self.replication_factor = replication_factor
        self.topic = topic
        self.client_config = {
            k: v
            for k, v in (client_config or {}).items()
            if k.startswith(("security_", "sasl_", "ssl_"))
        }
        self.timeout = timeout

    def load(self, key: str) -> dict[str, Any] | None:
        import kafka.errors as kerr
        from kafka import KafkaConsumer, TopicPartition

        self._ensure_topic()
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.bootstrap,
                client_id="outbox-cdc-progress",
                group_id=None,
                enable_auto_commit=False,
                isolation_level="read_committed",
                request_timeout_ms=int(self.timeout * 1000) + 5000,
                **self.client_config,
            )
        except kerr.KafkaError as exc:
            raise SinkError(f"cannot read the progress topic: {type(exc).__name__}") from None
        try:
            deadline = time.monotonic() + self.timeout
            partitions = None
            while not partitions:
                partitions = consumer.partitions_for_topic(self.topic)
                if time.monotonic() > deadline:
                    raise SinkError(f"progress topic {self.topic} has no partitions yet")
                if not partitions:
                    time.sleep(0.2)
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            # read_committed: the end is the last stable offset, after every settled transaction
            ends = consumer.end_offsets(tps)
            found: dict[str, Any] | None = None
            wanted = key.encode()
            while any(consumer.position(tp) < ends[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise SinkError(f"reading the progress topic {self.topic} timed out")
                for records in consumer.poll(timeout_ms=500).values():
                    for rec in records:
                        if rec.key == wanted:
                            found = parse_progress(key, rec.value) if rec.value else None
            return found
        except kerr.KafkaError as exc:
            raise SinkError(f"reading the progress topic failed: {type(exc).__name__}") from None
        finally:
            consumer.close()

    def _ensure_topic(self) -> None:
        import kafka.errors as kerr
        from kafka.admin import KafkaAdminClient, NewTopic

        from outbox_cdc.sinks.security import kafka_python_failures

        try:
            with kafka_python_failures() as failures:
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    client_id="outbox-cdc-progress-admin",
                    request_timeout_ms=int(self.timeout * 1000),
                    **self.client_config,
                )
        except kerr.KafkaError as exc:
            raise SinkError(
                f"cannot reach Kafka for the progress topic: {type(exc).__name__}"
                + failures.describe(self.client_config)
            ) from None
        try:
            if self.topic in set(admin.list_topics()):
                return
            try:
                admin.create_topics(
                    [
                        NewTopic(
                            self.topic,
                            num_partitions=1,
                            replication_factor=self.replication_factor,
                            topic_configs={"cleanup.policy": "compact"},
                        )
                    ]
                )
                log.info("created the progress topic %s (compacted)", self.topic)
            except kerr.TopicAlreadyExistsError:
                pass
        except kerr.KafkaError as exc:
            raise SinkError(f"cannot create the progress topic: {type(exc).__name__}") from None
        finally:
            admin.close()
