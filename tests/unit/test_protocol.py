"""The protocol core on frames captured from a real PostgreSQL 15 + wal2json 2.5 server
(tests/data/capture_wal2json.py)."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import pytest

from outbox_cdc.errors import EventDecodeError, ProtocolError
from outbox_cdc.events import OutboxEvent
from outbox_cdc.protocol import wal2json
from outbox_cdc.protocol.lsn import format_lsn, parse_lsn
from outbox_cdc.protocol.replication import (
    KEEPALIVE_TAG,
    XLOGDATA_HEADER_SIZE,
    XLOGDATA_TAG,
    parse_keepalive,
    parse_xlogdata_header,
    status_update,
    to_pg_time,
)

FRAMES = [
    bytes.fromhex(f["hex"])
    for f in json.loads(
        (Path(__file__).parents[1] / "data" / "wal2json_v2_frames.json").read_text()
    )
]


def decoded() -> list[tuple[int, object]]:
    dec = wal2json.Wal2JsonDecoder("outbox-cdc")
    out = []
    for frame in FRAMES:
        if frame[0] == XLOGDATA_TAG:
            start, _ = parse_xlogdata_header(frame)
            out.append((start, dec.decode(frame[XLOGDATA_HEADER_SIZE:], start)))
    return out


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("16/B374D848", 0x16B374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
    ],
)
def test_lsn_round_trip(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text


@pytest.mark.parametrize("bad", ["", "0", "/1", "1/", "x/1", "123456789/0", "0/123456789"])
def test_lsn_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="LSN"):
        parse_lsn(bad)


def test_status_update_layout() -> None:
    msg = status_update(0x30, 0x20, 0x10, 946_684_800 + 1.5, reply_requested=True)
    tag, written, flushed, applied, clock, reply = struct.unpack(">cQQQqB", msg)
    assert (tag, written, flushed, applied, clock, reply) == (b"r", 0x30, 0x20, 0x10, 1_500_000, 1)
    assert to_pg_time(946_684_800) == 0


def test_keepalive_from_server() -> None:
    keepalives = [parse_keepalive(f) for f in FRAMES if f[0] == KEEPALIVE_TAG]
    assert keepalives, "capture has keepalives"
    ends = [k.wal_end for k in keepalives]
    assert ends == sorted(ends)
    with pytest.raises(ProtocolError):
        parse_keepalive(b"k\0\0")


def test_commit_position_is_the_commit_end() -> None:
    """The C object's XLogData dataStart equals its nextlsn: the LSN to confirm."""
    seen = 0
    for frame in FRAMES:
        if frame[0] == XLOGDATA_TAG and frame[XLOGDATA_HEADER_SIZE:].startswith(b'{"action":"C"'):
            start, _ = parse_xlogdata_header(frame)
            obj = json.loads(frame[XLOGDATA_HEADER_SIZE:])
            assert format_lsn(start) == obj["nextlsn"]
            seen += 1
    assert seen == 4


def test_decoder_yields_transactions_in_stream_order() -> None:
    kinds = []
    for _, item in decoded():
        if item is wal2json.BEGIN:
            kinds.append("B")
        elif item is wal2json.COMMIT:
            kinds.append("C")
        elif item is wal2json.IGNORED:
            kinds.append("-")
        elif isinstance(item, OutboxEvent):
            kinds.append(item.type)
        else:
            kinds.append(repr(item))
    # one event; an empty transaction (other table); two events; (rolled back: nothing);
    # a table-less message; a non-transactional message (ignored, outside B/C)
    assert kinds == [
        "B",
        "order.created",
        "C",
        "B",
        "C",
        "B",
        "bin",
        "text",
        "C",
        "B",
        "payment.done",
        "C",
        "-",
    ]


def test_decoded_events_carry_every_field() -> None:
    events = [e for _, e in decoded() if isinstance(e, OutboxEvent)]
    first, binary, text, message = events
    assert first.id == uuid.UUID("00000000-0000-4000-8000-000000000001")
    assert (first.topic, first.key, first.type) == ("orders", "order-1", "order.created")
    assert first.payload == b'{"n":1}'
    assert first.content_type == "application/json"
    assert first.headers == (("tenant", b"acme"),)
    assert first.created_at.tzinfo is not None
    assert binary.payload == b"\x00\x01\xff" and binary.key is None
    assert binary.content_type == "application/octet-stream"
    assert text.payload == "h\u00e9llo".encode() and text.key == "k\u00e9y"
    assert text.headers == (("raw", b"\xff\x00"),)
    assert message.id == uuid.UUID("00000000-0000-4000-8000-000000000004")
    assert (message.topic, message.key, message.payload) == ("payments", "p-1", b"\x00bin")


def test_messages_of_other_prefixes_are_ignored() -> None:
    dec = wal2json.Wal2JsonDecoder(None)
    for frame in FRAMES:
        payload = frame[XLOGDATA_HEADER_SIZE:]
        if frame[0] == XLOGDATA_TAG and b'"action":"M"' in payload:
            assert dec.decode(payload, 1) is wal2json.IGNORED


def _insert_frame(**overrides: object) -> bytes:
    for frame in FRAMES:
        payload = frame[XLOGDATA_HEADER_SIZE:]
        if payload.startswith(b'{"action":"I"'):
            obj = json.loads(payload)
            for col in obj["columns"]:
                if col["name"] in overrides:
                    col["value"] = overrides[col["name"]]
            return json.dumps(obj).encode()
    raise AssertionError("no insert in capture")


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"headers": "[1, 2]"}, "JSON object"),
        ({"topic": "bad topic"}, "topic"),
        ({"payload": None}, "payload"),
        ({"type": ""}, "type"),
        ({"payload": "zz"}, "hex"),
    ],
)
def test_bad_rows_become_decode_errors_naming_the_event(
    overrides: dict[str, object], why: str
) -> None:
    item = wal2json.Wal2JsonDecoder().decode(_insert_frame(**overrides), 0x10)
    assert isinstance(item, EventDecodeError)
    assert item.event_id == "00000000-0000-4000-8000-000000000001"
    assert "0/10" in str(item)


def test_invalid_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="invalid JSON"):
        wal2json.Wal2JsonDecoder().decode(b'{"action":"I", nope', 5)


def test_plugin_options_filter_to_the_outbox() -> None:
    opts = wal2json.plugin_options("public.outbox", None)
    assert opts["format-version"] == "2"
    assert opts["add-tables"] == "public.outbox"
    assert opts["actions"] == "insert"
    assert wal2json.plugin_options("s.t", "p")["add-msg-prefixes"] == "p"
