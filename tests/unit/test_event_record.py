"""The one mapping of an event to a Kafka record (CloudEvents Kafka binary binding), and the
storage forms an event passes through on its way (headers JSON, table-less envelope)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from outbox_cdc import KafkaRecord, Outbox, OutboxEvent, to_record
from outbox_cdc.errors import EventDecodeError
from outbox_cdc.events import (
    DEFAULT_SOURCE,
    envelope_from_json,
    envelope_to_json,
    format_time,
    headers_from_obj,
    headers_to_json,
    parse_time,
)

EVENT_ID = uuid.UUID("0b8f6a4e-8a8e-4b8e-9f52-6c1d2e3f4a5b")
WHEN = datetime(2026, 11, 26, 7, 5, 19, 123456, tzinfo=UTC)


def event(**changes: object) -> OutboxEvent:
    fields: dict[str, object] = {
        "id": EVENT_ID,
        "created_at": WHEN,
        "topic": "orders.v1",
        "type": "order.created",
        "payload": b'{"id":42}',
        "content_type": "application/json",
        "key": "order-42",
        "headers": (("tenant", b"acme"), ("traceparent", b"00-abc-def-01"), ("bin", b"\xff\x00")),
    }
    fields.update(changes)
    return OutboxEvent(**fields)  # type: ignore[arg-type]


def test_record_headers_are_cloudevents_then_user_headers_in_order() -> None:
    record = to_record(event())
    assert isinstance(record, KafkaRecord)
    assert record.headers == [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"0b8f6a4e-8a8e-4b8e-9f52-6c1d2e3f4a5b"),
        ("ce_type", b"order.created"),
        ("ce_source", b"outbox-cdc"),
        ("ce_time", b"2026-11-26T07:05:19.123456Z"),
        ("content-type", b"application/json"),
        ("tenant", b"acme"),
        ("traceparent", b"00-abc-def-01"),
        ("bin", b"\xff\x00"),
    ]
    assert all(isinstance(v, bytes) for _, v in record.headers)
    assert record.topic == "orders.v1"
    assert record.event_id == str(EVENT_ID)
    assert DEFAULT_SOURCE == "outbox-cdc"


def test_record_key_and_value() -> None:
    payload = bytes(range(256))
    record = to_record(event(key="ключ-🔑", payload=payload))
    assert record.key == "ключ-🔑".encode()
    assert record.value == payload
    assert record.value is payload or record.value == payload
    assert to_record(event(key=None)).key is None
    assert to_record(event(key="")).key == b""
    assert to_record(event(payload=b"")).value == b""


def test_record_without_user_headers_and_custom_source() -> None:
    record = to_record(event(headers=(), type="päckchen.versandt"), source="urn:shop:eu")
    assert [name for name, _ in record.headers] == [
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_time",
        "content-type",
    ]
    assert dict(record.headers)["ce_source"] == b"urn:shop:eu"
    assert dict(record.headers)["ce_type"] == "päckchen.versandt".encode()


@pytest.mark.parametrize(
    ("created_at", "ce_time"),
    [
        (WHEN, "2026-11-26T07:05:19.123456Z"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z"),
        # another offset is converted to UTC
        (
            datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2026-01-01T21:34:05.000006Z",
        ),
        # a naive time is taken as UTC
        (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05Z"),
    ],
)
def test_ce_time_is_rfc3339_utc_with_z(created_at: datetime, ce_time: str) -> None:
    assert dict(to_record(event(created_at=created_at)).headers)["ce_time"] == ce_time.encode()
    assert format_time(created_at) == ce_time
    assert parse_time(ce_time) == (
        created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
    )


def test_record_of_a_published_event_matches_the_insert_arguments() -> None:
    built = Outbox(capture_trace_context=False).event(
        topic="t", type="x.y", payload={"a": 1}, key="k", headers={"h1": "v1", "h0": b"v0"}
    )
    record = to_record(built)
    assert record.value == b'{"a":1}'
    assert record.key == b"k"
    assert record.headers[5:] == [
        ("content-type", b"application/json"),
        ("h1", b"v1"),
        ("h0", b"v0"),
    ]


# -- storage forms -------------------------------------------------------------------------------


def test_headers_json_round_trip_keeps_order_and_bytes() -> None:
    headers = (
        ("z", b"text"),
        ("a", "żółw".encode()),
        ("bin", b"\xff\xfe"),
        ("nul", b"a\x00b"),
        ("empty", b""),
    )
    text = headers_to_json(headers)
    assert "\\u0000" not in text  # PostgreSQL's json functions cannot take it as text
    obj = json.loads(text)
    assert list(obj) == ["z", "a", "bin", "nul", "empty"]
    assert obj["z"] == "text"
    assert obj["a"] == "żółw"
    assert set(obj["bin"]) == {"base64"}
    assert set(obj["nul"]) == {"base64"}
    assert headers_from_obj(obj) == headers


def test_envelope_round_trip() -> None:
    original = event(payload=b"\x00\x01\xff", key=None)
    text = envelope_to_json(original)
    assert "\x00" not in text  # wal2json cuts message content at a NUL byte
    env = json.loads(text)
    assert env["v"] == 1
    assert env["time"] == "2026-11-26T07:05:19.123456Z"
    assert envelope_from_json(text) == original
    assert envelope_from_json(text).created_at.tzinfo is not None


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"v": 2}',
        '{"v": 1}',
        '{"v":1,"id":"x","time":"2026-01-01T00:00:00Z","topic":"t","type":"t","content_type":"c",'
        '"payload":""}',
        '{"v":1,"id":"0b8f6a4e-8a8e-4b8e-9f52-6c1d2e3f4a5b","time":"2026-01-01T00:00:00Z",'
        '"topic":"bad topic","type":"t","content_type":"c","payload":""}',
    ],
)
def test_bad_envelopes_are_decode_errors(text: str) -> None:
    with pytest.raises(EventDecodeError, match="invalid outbox message envelope"):
        envelope_from_json(text, lsn="0/16B3748")
