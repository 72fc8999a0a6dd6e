"""Record -> event parsing (outbox_cdc.consumer.events): the inverse of events.to_record, and the
records that are not events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from outbox_cdc.consumer import RawRecord, decode_payload, parse_record
from outbox_cdc.consumer.dead_letter import dead_letter_record
from outbox_cdc.consumer.events import parse_records
from outbox_cdc.errors import EventParseError
from outbox_cdc.events import create_event, to_record


def _raw(payload: object, **kw: Any) -> RawRecord:
    event = create_event(
        topic="orders",
        type="order.created",
        payload=payload,
        key=kw.pop("key", "order-1"),
        headers=kw.pop("headers", {"traceparent": "00-abc", "bin": b"\x00\xff"}),
        id=uuid.UUID(int=7),
        now=datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        **kw,
    )
    r = to_record(event)
    return RawRecord("orders", 2, 41, r.key, r.value, tuple(r.headers), 1714564800123)


@pytest.mark.parametrize(
    ("payload", "content_type", "expected"),
    [
        ({"order": 1, "items": ["a"]}, None, {"order": 1, "items": ["a"]}),
        ([1, 2], None, [1, 2]),
        ("héllo", None, "héllo"),
        (b"\x00\x01binary", None, b"\x00\x01binary"),
        ('{"a": 1}', "application/vnd.shop.order+json", {"a": 1}),
        ("caf\xe9".encode("latin-1"), "text/plain; charset=ISO-8859-1", "café"),
        ("<x/>", "application/xml", b"<x/>"),
    ],
)
def test_round_trip_of_to_record(payload: object, content_type: str | None, expected: Any) -> None:
    event = parse_record(_raw(payload, content_type=content_type))
    assert event.payload == expected
    assert event.id == str(uuid.UUID(int=7))
    assert event.type == "order.created"
    assert event.source == "outbox-cdc"
    assert event.time == datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    assert event.key == "order-1"
    assert event.headers == (("traceparent", b"00-abc"), ("bin", b"\x00\xff"))
    assert event.header("bin") == b"\x00\xff"
    assert event.header("missing") is None
    assert (event.topic, event.partition, event.offset) == ("orders", 2, 41)


def test_no_key_no_time_no_content_type() -> None:
    raw = RawRecord(
        "t",
        0,
        0,
        None,
        b"raw",
        (("ce_specversion", b"1.0"), ("ce_id", b"x1"), ("ce_type", b"t"), ("ce_source", b"s")),
    )
    event = parse_record(raw)
    assert (event.key, event.time, event.content_type, event.payload) == (None, None, None, b"raw")


def _replace_header(raw: RawRecord, name: str, value: bytes | None) -> RawRecord:
    headers = tuple((n, v) for n, v in raw.headers if n != name)
    if value is not None:
        headers += ((name, value),)
    return RawRecord(raw.topic, raw.partition, raw.offset, raw.key, raw.value, headers)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: _replace_header(r, "ce_id", None), "missing header.s. ce_id"),
        (lambda r: _replace_header(r, "ce_type", None), "missing header.s. ce_type"),
        (lambda r: _replace_header(r, "ce_specversion", b"0.3"), "is not 1.0"),
        (lambda r: _replace_header(r, "ce_id", b""), "'ce_id' is empty"),
        (lambda r: _replace_header(r, "ce_id", b"\xff"), "'ce_id' is not UTF-8"),
        (lambda r: _replace_header(r, "ce_time", b"yesterday"), "not an RFC 3339 time"),
        (lambda r: RawRecord("orders", 2, 41, b"\xff", r.value, r.headers), "key is not UTF-8"),
        (lambda r: RawRecord("orders", 2, 41, r.key, None, r.headers), "tombstone"),
        (
            lambda r: RawRecord("orders", 2, 41, r.key, r.value, (*r.headers, ("ce_id", b"2"))),
            "appears twice",
        ),
        (lambda r: RawRecord("orders", 2, 41, r.key, b"{not json", r.headers), "JSONDecodeError"),
        (lambda r: RawRecord("orders", 2, 41, r.key, b'"\xff"', r.headers), "UnicodeDecodeError"),
    ],
)
def test_records_that_are_not_events(change: Any, message: str) -> None:
    raw = change(_raw({"a": 1}))
    with pytest.raises(EventParseError, match=message) as info:
        parse_record(raw)
    assert info.value.record is raw
    assert "orders[2]@41" in str(info.value)
    assert info.value.retriable is False


def test_unknown_charset_and_bad_text() -> None:
    with pytest.raises(EventParseError, match="LookupError"):
        parse_record(_raw("x", content_type="text/plain; charset=klingon"))
    with pytest.raises(EventParseError, match="UnicodeDecodeError"):
        parse_record(_raw(b"\xff\xfe", content_type="text/plain"))


def test_decode_payload_media_types() -> None:
    assert decode_payload(b'{"a":1}', "Application/JSON; charset=utf-8") == {"a": 1}
    assert decode_payload(b"x", "TEXT/csv") == "x"
    assert decode_payload(b"x", None) == b"x"


def test_parse_records_keeps_errors_in_place() -> None:
    good = _raw({"a": 1})
    bad = RawRecord("orders", 2, 42, None, b"x", ())
    out = parse_records([good, bad, good])
    assert [type(x).__name__ for x in out] == ["ConsumedEvent", "EventParseError", "ConsumedEvent"]


def test_dead_letter_record_keeps_the_original_and_says_why() -> None:
    raw = _raw({"a": 1})
    dlq = dead_letter_record(
        raw, ValueError("boom" * 1000), topic="orders.dlq", attempts=3, group="billing"
    )
    assert (dlq.topic, dlq.key, dlq.value) == ("orders.dlq", raw.key, raw.value)
    assert dlq.headers[: len(raw.headers)] == list(raw.headers)
    extra = dict(dlq.headers[len(raw.headers) :])
    assert extra["outbox_cdc_error_class"] == b"ValueError"
    assert len(extra["outbox_cdc_error"]) == 2000
    assert extra["outbox_cdc_original_topic"] == b"orders"
    assert extra["outbox_cdc_original_partition"] == b"2"
    assert extra["outbox_cdc_original_offset"] == b"41"
    assert extra["outbox_cdc_attempts"] == b"3"
    assert extra["outbox_cdc_consumer_group"] == b"billing"
    assert dlq.event_id == str(uuid.UUID(int=7))
    err = dead_letter_record(
        RawRecord("t", 0, 1, None, None, ()), EventParseError("x"), topic="d", attempts=0, group="g"
    )
    assert err.value == b""
    assert dict(err.headers)["outbox_cdc_error_class"] == b"outbox_cdc.errors.EventParseError"
