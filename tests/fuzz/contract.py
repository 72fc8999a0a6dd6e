"""The contract every outbox decoder keeps with hostile input, shared by the property tests
(tests/unit/test_properties.py) and the fuzzer (tests/fuzz/fuzz_wal2json.py).

A decoder (the wal2json decoder, the polling ``row_to_event``, ``envelope_from_json``) given
anything at all either

* raises :class:`~outbox_cdc.errors.ProtocolError` (the wal2json decoder only: the server sent
  something that is not wal2json v2), or
* returns BEGIN / COMMIT / IGNORED (the wal2json decoder only), or
* returns an :class:`~outbox_cdc.errors.EventDecodeError` (a committed row that cannot be
  published: the relay dead-letters it or stops), or
* returns an :class:`~outbox_cdc.events.OutboxEvent` that is *well formed*: ``to_record`` maps
  it, every CloudEvents header appears exactly once, and every field is what the row said
  (``matches_row`` / ``matches_envelope``): never a silently wrong event.

Anything else (another exception type leaking, an event the relay cannot map) is a bug: the
relay would crash with a traceback instead of naming the row, with or without a dead-letter
topic.

``OPEN_BUGS`` lists the classes of violation that are known and reported but not fixed yet;
:func:`open_bug` recognises them so that the properties and the fuzzer keep checking
everything else. Each has a strict-xfail regression test in tests/unit/test_properties.py:
when a bug is fixed, that test passes (XPASS fails the run) and its entry here must go.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from outbox_cdc.errors import EventDecodeError, ProtocolError
from outbox_cdc.events import (
    CONTENT_TYPE_BYTES,
    OutboxEvent,
    parse_time,
    to_record,
)
from outbox_cdc.protocol import wal2json

RESERVED = ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type")

# None open: the three classes found (reserved header names in rows, events to_record could
# not map, the envelope's str() coercions) were fixed with events.check_decoded.
OPEN_BUGS: dict[str, str] = {}


class ContractViolation(AssertionError):
    """A decoder broke the contract; ``bug`` names the open bug class it belongs to, if any."""

    def __init__(self, message: str, bug: str | None = None) -> None:
        super().__init__(message)
        self.bug = bug


# -- well-formed events --------------------------------------------------------------------------


def event_problems(event: OutboxEvent) -> list[tuple[str, str]]:
    """(open bug class or "", description) for everything wrong with an event a decoder
    returned; empty if it is well formed."""
    out: list[tuple[str, str]] = []
    for name, value in event.headers:
        if not isinstance(name, str) or not name or name.lower() in RESERVED:
            out.append(("reserved-header-name", f"user header name {name!r}"))
        if not isinstance(value, bytes):
            out.append(("", f"header {name!r} value is {type(value).__name__}, not bytes"))
        try:
            str(name).encode("utf-8")  # what the Kafka clients do with a header name
        except UnicodeEncodeError:
            out.append(("unmappable-event", f"header name {name!r} is not valid Unicode"))
    if not isinstance(event.id, uuid.UUID):
        out.append(("", f"id is {type(event.id).__name__}"))
    if not isinstance(event.payload, bytes):
        out.append(("", f"payload is {type(event.payload).__name__}"))
    if not isinstance(event.created_at, datetime):
        out.append(("", f"created_at is {type(event.created_at).__name__}"))
    if not isinstance(event.type, str) or not event.type:
        out.append(("envelope-coercion", f"type {event.type!r}"))
    if not isinstance(event.content_type, str) or not event.content_type:
        out.append(("unmappable-event", f"content_type {event.content_type!r}"))
    if event.key is not None and not isinstance(event.key, str):
        out.append(("unmappable-event", f"key is {type(event.key).__name__}"))
    try:
        record = to_record(event)
    except Exception as exc:
        out.append(("unmappable-event", f"to_record raised {type(exc).__name__}: {exc}"))
        return out
    names = [name for name, _ in record.headers]
    for name in RESERVED:
        if names.count(name) != 1 and not any(b == "reserved-header-name" for b, _ in out):
            out.append(("", f"{name} appears {names.count(name)} times"))
    if record.value != event.payload:
        out.append(("", "record value differs from the payload"))
    try:
        record.topic.encode("ascii")
    except UnicodeEncodeError:
        out.append(("", f"topic {record.topic!r} is not ASCII"))
    return out


def require_well_formed(event: OutboxEvent, where: str = "") -> None:
    problems = event_problems(event)
    if problems:
        text = "; ".join(d for _, d in problems)
        raise ContractViolation(f"{where}ill-formed event {event!r}: {text}", _known(problems))


def _known(problems: list[tuple[str, str]]) -> str | None:
    """The open bug classes of ``problems`` ("a+b" for several); None if any is new or no
    longer listed in OPEN_BUGS (a fixed bug coming back is a violation like any other)."""
    bugs = {b for b, _ in problems}
    return None if not bugs <= OPEN_BUGS.keys() else "+".join(sorted(bugs))


def open_bug(exc: BaseException) -> str | None:
    """The open bug class a violation belongs to (None: a new bug)."""
    return exc.bug if isinstance(exc, ContractViolation) else None


# -- what a row / an envelope should decode to -------------------------------------------------


def _expected_key(value: Any) -> str | None:
    # documented behaviour of both row decoders: text as is, NULL none, anything else str()
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8")
    return str(value)


def _expected_headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    obj = json.loads(raw) if isinstance(raw, str) else raw
    out = []
    for name, value in obj.items():
        if isinstance(value, str):
            out.append((name, value.encode("utf-8")))
        else:
            out.append((name, base64.b64decode(value["base64"], validate=True)))
    return tuple(out)


def _same_time(got: datetime, want: datetime) -> bool:
    want = want if want.tzinfo else want.replace(tzinfo=UTC)
    return got == want


def matches_row(event: OutboxEvent, values: Mapping[str, Any]) -> list[str]:
    """Fields of ``event`` that differ from the wal2json column ``values`` it was decoded
    from (the decoder's documented mapping); empty if it is exactly the row."""
    diffs = []
    want: dict[str, Any] = {
        "id": uuid.UUID(values["id"]),
        "topic": values["topic"],
        "type": values["type"],
        "payload": bytes.fromhex(values["payload"]),
        "content_type": values.get("content_type") or CONTENT_TYPE_BYTES,
        "key": _expected_key(values.get("key")),
        "headers": () if values.get("headers") is None else _expected_headers(values["headers"]),
    }
    for name, value in want.items():
        if getattr(event, name) != value:
            diffs.append(f"{name}: {getattr(event, name)!r} != {value!r}")
    created = values["created_at"]
    if not _same_time(event.created_at, datetime.fromisoformat(created)):
        diffs.append(f"created_at: {event.created_at!r} from {created!r}")
    return diffs


def matches_envelope(event: OutboxEvent, env: Mapping[str, Any]) -> list[tuple[str, str]]:
    diffs: list[tuple[str, str]] = []
    for name in ("type", "content_type"):
        if getattr(event, name) != env[name]:
            diffs.append(
                ("envelope-coercion", f"{name}: {getattr(event, name)!r} from {env[name]!r}")
            )
    if event.key != env.get("key"):
        diffs.append(("", f"key: {event.key!r} from {env.get('key')!r}"))
    if event.topic != env["topic"] or str(event.id) != str(uuid.UUID(env["id"])):
        diffs.append(("", "topic or id differs"))
    if event.payload != base64.b64decode(env["payload"], validate=True):
        diffs.append(("", "payload differs"))
    if not _same_time(event.created_at, parse_time(env["time"])):
        diffs.append(("", f"created_at {event.created_at!r} from {env['time']!r}"))
    if event.headers != _expected_headers(env.get("headers") or {}):
        diffs.append(("", "headers differ"))
    return diffs


# -- the wal2json decoder ----------------------------------------------------------------------

OUTCOMES = ("begin", "commit", "ignored", "event", "decode_error", "protocol_error")


def decode_checked(
    decoder: wal2json.Wal2JsonDecoder, payload: bytes, lsn: int = 0x16B3748
) -> tuple[str, object]:
    """Decode one XLogData payload and check the contract; returns (outcome, item).

    Raises ContractViolation (with ``bug`` set for an open bug class) when the decoder leaks
    another exception or returns a wrong event.
    """
    try:
        item = decoder.decode(payload, lsn)
    except ProtocolError as exc:
        return "protocol_error", exc
    except Exception as exc:
        raise ContractViolation(
            f"decode raised {type(exc).__name__}: {exc!r} for {payload[:200]!r}"
        ) from exc
    if item is wal2json.BEGIN:
        return "begin", item
    if item is wal2json.COMMIT:
        return "commit", item
    if item is wal2json.IGNORED:
        return "ignored", item
    if isinstance(item, EventDecodeError):
        return "decode_error", item
    if not isinstance(item, OutboxEvent):
        raise ContractViolation(f"decode returned {item!r}")
    require_well_formed(item)
    _check_fields(item, payload)
    return "event", item


def _check_fields(event: OutboxEvent, payload: bytes) -> None:
    """The event is exactly what the object said (the object parses: decode returned an
    event, so it is valid JSON)."""
    obj = json.loads(payload)
    if obj.get("action") == "I":
        values = {c["name"]: c.get("value") for c in obj["columns"]}
        diffs = matches_row(event, values)
        if diffs:
            raise ContractViolation(f"silently wrong event from {values!r}: {diffs}")
    elif obj.get("action") == "M":
        env = json.loads(obj["content"])
        found = matches_envelope(event, env)
        if found:
            raise ContractViolation(
                f"silently wrong event from envelope {env!r}: {found}", _known(found)
            )
    else:
        raise ContractViolation(f"an event from action {obj.get('action')!r}")


def pg_time(ts: datetime) -> str:
    """A timestamptz as PostgreSQL prints it (DateStyle ISO): fraction without trailing zeros,
    offset as +HH, +HH:MM or +HH:MM:SS."""
    text = f"{ts.year:04d}-{ts:%m-%d %H:%M:%S}"
    if ts.microsecond:
        text += f".{ts.microsecond:06d}".rstrip("0")
    offset = ts.utcoffset()
    assert offset is not None
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text += f"{sign}{hours:02d}"
    if minutes or secs:
        text += f":{minutes:02d}"
    if secs:
        text += f":{secs:02d}"
    return text
