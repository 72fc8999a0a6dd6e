"""The event model and its one mapping to a Kafka record.

Every relay mode (WAL table, WAL logical message, polling) produces exactly the record built by
:func:`to_record`:

* value   = the payload bytes, untouched;
* key     = the event key encoded as UTF-8, or no key;
* headers = the CloudEvents Kafka *binary* binding (``ce_specversion`` = ``1.0``, ``ce_id``,
  ``ce_type``, ``ce_source``, ``ce_time`` in RFC 3339 UTC, ``content-type``), then the user's
  headers in the order they were given.

This module does no IO. Validation here is what the insert API runs before writing anything.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from outbox_cdc.errors import EventDecodeError, EventValidationError

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
DEFAULT_SOURCE = "outbox-cdc"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_TEXT = "text/plain; charset=utf-8"
CONTENT_TYPE_BYTES = "application/octet-stream"

# Kafka topic names: [a-zA-Z0-9._-], at most 249 characters, not "." or ".."
# (org.apache.kafka.common.internals.Topic.validate).
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,249}")
_RESERVED_HEADERS = frozenset(
    {"ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"}
)

HeaderValue = str | bytes


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One event as stored in the outbox and as read back by a relay.

    ``headers`` holds the user's headers only (the CloudEvents ones are derived).
    """

    id: uuid.UUID
    created_at: datetime
    topic: str
    type: str
    payload: bytes
    content_type: str
    key: str | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """What a sink sends: topic, key, value and headers, all already encoded."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    event_id: str


_NOT_TEXT = "must not contain NUL characters or lone surrogates (PostgreSQL text cannot hold them)"


def _is_text(value: str) -> bool:
    """True if ``value`` can be stored in a PostgreSQL text column: no NUL, valid UTF-8."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Topics already found legal (a program publishes to a handful): a set lookup instead of the
# regular expression on every event.
_legal_topics: set[str] = set()


def validate_topic(topic: object) -> str:
    if type(topic) is str and topic in _legal_topics:
        return topic
    if not isinstance(topic, str) or not topic:
        raise EventValidationError("topic", "must be a non-empty string")
    if topic in (".", "..") or not _TOPIC_RE.fullmatch(topic):
        raise EventValidationError(
            "topic",
            f"{topic[:60]!r} is not a legal Kafka topic name: use 1-249 characters from "
            "[a-zA-Z0-9._-], not '.' or '..'",
        )
    if type(topic) is str and len(_legal_topics) < 4096:
        _legal_topics.add(topic)
    return topic


def encode_payload(payload: object, content_type: str | None) -> tuple[bytes, str]:
    """Turn a payload into bytes and pick its content type (an explicit one wins)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), content_type or CONTENT_TYPE_BYTES
    if isinstance(payload, str):
        try:
            return payload.encode("utf-8"), content_type or CONTENT_TYPE_TEXT
        except UnicodeEncodeError as exc:
            raise EventValidationError("payload", f"is not valid Unicode text ({exc})") from None
    if isinstance(payload, dict | list):
        try:
            data = json.dumps(
                payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            # ValueError covers NaN/Infinity, circular references and UnicodeEncodeError
            raise EventValidationError(
                "payload", f"cannot be serialized as JSON ({exc}); pass bytes or a str instead"
            ) from None
        return data, content_type or CONTENT_TYPE_JSON
    dump = getattr(payload, "model_dump_json", None)  # pydantic v2 model
    if callable(dump):
        try:
            return str(dump()).encode("utf-8"), content_type or CONTENT_TYPE_JSON
        except Exception as exc:  # pydantic's PydanticSerializationError and friends
            raise EventValidationError(
                "payload", f"the model cannot be serialized as JSON ({exc})"
            ) from None
    raise EventValidationError(
        "payload",
        f"unsupported type {type(payload).__name__}: pass bytes, str, dict, list or a pydantic "
        "model",
    )


def normalize_headers(headers: Mapping[str, HeaderValue] | None) -> tuple[tuple[str, bytes], ...]:
    if headers is None:
        return ()
    if not isinstance(headers, Mapping):
        raise EventValidationError("headers", "must be a mapping of str to str or bytes")
    out: list[tuple[str, bytes]] = []
    for name, value in headers.items():
        if not isinstance(name, str) or not name or not _is_text(name):
            raise EventValidationError(
                "headers", f"header name {name!r} must be a non-empty str without NUL characters"
            )
        if name.lower() in _RESERVED_HEADERS:
            raise EventValidationError(
                "headers",
                f"{name!r} is set by outbox-cdc (CloudEvents binding, compared "
                "case-insensitively); rename it",
            )
        if isinstance(value, str):
            try:
                out.append((name, value.encode("utf-8")))
            except UnicodeEncodeError as exc:
                raise EventValidationError(
                    "headers", f"value of {name!r} is not valid Unicode text ({exc})"
                ) from None
        elif isinstance(value, bytes | bytearray):
            out.append((name, bytes(value)))
        else:
            raise EventValidationError(
                "headers", f"value of {name!r} is {type(value).__name__}; use str or bytes"
            )
    return tuple(out)


def create_event(
    *,
    topic: str,
    type: str,
    payload: object,
    key: str | None = None,
    headers: Mapping[str, HeaderValue] | None = None,
    id: uuid.UUID | str | None = None,
    content_type: str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    now: datetime | None = None,
) -> OutboxEvent:
    """Validate the insert API's arguments and build the event. Raises EventValidationError."""
    validate_topic(topic)
    if not isinstance(type, str) or not type.strip():
        raise EventValidationError("type", "must be a non-empty string, e.g. 'order.created'")
    if not _is_text(type):
        raise EventValidationError("type", _NOT_TEXT)
    if key is not None:
        if not isinstance(key, str):
            raise EventValidationError(
                "key", f"must be a str or None, not {key.__class__.__name__}"
            )
        if not _is_text(key):
            raise EventValidationError("key", _NOT_TEXT)
    if content_type is not None:
        if not isinstance(content_type, str) or not content_type:
            raise EventValidationError("content_type", "must be a non-empty string or None")
        if not _is_text(content_type):
            raise EventValidationError("content_type", _NOT_TEXT)
    data, ctype = encode_payload(payload, content_type)
    if len(data) > max_payload_bytes:
        raise EventValidationError(
            "payload",
            f"is {len(data)} bytes, above the limit of {max_payload_bytes} bytes; store large "
            "data elsewhere and publish a reference, or raise max_payload_bytes",
        )
    if id is None:
        event_id = uuid.uuid4()
    elif isinstance(id, uuid.UUID):
        event_id = id
    else:
        try:
            event_id = uuid.UUID(str(id))
        except ValueError:
            raise EventValidationError("id", f"{id!r} is not a UUID") from None
    return OutboxEvent(
        id=event_id,
        created_at=now or datetime.now(UTC),
        topic=topic,
        type=type,
        payload=data,
        content_type=ctype,
        key=key,
        headers=normalize_headers(headers),
    )


def check_event(event: OutboxEvent, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
    """Validate an event built by other means than :func:`create_event` (e.g. ``OutboxEvent(...)``
    given to ``publish_many``) with the same rules. Raises EventValidationError."""
    if not isinstance(event.id, uuid.UUID):
        raise EventValidationError("id", f"{event.id!r} is not a uuid.UUID")
    if not isinstance(event.created_at, datetime):
        raise EventValidationError("created_at", "must be a datetime")
    validate_topic(event.topic)
    if not isinstance(event.type, str) or not event.type.strip() or not _is_text(event.type):
        raise EventValidationError("type", "must be a non-empty string without NUL characters")
    if event.key is not None and (not isinstance(event.key, str) or not _is_text(event.key)):
        raise EventValidationError("key", "must be None or a str without NUL characters")
    if (
        not isinstance(event.content_type, str)
        or not event.content_type
        or not _is_text(event.content_type)
    ):
        raise EventValidationError("content_type", "must be a non-empty string")
    if not isinstance(event.payload, bytes):
        raise EventValidationError("payload", "must be bytes in an OutboxEvent")
    if len(event.payload) > max_payload_bytes:
        raise EventValidationError(
            "payload", f"is {len(event.payload)} bytes, above the limit of {max_payload_bytes}"
        )
    if not isinstance(event.headers, tuple):
        raise EventValidationError("headers", "must be a tuple of (str, bytes) pairs")
    seen: set[str] = set()
    for pair in event.headers:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[1], bytes)):
            raise EventValidationError("headers", f"{pair!r} is not a (str, bytes) pair")
        name = pair[0]
        if not isinstance(name, str) or not name or not _is_text(name):
            raise EventValidationError("headers", f"header name {name!r} must be a non-empty str")
        if name.lower() in _RESERVED_HEADERS:
            raise EventValidationError(
                "headers",
                f"{name!r} is set by outbox-cdc (CloudEvents binding, compared "
                "case-insensitively); rename it",
            )
        if name in seen:
            # the outbox stores headers as a JSON object: one value per name
            raise EventValidationError("headers", f"{name!r} appears twice; give each name once")
        seen.add(name)


def check_decoded(event: OutboxEvent) -> OutboxEvent:
    """Validate an event a relay decoded from a row or envelope written by any tool, so that
    mapping it to a Kafka record cannot fail: the insert API's rules (reserved header names,
    text fields, types) without its payload limit (the broker has its own), and a time that
    RFC 3339 in UTC can express. Raises EventValidationError; returns the event."""
    check_event(event, max_payload_bytes=2**63)
    try:
        format_time(event.created_at)
    except (OverflowError, ValueError):
        raise EventValidationError(
            "created_at", f"{event.created_at!r} cannot be expressed in UTC"
        ) from None
    return event


def headers_from_json(text: str) -> tuple[tuple[str, bytes], ...]:
    """The headers column (JSON object text) as pairs; a name given twice is an error (JSON
    parsers keep the last value, which would drop one silently)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [k for k, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("headers: a header name appears twice in the JSON object")
        return dict(items)

    return headers_from_obj(json.loads(text, object_pairs_hook=pairs))


# -- headers as stored in the outbox (a JSON object) --------------------------------------------
# A value is a JSON string (UTF-8 text) or {"base64": "..."} for bytes that are not UTF-8 or
# that contain a NUL byte.


def headers_to_json(headers: tuple[tuple[str, bytes], ...]) -> str:
    if not headers:
        return "{}"
    obj: dict[str, Any] = {}
    for name, value in headers:
        # NUL is valid UTF-8, but PostgreSQL cannot turn "\u0000" into text (a jsonb cast or the
        # ->> operator fails, aborting the transaction), so such values go as base64 too.
        if b"\x00" in value:
            obj[name] = {"base64": base64.b64encode(value).decode("ascii")}
            continue
        try:
            obj[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            obj[name] = {"base64": base64.b64encode(value).decode("ascii")}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def headers_from_obj(obj: object) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(obj, dict):
        raise ValueError(f"headers must be a JSON object, got {type(obj).__name__}")
    out: list[tuple[str, bytes]] = []
    for name, value in obj.items():
        if isinstance(value, str):
            out.append((name, value.encode("utf-8")))
        elif isinstance(value, dict) and isinstance(value.get("base64"), str):
            out.append((name, base64.b64decode(value["base64"], validate=True)))
        else:
            raise ValueError(f'header {name!r} must be a string or {{"base64": ...}}')
    return tuple(out)


# -- the envelope of the table-less mode (a transactional logical decoding message) -------------
# wal2json passes message content as text and cuts it at the first NUL byte, so the payload is
# base64 inside a JSON envelope ("postgres-logical-decoding.md", logical decoding messages).

ENVELOPE_VERSION = 1


def envelope_to_json(event: OutboxEvent) -> str:
    env = {
        "v": ENVELOPE_VERSION,
        "id": str(event.id),
        "time": format_time(event.created_at),
        "topic": event.topic,
        "key": event.key,
        "type": event.type,
        "content_type": event.content_type,
        "headers": json.loads(headers_to_json(event.headers)),
        "payload": base64.b64encode(event.payload).decode("ascii"),
    }
    return json.dumps(env, separators=(",", ":"), ensure_ascii=False)


def envelope_from_json(text: str, *, lsn: str | None = None) -> OutboxEvent:
    try:
        env = json.loads(text)
        if not isinstance(env, dict):
            raise ValueError("not a JSON object")
        if env.get("v") != ENVELOPE_VERSION:
            raise ValueError(f"unknown envelope version {env.get('v')!r}")
        event = OutboxEvent(
            id=uuid.UUID(env["id"]),
            created_at=parse_time(env["time"]),
            topic=validate_topic(env["topic"]),
            type=env["type"],
            payload=base64.b64decode(env["payload"], validate=True),
            content_type=env["content_type"],
            key=env.get("key"),
            headers=headers_from_obj(env.get("headers") or {}),
        )
        return check_decoded(event)
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        RecursionError,
        EventValidationError,
    ) as exc:
        raise EventDecodeError(f"invalid outbox message envelope: {exc}", lsn=lsn) from None


def parse_time(text: str) -> datetime:
    """Inverse of :func:`format_time`. Python 3.10's ``fromisoformat`` refuses the ``Z`` suffix."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    ts = datetime.fromisoformat(text)
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def format_time(ts: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix, as CloudEvents ``time`` wants."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def to_record(event: OutboxEvent, source: str = DEFAULT_SOURCE) -> KafkaRecord:
    """The Kafka record for an event: the single mapping used by every relay mode."""
    event_id = str(event.id)
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", event_id.encode()),
        ("ce_type", event.type.encode("utf-8")),
        ("ce_source", source.encode("utf-8")),
        ("ce_time", format_time(event.created_at).encode()),
        ("content-type", event.content_type.encode("utf-8")),
    ]
    headers.extend(event.headers)
    return KafkaRecord(
        topic=event.topic,
        key=event.key.encode("utf-8") if event.key is not None else None,
        value=event.payload,
        headers=headers,
        event_id=event_id,
    )
