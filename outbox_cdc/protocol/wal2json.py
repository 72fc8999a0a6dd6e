"""Decoder for wal2json ``format-version 2`` output: one JSON object per XLogData payload.

Objects: ``B`` (begin), ``C`` (commit), ``I``/``U``/``D`` (row changes), ``M`` (logical decoding
message), ``T`` (truncate). The relay asks wal2json for inserts into the outbox table only
(``add-tables``, ``actions=insert``) and for messages with its prefix (``add-msg-prefixes``).

Hot path: B and C objects are recognised by their fixed prefix without parsing JSON (every
transaction of the database produces a B/C pair, most of them empty for us); only outbox rows and
messages are parsed. Value encodings in v2 ("postgres-logical-decoding.md"): bytea arrives as hex
without ``\\x``, json/jsonb as a JSON string holding the document, timestamptz as server text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from outbox_cdc.errors import EventDecodeError, EventValidationError, ProtocolError
from outbox_cdc.events import (
    OutboxEvent,
    check_decoded,
    envelope_from_json,
    headers_from_json,
    headers_from_obj,
    validate_topic,
)
from outbox_cdc.protocol.lsn import format_lsn

BEGIN: Final = 1
COMMIT: Final = 2
IGNORED: Final = 3

_B_PREFIX: Final = b'{"action":"B"'
_C_PREFIX: Final = b'{"action":"C"'
_TIMESTAMP: Final = b'"timestamp":"'


def commit_time(payload: bytes | memoryview) -> float | None:
    """The commit timestamp (epoch seconds) of a B or C object (``include-timestamp``), read
    without parsing the JSON; None if absent or malformed."""
    data = bytes(payload[:160])
    start = data.find(_TIMESTAMP)
    if start < 0:
        return None
    start += len(_TIMESTAMP)
    end = data.find(b'"', start)
    try:
        return _parse_time(data[start:end].decode("ascii")).timestamp()
    except (ValueError, UnicodeDecodeError):
        return None


# What the relay asks wal2json for; START_REPLICATION options (wal2json README, "Parameters").
def plugin_options(table: str, message_prefix: str | None) -> dict[str, str]:
    """wal2json options for the outbox table (schema-qualified) and, if set, the message prefix.

    ``add-msg-prefixes`` is always given: with the table-only mode it is the empty-looking prefix
    no message carries, so messages of other tools never reach the relay.
    """
    return {
        "format-version": "2",
        "include-xids": "1",
        "include-timestamp": "1",
        "include-lsn": "1",
        "include-types": "0",
        "include-transaction": "1",
        "add-tables": table,
        "actions": "insert",
        "add-msg-prefixes": message_prefix or "outbox-cdc.disabled",
    }


def _parse_time(text: str) -> datetime:
    # timestamptz in server text form: '2026-11-26 05:42:41.402185+00'. Python 3.11's
    # fromisoformat accepts it (space separator, short offset).
    ts = datetime.fromisoformat(text)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts


def row_to_event(values: Mapping[str, Any]) -> OutboxEvent:
    """Build an event from the outbox row's column values (wal2json v2 encodings).

    Raises ValueError/KeyError/TypeError on a malformed row; the caller wraps it with context.
    """
    headers_raw = values.get("headers")
    if headers_raw is None:
        headers: tuple[tuple[str, bytes], ...] = ()
    else:
        headers = (
            headers_from_json(headers_raw)
            if isinstance(headers_raw, str)
            else headers_from_obj(headers_raw)
        )
    payload_hex = values["payload"]
    if payload_hex is None:
        raise ValueError("payload is NULL")
    key = values.get("key")
    if key is not None and not isinstance(key, str):
        key = str(key)
    type_ = values["type"]
    if not isinstance(type_, str) or not type_:
        raise ValueError("type is empty or NULL")
    content_type = values.get("content_type") or "application/octet-stream"
    return check_decoded(
        OutboxEvent(
            id=uuid.UUID(values["id"]),
            created_at=_parse_time(values["created_at"]),
            topic=validate_topic(values["topic"]),
            type=type_,
            payload=bytes.fromhex(payload_hex),
            content_type=content_type,
            key=key,
            headers=headers,
        )
    )


class Wal2JsonDecoder:
    """Turns one wal2json v2 object into BEGIN, COMMIT, IGNORED, an OutboxEvent, or an
    EventDecodeError (a committed row that cannot be published: the relay decides what to do,
    it must never be dropped silently)."""

    __slots__ = ("message_prefix",)

    def __init__(self, message_prefix: str | None = None) -> None:
        self.message_prefix = message_prefix

    def decode(self, payload: bytes | memoryview, lsn: int) -> int | OutboxEvent | EventDecodeError:
        head = bytes(payload[:13])
        if head == _B_PREFIX:
            return BEGIN
        if head == _C_PREFIX:
            return COMMIT
        try:
            obj = json.loads(bytes(payload))
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ProtocolError(f"wal2json sent invalid JSON at {format_lsn(lsn)}: {exc}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"wal2json sent a non-object at {format_lsn(lsn)}")
        action = obj.get("action")
        if action == "I":
            return self._insert(obj, lsn)
        if action == "M":
            return self._message(obj, lsn)
        if action == "B":
            return BEGIN
        if action == "C":
            return COMMIT
        return IGNORED  # U/D/T are filtered by "actions"; tolerate them if a user widened it

    @staticmethod
    def _insert(obj: dict[str, Any], lsn: int) -> OutboxEvent | EventDecodeError:
        columns = obj.get("columns")
        if not isinstance(columns, list):
            raise ProtocolError(f"wal2json insert without columns at {format_lsn(lsn)}")
        try:
            values = {c["name"]: c.get("value") for c in columns}
        except (TypeError, KeyError, AttributeError):
            raise ProtocolError(
                f"wal2json insert with malformed columns at {format_lsn(lsn)}"
            ) from None
        try:
            return row_to_event(values)
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            RecursionError,
            EventValidationError,
        ) as exc:
            event_id = values.get("id")
            return EventDecodeError(
                f"outbox row {obj.get('schema')}.{obj.get('table')} cannot be published: {exc}",
                event_id=str(event_id) if event_id is not None else None,
                lsn=format_lsn(lsn),
            )

    def _message(self, obj: dict[str, Any], lsn: int) -> OutboxEvent | EventDecodeError | int:
        if obj.get("prefix") != self.message_prefix:
            return IGNORED
        if not obj.get("transactional", False):
            # A non-transactional message is emitted even when its transaction rolls back, so
            # publishing it could publish a rolled-back event. The insert API never writes one;
            # wal2json sends it outside any B/C pair. Never published.
            return IGNORED
        content = obj.get("content")
        if not isinstance(content, str):
            return EventDecodeError("outbox message without content", lsn=format_lsn(lsn))
        try:
            return envelope_from_json(content, lsn=format_lsn(lsn))
        except EventDecodeError as exc:
            return exc
