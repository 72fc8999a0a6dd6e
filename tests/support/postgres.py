"""PostgreSQL helpers for tests: drop a replication slot, read a wal2json stream."""

from __future__ import annotations

import json
import select
import struct
import time
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

# microseconds between the Unix epoch and PostgreSQL's (2000-01-01)
_PG_EPOCH_OFFSET_US = 946_684_800_000_000


def drop_replication_slot(admin_url: str, slot_name: str, timeout: float = 15.0) -> bool:
    """Drop ``slot_name`` if it exists; return whether it existed.

    A slot in use cannot be dropped: the walsender holding it is terminated first (it can take
    a moment to let go, hence the retries). Uses a superuser URL. Retries the connection too, so
    it works right after a test restarted the server.
    """
    deadline = time.monotonic() + timeout
    existed = False
    while True:
        try:
            with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
                while True:
                    row = conn.execute(
                        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                        (slot_name,),
                    ).fetchone()
                    if row is None:
                        return existed
                    existed = True
                    if row[0] is not None:
                        conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                    try:
                        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
                        return True
                    except (psycopg.errors.ObjectInUse, psycopg.errors.UndefinedObject):
                        if time.monotonic() >= deadline:
                            raise
                        time.sleep(0.1)
        except psycopg.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def lsn_to_int(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


class Wal2JsonStream:
    """A logical replication connection streaming a wal2json slot, for tests.

    >>> with Wal2JsonStream(url, slot, {"format-version": "2"}) as stream:
    ...     for lsn, message in stream.messages(timeout=10): ...

    Creates the slot when ``create_slot`` is set (a temporary one if ``temporary``). Answers the
    server's keepalives, and confirms flushed positions only when ``confirm()`` is called.
    """

    def __init__(
        self,
        url: str,
        slot_name: str,
        options: dict[str, str] | None = None,
        *,
        create_slot: bool = True,
        temporary: bool = False,
        start_lsn: str = "0/0",
    ) -> None:
        self.conn = psycopg.connect(url, replication="database", autocommit=True)
        try:
            if create_slot:
                self.conn.execute(
                    sql.SQL("CREATE_REPLICATION_SLOT {} {} LOGICAL wal2json").format(
                        sql.Identifier(slot_name),
                        sql.SQL("TEMPORARY" if temporary else ""),
                    )
                )
            opts = options or {"format-version": "2"}
            rendered = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in opts.items()
            )
            self.conn.execute(
                sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
                    sql.Identifier(slot_name), sql.SQL(start_lsn), rendered
                )
            )
        except BaseException:
            self.conn.close()
            raise
        self.pgconn = self.conn.pgconn
        self.received_lsn = 0
        self.flushed_lsn = 0

    def __enter__(self) -> Wal2JsonStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def frames(self, timeout: float) -> Iterator[tuple[int, bytes]]:
        """Yield (wal_start, payload) of each XLogData ('w') frame until ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while True:
            while True:
                nbytes, data = self.pgconn.get_copy_data(1)
                if nbytes == 0:
                    break  # nothing buffered: wait on the socket
                if nbytes < 0:
                    raise RuntimeError(
                        f"replication stream ended: {self.pgconn.get_error_message()}"
                    )
                frame = bytes(data)
                kind = frame[:1]
                if kind == b"w":
                    wal_start, wal_end, _ = struct.unpack_from("!QQQ", frame, 1)
                    self.received_lsn = max(self.received_lsn, wal_end, wal_start)
                    yield wal_start, frame[25:]
                elif kind == b"k":
                    wal_end, _, reply = struct.unpack_from("!QQB", frame, 1)
                    self.received_lsn = max(self.received_lsn, wal_end)
                    if reply:
                        self._send_status()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            select.select([self.pgconn.socket], [], [], min(remaining, 1.0))
            self.pgconn.consume_input()

    def messages(self, timeout: float) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield (wal_start, decoded wal2json object) until ``timeout`` runs out."""
        for lsn, payload in self.frames(timeout):
            yield lsn, json.loads(payload)

    def confirm(self, lsn: int | None = None) -> None:
        """Tell the server everything up to ``lsn`` (default: all received) is flushed."""
        self.flushed_lsn = self.received_lsn if lsn is None else lsn
        self._send_status()

    def _send_status(self) -> None:
        now_us = int(time.time() * 1_000_000) - _PG_EPOCH_OFFSET_US
        msg = b"r" + struct.pack(
            "!QQQQB", self.received_lsn, self.flushed_lsn, self.flushed_lsn, now_us, 0
        )
        self.pgconn.put_copy_data(msg)
        self.pgconn.flush()
