"""The source interface and the items a source yields. Its docstring is the contract."""

from __future__ import annotations

from typing import Final, Protocol

from outbox_cdc.errors import EventDecodeError
from outbox_cdc.events import OutboxEvent


class Begin:
    """Start of a source transaction; ``commit_time`` (epoch seconds) when the source knows it
    (logical decoding sends a transaction only after its commit)."""

    __slots__ = ("commit_time",)

    def __init__(self, commit_time: float | None = None) -> None:
        self.commit_time = commit_time

    def __repr__(self) -> str:
        return "BEGIN" if self.commit_time is None else f"Begin({self.commit_time})"


BEGIN: Final = Begin()


class Commit:
    """End of a source transaction; ``end`` is the position to confirm once it is delivered."""

    __slots__ = ("commit_time", "end")

    def __init__(self, end: int, commit_time: float | None = None) -> None:
        self.end = end
        self.commit_time = commit_time

    def __repr__(self) -> str:
        return f"Commit({self.end})"


Item = Begin | Commit | OutboxEvent | EventDecodeError


class Source(Protocol):
    """Yields committed outbox events in commit order, and is told what was delivered.

    Positions are integers that only grow: a WAL LSN for the WAL source, a batch number for the
    polling source. ``name`` ("PostgreSQL", "MariaDB"...) and ``describe(position)`` are for
    log lines.

    Contract:

    * ``open(resume_from)`` connects and starts after the last delivered position: the later of
      ``resume_from`` (what this process knows it delivered), the source's own durable record,
      and the server's confirmed position. Raises ``SourceInUseError`` while another relay holds
      the source, ``SourceError`` for connection failures, ``SlotInvalidatedError`` and
      ``ConfigurationError`` for what waiting cannot fix.
    * ``read(timeout, wake_fd, max_items)`` returns the next items in stream order: ``Begin``,
      events (or ``EventDecodeError`` for a committed row that cannot be published), then
      ``Commit(end)``. A transaction may span several calls. Returns early (possibly with
      nothing) when ``wake_fd`` becomes readable or ``timeout`` passes.
    * ``idle_position()``: a position that may be confirmed when nothing is in flight and no
      transaction is open (WAL: the last keepalive's walEnd), or None.
    * ``confirm(confirmed, delivered)``: everything up to ``confirmed`` is delivered (or had
      nothing to deliver); ``delivered`` is the end of the last transaction that carried events.
      The source never confirms beyond what it was told. It keeps the server connection alive
      (``tick()``) even while the relay waits for the sink.
    * ``close()`` reports the final position and releases the connection. It never drops or
      resets the slot.
    """

    name: str

    def describe(self, position: int) -> str: ...

    def open(self, resume_from: int) -> int: ...

    def read(self, timeout: float, wake_fd: int, max_items: int) -> list[Item]: ...

    def idle_position(self) -> int | None: ...

    def confirm(self, confirmed: int, delivered: int) -> None: ...

    def tick(self) -> None: ...

    def close(self) -> None: ...


class CleanupObserver(Protocol):
    """Told about each clean-up round of published rows (for metrics); cheap, never raises."""

    def cleanup(self, seconds: float, deleted: int, failed: bool) -> None: ...
