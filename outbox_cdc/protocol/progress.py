"""The ack rule as a state machine: which position may be confirmed to the source.

A *position* is the source's resume point after a transaction: for the WAL relay the commit-end
LSN (the C object's XLogData dataStart), for polling the last row's sequence number.

Rules (issue "The WAL relay", "The ack rule"):

* a transaction's position becomes confirmable only when every event of it, and of every earlier
  transaction, has been acknowledged by the sink;
* an empty transaction (all its rows filtered out) is confirmable as soon as everything before it
  is;
* when nothing is in flight and no transaction is open, the source's idle position (the
  keepalive's walEnd) may be confirmed, so an idle outbox pins no WAL.

``delivered`` is the position of the last transaction *that carried events* and is fully
acknowledged; it is what the relay records durably to avoid redelivery after a restart.

``unconfirmed`` counts the events a restart would send again: every event from the oldest
unconfirmed transaction up to the newest sent, acknowledged or not (an acknowledged event
waiting behind an unacknowledged one is not confirmed either). ``window`` is what the relay's
in-flight limit gates reading on: ``unconfirmed`` while a committed transaction waits for
acknowledgments, else only the unacknowledged events of the open transaction, so that a single
transaction larger than the limit still flows.
No IO, no clock, no threads: the relay feeds it from one thread.
"""

from __future__ import annotations

from collections import deque


class Transaction:
    """One source transaction in flight. ``pending`` counts events not yet acknowledged."""

    __slots__ = ("end", "events", "first", "pending")

    def __init__(self) -> None:
        self.end = -1  # position once committed; -1 while the transaction is still open
        self.pending = 0
        self.events = 0
        self.first: object = None  # the caller's note of its first event (for log lines)


class AckTracker:
    __slots__ = ("_in_txn", "_open", "_queue", "_queued", "confirmed", "delivered", "in_flight")

    def __init__(self, start: int = 0) -> None:
        self.confirmed = start
        self.delivered = start
        self.in_flight = 0  # events sent and not acknowledged
        self._queue: deque[Transaction] = deque()  # committed, not fully acknowledged, in order
        self._queued = 0  # events of the transactions in _queue (kept in commit and _drain)
        self._open: Transaction | None = None  # the open transaction once it has an event
        self._in_txn = False

    # -- feeding from the source, in stream order ----------------------------------------------

    def begin(self) -> None:
        if self._in_txn:
            raise RuntimeError("begin() inside an open transaction")
        self._in_txn = True

    def add_event(self) -> Transaction:
        """Register one event of the open transaction; returns the ticket to ack it with."""
        txn = self._open
        if txn is None:
            if not self._in_txn:
                raise RuntimeError("add_event() outside a transaction")
            txn = self._open = Transaction()
        txn.pending += 1
        txn.events += 1
        self.in_flight += 1
        return txn

    def commit(self, end: int) -> None:
        if not self._in_txn:
            raise RuntimeError("commit() without begin()")
        self._in_txn = False
        txn = self._open
        self._open = None
        queue = self._queue
        if txn is None:  # empty transaction
            if not queue:
                if end > self.confirmed:
                    self.confirmed = end
                return
            last = queue[-1]
            if last.events == 0:  # coalesce runs of empty transactions: only the last counts
                last.end = end
                return
            txn = Transaction()
        txn.end = end
        queue.append(txn)
        self._queued += txn.events
        if txn.pending == 0:
            self._drain()

    # -- acknowledgments from the sink ---------------------------------------------------------

    def ack(self, txn: Transaction) -> None:
        txn.pending -= 1
        self.in_flight -= 1
        if txn.pending == 0 and self._queue and self._queue[0] is txn:
            self._drain()

    def idle(self, position: int) -> None:
        """The source says nothing unsent precedes ``position`` (keepalive walEnd)."""
        if (
            not self._in_txn
            and not self._queue
            and self._open is None
            and (position > self.confirmed)
        ):
            self.confirmed = position

    @property
    def unconfirmed(self) -> int:
        """Events sent since the confirmed position, acknowledged or not: what a restart from
        ``confirmed`` would send again."""
        txn = self._open
        return self._queued + (txn.events if txn is not None else 0)

    @property
    def window(self) -> int:
        """What counts against the in-flight limit: ``unconfirmed`` while a committed
        transaction is not fully acknowledged; otherwise the open transaction's unacknowledged
        events (``in_flight``), so a transaction larger than the limit is never stopped by its
        own acknowledged events."""
        return self.unconfirmed if self._queue else self.in_flight

    @property
    def oldest_unconfirmed(self) -> Transaction | None:
        """The committed transaction confirmation waits for (None when none waits)."""
        return self._queue[0] if self._queue else None

    @property
    def in_transaction(self) -> bool:
        """True between begin() and commit(): a transaction is partly read."""
        return self._in_txn

    @property
    def busy(self) -> bool:
        """True while any transaction is open or waiting for acknowledgments."""
        return self._in_txn or bool(self._queue)

    def _drain(self) -> None:
        queue = self._queue
        while queue:
            head = queue[0]
            if head.pending or head.end < 0:
                break
            queue.popleft()
            self._queued -= head.events
            if head.end > self.confirmed:
                self.confirmed = head.end
            if head.events and head.end > self.delivered:
                self.delivered = head.end
