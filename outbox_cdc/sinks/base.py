"""The sink interface. Its docstring is the contract every backend must keep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from outbox_cdc.events import KafkaRecord

DeliveryCallback = Callable[[BaseException | None], None]


class Sink(Protocol):
    """Publishes records to a broker.

    Contract:

    * ``send(record, on_done)`` hands the record to the client and returns without waiting for
      the broker. It may block briefly for buffer space or metadata; it raises
      :class:`~outbox_cdc.errors.SinkError` (retriable) or
      :class:`~outbox_cdc.errors.PermanentDeliveryError` if the record cannot even be queued.
    * ``on_done`` is called exactly once per record that ``send`` accepted, from any thread:
      with ``None`` only after the broker acknowledged the record durably (Kafka: ``acks=all``),
      or with a ``SinkError`` / ``PermanentDeliveryError``. Never ``None`` for a record that was
      not acknowledged.
    * Records sent in order with the same key go to the same partition and are written in that
      order, even across the client's internal retries (Kafka: idempotent producer).
    * ``flush(timeout)`` waits until every accepted record's ``on_done`` has been called or the
      timeout passed. ``close(timeout)`` flushes for at most ``timeout`` seconds and releases the
      client; ``on_done`` of records still pending may then never be called with ``None``.
    """

    def send(self, record: KafkaRecord, on_done: DeliveryCallback) -> None: ...

    def flush(self, timeout: float) -> None: ...

    def close(self, timeout: float) -> None: ...
