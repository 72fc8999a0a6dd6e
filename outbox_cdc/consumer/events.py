"""A Kafka record turned back into an outbox event: the inverse of ``events.to_record``.

The record is the CloudEvents Kafka *binary* binding (CloudEvents 1.0, "Kafka Protocol Binding",
section 3.2): ``ce_specversion``, ``ce_id``, ``ce_type``, ``ce_source`` are required,
``ce_time`` and ``content-type`` optional; every other header is the user's. The value is the
payload, decoded by its content type: ``application/json`` (and any ``+json`` type) to the parsed
JSON, ``text/*`` to ``str`` (its ``charset``, UTF-8 by default), anything else stays ``bytes``.

This module does no IO. A record that is not an event, or whose payload does not decode, raises
:class:`~outbox_cdc.errors.EventParseError` carrying the raw record; it is never dropped here.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox_cdc.errors import EventParseError
from outbox_cdc.events import parse_time

REQUIRED_HEADERS = ("ce_specversion", "ce_id", "ce_type", "ce_source")
CLOUDEVENTS_HEADERS = frozenset((*REQUIRED_HEADERS, "ce_time", "content-type"))
SPECVERSION = b"1.0"


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A Kafka record as the consumer fetched it (what a dead letter carries back)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = -1

    @classmethod
    def from_kafka(cls, record: Any) -> RawRecord:
        """From a kafka-python ``ConsumerRecord``."""
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            headers=tuple((name, value or b"") for name, value in record.headers or ()),
            timestamp_ms=record.timestamp if record.timestamp is not None else -1,
        )

    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True, slots=True)
class ConsumedEvent:
    """One event read from Kafka.

    ``id`` is the ``ce_id`` (the outbox event id, the same in every duplicate); ``key`` the
    record key as text; ``headers`` the user's headers only; ``payload`` the decoded value;
    ``record`` the raw record (topic, partition, offset, bytes).
    """

    id: str
    type: str
    source: str
    time: datetime | None
    content_type: str | None
    key: str | None
    headers: tuple[tuple[str, bytes], ...]
    payload: Any
    record: RawRecord

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def partition(self) -> int:
        return self.record.partition

    @property
    def offset(self) -> int:
        return self.record.offset

    def header(self, name: str) -> bytes | None:
        """The value of the user header ``name`` (the last one if it was given twice)."""
        found = None
        for n, v in self.headers:
            if n == name:
                found = v
        return found


def _text(record: RawRecord, name: str, value: bytes) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise EventParseError(
            f"record {record.where()}: header {name!r} is not UTF-8 text", record=record
        ) from None
    if not text.strip():
        raise EventParseError(f"record {record.where()}: header {name!r} is empty", record=record)
    return text


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``"text/plain; charset=utf-8"`` -> ``("text/plain", {"charset": "utf-8"})`` (RFC 9110
    section 8.3.1; type and parameter names are case-insensitive)."""
    main, *params = content_type.split(";")
    parsed: dict[str, str] = {}
    for p in params:
        name, sep, value = p.partition("=")
        if sep:
            parsed[name.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), parsed


def decode_payload(value: bytes, content_type: str | None) -> Any:
    """The payload as its content type says. Raises ValueError (or UnicodeDecodeError, a
    ValueError) when it does not decode, LookupError for an unknown charset."""
    if content_type is None:
        return value
    media, params = _media_type(content_type)
    if media == "application/json" or media.endswith("+json"):
        # RFC 8259 section 8.1: JSON exchanged between systems is UTF-8.
        return json.loads(value.decode("utf-8"))
    if media.startswith("text/"):
        charset = params.get("charset", "utf-8")
        codecs.lookup(charset)
        return value.decode(charset)
    return value


def parse_record(record: RawRecord) -> ConsumedEvent:
    """The event a record carries. Raises EventParseError (with the record) if it is not one."""
    found: dict[str, bytes] = {}
    user: list[tuple[str, bytes]] = []
    for name, value in record.headers:
        if name in CLOUDEVENTS_HEADERS:
            if name in found:
                raise EventParseError(
                    f"record {record.where()}: header {name!r} appears twice", record=record
                )
            found[name] = value
        else:
            user.append((name, value))
    missing = [h for h in REQUIRED_HEADERS if h not in found]
    if missing:
        raise EventParseError(
            f"record {record.where()} is not a CloudEvent (binary binding): missing header(s) "
            f"{', '.join(missing)}",
            record=record,
        )
    if found["ce_specversion"] != SPECVERSION:
        raise EventParseError(
            f"record {record.where()}: ce_specversion {found['ce_specversion']!r} is not 1.0",
            record=record,
        )
    event_id = _text(record, "ce_id", found["ce_id"])
    type_ = _text(record, "ce_type", found["ce_type"])
    source = _text(record, "ce_source", found["ce_source"])
    time: datetime | None = None
    if "ce_time" in found:
        try:
            time = parse_time(_text(record, "ce_time", found["ce_time"]))
        except ValueError:
            raise EventParseError(
                f"record {record.where()}: ce_time {found['ce_time']!r} is not an RFC 3339 time",
                record=record,
            ) from None
    content_type = (
        _text(record, "content-type", found["content-type"]) if "content-type" in found else None
    )
    key: str | None = None
    if record.key is not None:
        try:
            key = record.key.decode("utf-8")
        except UnicodeDecodeError:
            raise EventParseError(
                f"record {record.where()}: the key is not UTF-8 text", record=record
            ) from None
    if record.value is None:
        raise EventParseError(
            f"record {record.where()} has no value (a tombstone), not an event", record=record
        )
    try:
        payload = decode_payload(record.value, content_type)
    except (ValueError, LookupError, RecursionError) as exc:
        raise EventParseError(
            f"event {event_id} ({record.where()}): payload does not decode as {content_type}: "
            f"{type(exc).__name__}: {str(exc)[:200]}",
            record=record,
        ) from None
    return ConsumedEvent(
        id=event_id,
        type=type_,
        source=source,
        time=time,
        content_type=content_type,
        key=key,
        headers=tuple(user),
        payload=payload,
        record=record,
    )


def parse_records(records: Sequence[RawRecord]) -> list[ConsumedEvent | EventParseError]:
    """Each record's event, or the error saying why it is not one (in record order)."""
    out: list[ConsumedEvent | EventParseError] = []
    for r in records:
        try:
            out.append(parse_record(r))
        except EventParseError as exc:
            out.append(exc)
    return out
