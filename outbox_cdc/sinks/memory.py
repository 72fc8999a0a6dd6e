"""An in-memory sink for unit tests and examples: keeps records in a list.

It acknowledges on ``flush`` (or at once with ``auto_ack``), can be told to fail records, and
never does IO.
"""

from __future__ import annotations

import threading

from outbox_cdc.events import KafkaRecord
from outbox_cdc.sinks.base import DeliveryCallback


class MemorySink:
    def __init__(self, *, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.records: list[KafkaRecord] = []
        self.pending: list[tuple[KafkaRecord, DeliveryCallback]] = []
        self.fail_with: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()

    def send(self, record: KafkaRecord, on_done: DeliveryCallback) -> None:
        with self._lock:
            self.pending.append((record, on_done))
        if self.auto_ack:
            self.complete()

    def complete(self, count: int | None = None) -> int:
        """Acknowledge (or fail, if ``fail_with`` is set) the oldest ``count`` pending records."""
        with self._lock:
            n = len(self.pending) if count is None else min(count, len(self.pending))
            batch, self.pending = self.pending[:n], self.pending[n:]
        for record, on_done in batch:
            if self.fail_with is None:
                self.records.append(record)
                on_done(None)
            else:
                on_done(self.fail_with)
        return n

    def flush(self, timeout: float) -> None:
        self.complete()

    def close(self, timeout: float) -> None:
        self.closed = True
