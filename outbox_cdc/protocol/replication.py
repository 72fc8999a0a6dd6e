"""Streaming replication protocol messages carried in CopyData (PostgreSQL docs, "Streaming
Replication Protocol", START_REPLICATION).

Server to client: XLogData (``w``) and Primary keepalive (``k``). Client to server: Standby
status update (``r``). All integers big-endian; times are microseconds since 2000-01-01 UTC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from outbox_cdc.errors import ProtocolError

_XLOGDATA: Final = struct.Struct(">QQq")  # dataStart, walEnd, sendTime (after the 'w')
_KEEPALIVE: Final = struct.Struct(">QqB")  # walEnd, sendTime, replyRequested (after the 'k')
_STATUS: Final = struct.Struct(">cQQQqB")

XLOGDATA_HEADER_SIZE: Final = 1 + _XLOGDATA.size  # 25 bytes before the plugin's output
XLOGDATA_TAG: Final = ord("w")
KEEPALIVE_TAG: Final = ord("k")

# Seconds between the Unix epoch and the PostgreSQL epoch (2000-01-01 00:00:00 UTC).
PG_EPOCH_OFFSET: Final = 946_684_800


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_xlogdata_header(frame: bytes | memoryview) -> tuple[int, int]:
    """(dataStart, walEnd) of an XLogData frame; its payload starts at XLOGDATA_HEADER_SIZE."""
    if len(frame) < XLOGDATA_HEADER_SIZE:
        raise ProtocolError(f"XLogData frame too short: {len(frame)} bytes")
    data_start, wal_end, _ = _XLOGDATA.unpack_from(frame, 1)
    return data_start, wal_end


def parse_keepalive(frame: bytes | memoryview) -> Keepalive:
    if len(frame) < 1 + _KEEPALIVE.size:
        raise ProtocolError(f"keepalive frame too short: {len(frame)} bytes")
    wal_end, send_time, reply = _KEEPALIVE.unpack_from(frame, 1)
    return Keepalive(wal_end, send_time, bool(reply))


def to_pg_time(unix_seconds: float) -> int:
    """Unix time in seconds -> PostgreSQL protocol time (microseconds since 2000-01-01)."""
    return int((unix_seconds - PG_EPOCH_OFFSET) * 1_000_000)


def status_update(
    written: int, flushed: int, applied: int, unix_now: float, reply_requested: bool = False
) -> bytes:
    """A Standby status update. For a logical slot only ``flushed`` matters: it becomes the
    slot's ``confirmed_flush_lsn``, so it must never pass what the sink acknowledged."""
    return _STATUS.pack(b"r", written, flushed, applied, to_pg_time(unix_now), reply_requested)
