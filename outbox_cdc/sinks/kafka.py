"""Kafka sink on kafka-python: acks=all, idempotent producer, ordered per key.

What it must not do: acknowledge anything the broker did not acknowledge, swallow an error, or
log a secret (security settings are passed through, never printed).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kafka
import kafka.errors as kerr
from kafka.admin import KafkaAdminClient, NewTopic

from outbox_cdc.errors import (
    ConfigurationError,
    PermanentDeliveryError,
    ProducerFencedError,
    SinkError,
)
from outbox_cdc.events import KafkaRecord
from outbox_cdc.sinks import topics
from outbox_cdc.sinks.base import DeliveryCallback
from outbox_cdc.sinks.security import kafka_python_failures

log = logging.getLogger(__name__)

# Errors a retry with the same record cannot fix (the broker refused the record itself).
_PERMANENT = (
    kerr.MessageSizeTooLargeError,
    kerr.RecordListTooLargeError,
    kerr.AuthorizationError,
    kerr.InvalidTopicError,
    kerr.PolicyViolationError,
    kerr.UnsupportedForMessageFormatError,
    kerr.InvalidRequestError,
    kerr.InvalidRecordError,  # e.g. a compacted topic refusing a record without key
    kerr.CorruptRecordError,
)
_TOO_LARGE = (kerr.MessageSizeTooLargeError, kerr.RecordListTooLargeError)


@dataclass(frozen=True)
class KafkaOptions:
    """Producer and topic settings. ``client_config`` passes extra kafka-python settings
    (security_protocol, sasl_*, ssl_*...) through unchanged."""

    bootstrap_servers: str
    client_id: str = "outbox-cdc"
    linger_ms: int = 5
    batch_size: int = 64 * 1024
    compression_type: str | None = None
    max_in_flight_requests: int = 5
    request_timeout_ms: int = 30_000
    delivery_timeout_ms: int = 120_000
    max_block_ms: int = 10_000
    max_request_size: int = 1024 * 1024 + 64 * 1024
    create_topics: bool = True
    topic_partitions: int = 1
    topic_replication_factor: int = 1
    client_config: Mapping[str, Any] = field(default_factory=dict)
    # exactly-once mode: a stable id per slot, so a new relay fences the old one (KIP-98)
    transactional_id: str | None = None
    transaction_timeout_ms: int = 60_000

    def __post_init__(self) -> None:
        if not 1 <= self.max_in_flight_requests <= 5:
            # Idempotence keeps order with up to 5 requests in flight (KIP-98 / KAFKA-5494).
            raise ConfigurationError(
                "kafka max_in_flight_requests: must be 1..5 for an idempotent, ordered producer"
            )


def classify(exc: BaseException, record: KafkaRecord | None = None) -> SinkError:
    """Map a kafka-python exception to our tree (permanent or retriable)."""
    event_id = record.event_id if record else None
    topic = record.topic if record else None
    name = type(exc).__name__
    if isinstance(exc, _PERMANENT):
        return PermanentDeliveryError(
            f"Kafka refused the record: {name}: {exc}",
            event_id=event_id,
            topic=topic,
            too_large=isinstance(exc, _TOO_LARGE),
        )
    return SinkError(f"Kafka delivery failed: {name}: {exc}")


class KafkaSink:
    """See :class:`outbox_cdc.sinks.base.Sink` for the contract."""

    def __init__(self, options: KafkaOptions) -> None:
        self.options = options
        self._known_topics: set[str] = set()
        self._topic_lock = threading.Lock()
        config: dict[str, Any] = dict(options.client_config)
        config.update(
            bootstrap_servers=options.bootstrap_servers.split(","),
            client_id=options.client_id,
            acks="all",
            enable_idempotence=True,
            max_in_flight_requests_per_connection=options.max_in_flight_requests,
            linger_ms=options.linger_ms,
            batch_size=options.batch_size,
            compression_type=options.compression_type,
            request_timeout_ms=options.request_timeout_ms,
            delivery_timeout_ms=options.delivery_timeout_ms,
            max_block_ms=options.max_block_ms,
            max_request_size=options.max_request_size,
            retries=2**31 - 1,
            allow_auto_create_topics=False,
            # kafka-python backs off up to 30 s between reconnection attempts; after a broker
            # restart that left the relay idle for up to 49 s (measured). The Java client and
            # librdkafka cap it at 1 s and 10 s.
            reconnect_backoff_max_ms=1000,
        )
        if options.transactional_id:
            config.update(
                transactional_id=options.transactional_id,
                transaction_timeout_ms=max(
                    options.transaction_timeout_ms, options.delivery_timeout_ms
                ),
            )
        self._client_config = {k: v for k, v in options.client_config.items()}
        config.setdefault("bootstrap_timeout_ms", options.max_block_ms)
        self._config = config
        self._admin_client: KafkaAdminClient | None = None
        # records handed to the producer and not yet resolved, and whether the producer's
        # failure (see _failed) was already reported
        self._lock = threading.Lock()
        self._pending = 0
        self._fatal_reported = False
        self._collateral = False
        self._producer = self._new_producer()
        if options.transactional_id:
            # Fences any older producer with this id and completes (or aborts) its last
            # transaction, so the progress topic is final before the relay reads it.
            self._transactional(self._producer.init_transactions, "initializing transactions")

    def _new_producer(self) -> kafka.KafkaProducer:
        options = self.options
        try:
            with kafka_python_failures() as failures:
                producer = kafka.KafkaProducer(**self._config)
            # told on every metadata update (the client's IO thread): a topic that disappeared
            # or shrank is checked again before its next record (see _on_metadata)
            producer._metadata.add_listener(self._on_metadata)
            return producer
        except kerr.KafkaTimeoutError:
            raise SinkError(
                f"no Kafka broker answered at {options.bootstrap_servers} "
                f"within {options.max_block_ms} ms" + failures.describe(options.client_config)
            ) from None
        except kerr.KafkaConfigurationError as exc:
            raise ConfigurationError(f"kafka settings: {exc}") from None
        except kerr.KafkaError as exc:
            raise classify(exc) from None

    def _producer_failed(self) -> bool:
        """kafka-python 3.0 puts a non-transactional idempotent producer in a fatal state when
        the broker refuses one batch for good (too large, invalid record, not authorized):
        every later record fails with the same error. The Java client bumps the epoch instead
        and goes on. So does this sink, by replacing the producer (see send and _failed)."""
        if self.options.transactional_id:
            return False  # a transactional producer aborts the transaction instead
        tm = getattr(self._producer, "_transaction_manager", None)
        return bool(tm is not None and tm.has_fatal_error())

    def _replace_failed_producer(self) -> None:
        """Only when the refused record was the last one in flight. Records sent after it fail
        as "not sent" (see _failed), and so does everything until the caller starts over: a
        record sent now on a new producer would overtake them."""
        with self._lock:
            pending, collateral = self._pending, self._collateral
        if pending or collateral:
            raise SinkError(
                "Kafka delivery failed: an earlier refusal left the kafka-python producer in a "
                "failed state with records sent after it; they must be sent again first"
            )
        log.warning("replacing the Kafka producer after a refused record (kafka-python 3.0)")
        old = self._producer
        self._producer = self._new_producer()
        self._fatal_reported = False
        with contextlib.suppress(Exception):
            old.close(timeout=0)

    # -- topics ---------------------------------------------------------------------------------

    def _on_metadata(self, cluster: Any) -> None:
        """kafka-python's metadata listener: a known topic whose partitions are now fewer than
        seen (or missing) leaves ``_known_topics``, so its next record goes through
        :meth:`_ensure_topic`, which raises TopicChangedError. No work per record."""
        try:
            for topic in list(self._known_topics):
                parts = cluster.partitions_for_topic(topic)
                count = len(parts) if parts is not None else None
                if topics.changed(self.options.bootstrap_servers, topic, count):
                    self._known_topics.discard(topic)
        except Exception as exc:  # never break the client's IO thread
            log.debug("checking the topics' metadata failed: %s", exc)

    def _partition_count(self, admin: KafkaAdminClient, topic: str) -> int | None:
        described = admin.describe_topics([topic])
        if not described or described[0].get("error_code"):
            return None
        return len(described[0]["partitions"])

    def _ensure_topic(self, topic: str) -> None:
        with self._topic_lock:
            if topic in self._known_topics:
                return
            admin = self._admin()
            cluster = self.options.bootstrap_servers
            try:
                existing = set(admin.list_topics())
                if topic not in existing:
                    topics.check(cluster, topic, None)  # raises if it was seen before
                    if not self.options.create_topics:
                        raise PermanentDeliveryError(
                            "topic does not exist and topic creation is off "
                            "(create it, or enable kafka create_topics)",
                            topic=topic,
                        )
                    try:
                        admin.create_topics(
                            [
                                NewTopic(
                                    topic,
                                    num_partitions=self.options.topic_partitions,
                                    replication_factor=self.options.topic_replication_factor,
                                )
                            ]
                        )
                        log.info(
                            "created Kafka topic %s (%d partitions, replication %d)",
                            topic,
                            self.options.topic_partitions,
                            self.options.topic_replication_factor,
                        )
                    except kerr.TopicAlreadyExistsError:
                        pass
                partitions = self._partition_count(admin, topic)
            except kerr.UnknownTopicOrPartitionError:
                partitions = None
            except kerr.KafkaError as exc:
                self._close_admin()
                raise classify(exc) from None
            if partitions is None and topics.expected(cluster, topic) is None:
                # just created and not described yet: it has what we asked for
                partitions = self.options.topic_partitions
            topics.check(cluster, topic, partitions)
            self._known_topics.add(topic)

    def _admin(self) -> KafkaAdminClient:
        """One admin client per sink, created on the first unknown topic."""
        if self._admin_client is not None:
            return self._admin_client
        try:
            with kafka_python_failures() as failures:
                self._admin_client = KafkaAdminClient(
                    bootstrap_servers=self.options.bootstrap_servers.split(","),
                    client_id=f"{self.options.client_id}-admin",
                    request_timeout_ms=self.options.request_timeout_ms,
                    bootstrap_timeout_ms=self.options.max_block_ms,
                    **{
                        k: v
                        for k, v in self._client_config.items()
                        if k.startswith(("security_", "sasl_", "ssl_"))
                    },
                )
        except kerr.KafkaError as exc:
            raise SinkError(
                f"Kafka admin client could not connect to {self.options.bootstrap_servers}: "
                f"{type(exc).__name__}" + failures.describe(self._client_config)
            ) from None
        return self._admin_client

    def _close_admin(self) -> None:
        admin, self._admin_client = self._admin_client, None
        if admin is not None:
            try:
                admin.close()
            except Exception as exc:  # closing must not mask the error that made us close
                log.debug("closing the Kafka admin client failed: %s", exc)

    # -- Sink -----------------------------------------------------------------------------------

    def send(self, record: KafkaRecord, on_done: DeliveryCallback) -> None:
        if self._producer_failed():
            self._replace_failed_producer()
        if record.topic not in self._known_topics:
            try:
                self._ensure_topic(record.topic)
            except PermanentDeliveryError as exc:
                raise _with_event(exc, record) from None
        try:
            future = self._producer.send(
                record.topic, value=record.value, key=record.key, headers=record.headers
            )
        except kerr.KafkaError as exc:
            raise classify(exc, record) from None
        except (ValueError, TypeError, AssertionError) as exc:
            # kafka-python checks some records itself (e.g. an internal topic name) and raises
            # plain exceptions: the record can never be sent
            raise PermanentDeliveryError(
                f"the Kafka client refused the record: {type(exc).__name__}: {exc}",
                event_id=record.event_id,
                topic=record.topic,
            ) from None
        with self._lock:
            self._pending += 1
        future.add_callback(self._ok, on_done)
        future.add_errback(self._failed, on_done, record)

    def _ok(self, on_done: DeliveryCallback, _metadata: object) -> None:
        try:
            on_done(None)
        finally:
            self._resolved()

    def _resolved(self) -> None:
        # after on_done: "nothing pending" then means every outcome reached the caller
        with self._lock:
            self._pending -= 1

    def _failed(self, on_done: DeliveryCallback, record: KafkaRecord, exc: BaseException) -> None:
        """Runs on kafka-python's IO thread. Once the producer is in its fatal state, the first
        failure reported is the refusal that caused it (its batch fails before any other), and
        so is any record exception the broker named individually (KIP-467); every other record
        failing with the producer's stored error was only caught in the fall: not sent, so not
        refused (retriable)."""
        with self._lock:
            collateral = False
            if self._producer_failed():
                tm = self._producer._transaction_manager
                collateral = self._fatal_reported and exc is tm.last_error
                self._fatal_reported = True
                self._collateral = self._collateral or collateral
        try:
            if collateral:
                on_done(
                    SinkError(
                        "Kafka delivery failed: not sent, an earlier refusal left the "
                        f"kafka-python producer in a failed state ({type(exc).__name__})"
                    )
                )
            else:
                on_done(classify(exc, record))
        finally:
            self._resolved()

    def oldest_unacknowledged(self) -> tuple[str, int, float] | None:
        """Topic, partition and age (seconds) of the oldest batch the broker has not
        acknowledged, from kafka-python's accumulator (for a warning: never on the hot path);
        None when nothing is pending or the client does not tell."""
        try:
            batches = self._producer._accumulator._incomplete.all()
            if not batches:
                return None
            oldest = min(batches, key=lambda b: b.created)
            tp = oldest.topic_partition
            return str(tp.topic), int(tp.partition), time.monotonic() - float(oldest.created)
        except Exception:  # internals of another kafka-python version: say nothing
            return None

    # -- transactions (exactly-once mode) -------------------------------------------------------

    def _transactional(self, call: Any, what: str) -> None:
        try:
            call()
        except (kerr.ProducerFencedError, kerr.InvalidProducerEpochError) as exc:
            raise ProducerFencedError(
                f"Kafka fenced this relay's transactional id while {what} "
                f"({type(exc).__name__}): another relay took over"
            ) from None
        except kerr.KafkaTimeoutError:
            raise SinkError(f"Kafka timed out {what}") from None
        except kerr.KafkaError as exc:
            raise SinkError(f"Kafka failed {what}: {type(exc).__name__}: {exc}") from None

    def begin_transaction(self) -> None:
        self._transactional(self._producer.begin_transaction, "beginning a transaction")

    def commit_transaction(self, timeout: float) -> None:
        """Flush (at most ``timeout``), then commit: every record of the transaction becomes
        visible to read_committed consumers at once, or none does."""
        try:
            self._producer.flush(timeout=timeout)
        except kerr.KafkaTimeoutError:
            raise SinkError(
                f"Kafka did not acknowledge the transaction within {timeout:.0f}s"
            ) from None
        except kerr.KafkaError as exc:
            raise classify(exc) from None
        self._transactional(self._producer.commit_transaction, "committing a transaction")

    def abort_transaction(self) -> None:
        self._transactional(self._producer.abort_transaction, "aborting a transaction")

    def flush(self, timeout: float) -> None:
        try:
            self._producer.flush(timeout=timeout)
        except kerr.KafkaTimeoutError:
            pass  # the contract: wait at most ``timeout``; what is pending stays pending
        except kerr.KafkaError as exc:
            raise classify(exc) from None

    def close(self, timeout: float) -> None:
        self._close_admin()
        try:
            self._producer.close(timeout=timeout)
        except Exception as exc:  # closing must not mask the error that made us close
            log.debug("closing the Kafka producer failed: %s", exc)
            # kafka-python's close() raises from its flush when records are still pending and
            # leaves the producer half open; its __del__ then raises again at exit ("Exception
            # ignored in KafkaProducer.__del__"). Finish the close by hand: those records are
            # unacknowledged, so nothing was confirmed for them.
            sender = getattr(self._producer, "_sender", None)
            if sender is not None:
                with contextlib.suppress(Exception):
                    sender.force_close()
            self._producer._closed = True


def _with_event(exc: PermanentDeliveryError, record: KafkaRecord) -> PermanentDeliveryError:
    """The same refusal, naming the event (a topic is checked before any record is sent)."""
    message = str(exc).split(" (topic ", 1)[0]
    return PermanentDeliveryError(
        message, event_id=record.event_id, topic=record.topic, too_large=exc.too_large
    )
