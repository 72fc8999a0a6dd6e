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


class TransactionalSink(Sink, Protocol):
    """A sink with broker transactions (exactly-once mode; Kafka: a transactional id, KIP-98).

    * Creating it fences older producers of the same transactional id and settles their last
      transaction (committed or aborted), before anything else.
    * ``begin_transaction()``; then ``send()`` as usual (``on_done(None)`` means acknowledged,
      not yet visible to read_committed consumers); ``commit_transaction(timeout)`` returns
      only when every record of the transaction is durable and visible at once, and raises
      (``SinkError``; ``ProducerFencedError`` when another relay took over) otherwise, in which
      case none of them will ever be visible; ``abort_transaction()`` discards them.
    """

    def begin_transaction(self) -> None: ...

    def commit_transaction(self, timeout: float) -> None: ...

    def abort_transaction(self) -> None: ...
