"""ConfluentSink without a broker: its configuration and its error classification (the same
split as kafka-python's ``classify``). Skipped when the confluent extra is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("confluent_kafka")

from confluent_kafka import KafkaError

from outbox_cdc.errors import ConfigurationError, PermanentDeliveryError, SinkError
from outbox_cdc.events import KafkaRecord
from outbox_cdc.sinks.confluent import ConfluentSink, classify_error, producer_config
from outbox_cdc.sinks.kafka import KafkaOptions

RECORD = KafkaRecord("orders", b"k", b"v", [], "event-1")


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError._INVALID_ARG,
        KafkaError.POLICY_VIOLATION,
        KafkaError.INVALID_RECORD,
    ],
)
def test_refusals_are_permanent_and_name_the_event(code: int) -> None:
    exc = classify_error(KafkaError(code), RECORD)
    assert isinstance(exc, PermanentDeliveryError)
    assert not exc.retriable
    assert exc.event_id == "event-1"
    assert exc.topic == "orders"
    assert "event-1" in str(exc)


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._PURGE_QUEUE,
    ],
)
def test_transient_errors_are_retriable(code: int) -> None:
    exc = classify_error(KafkaError(code), RECORD)
    assert type(exc) is SinkError
    assert exc.retriable


def test_unknown_topic_is_permanent_only_when_topic_creation_is_off() -> None:
    for code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        assert isinstance(
            classify_error(KafkaError(code), RECORD, topics_created=False), PermanentDeliveryError
        )
        assert type(classify_error(KafkaError(code), RECORD, topics_created=True)) is SinkError


def test_a_fatal_error_is_retriable_so_the_relay_builds_a_new_producer() -> None:
    """librdkafka: after a fatal (idempotence) error the instance is unusable; the relay
    replaces the sink on a retriable SinkError."""
    for err in (
        KafkaError(KafkaError._FATAL),
        KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, fatal=True),
        KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, fatal=True),
    ):
        exc = classify_error(err, RECORD)
        assert type(exc) is SinkError, err
        assert exc.retriable
        assert "fatal" in str(exc)


def test_producer_config_keeps_the_guarantees_and_maps_security_settings() -> None:
    options = KafkaOptions(
        bootstrap_servers="a:9092,b:9092",
        max_in_flight_requests=3,
        delivery_timeout_ms=60_000,
        max_request_size=2_000_000,
        compression_type="zstd",
        client_config={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": "relay",
            "sasl_plain_password": "s3cret",
            "ssl_cafile": "/etc/ca.pem",
            "ssl_certfile": None,
        },
    )
    config = producer_config(options)
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"
    assert config["max.in.flight.requests.per.connection"] == 3
    assert config["message.timeout.ms"] == 60_000
    assert config["message.max.bytes"] == 2_000_000
    assert config["compression.type"] == "zstd"
    assert config["allow.auto.create.topics"] is False
    assert config["partitioner"] == "murmur2_random"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == "relay"
    assert config["sasl.password"] == "s3cret"
    assert config["ssl.ca.location"] == "/etc/ca.pem"
    assert "ssl.certificate.location" not in config


def test_in_flight_requests_above_5_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="max_in_flight_requests"):
        ConfluentSink(KafkaOptions(bootstrap_servers="a:9092", max_in_flight_requests=6))
