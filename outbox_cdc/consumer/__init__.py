"""The consumer side of the outbox: typed events from Kafka, commit modes, idempotent processing.

* :class:`EventStream` / :class:`AsyncEventStream` (stream.py, stream_async.py): events from
  topics in a consumer group, committed per mode (``auto``, ``batch``, ``message``), handlers
  retried, then dead-lettered;
* :class:`Inbox` (inbox.py): processed event ids in the consumer's database, in the handler's
  transaction, so duplicates are skipped;
* :func:`parse_record` (events.py), :class:`OffsetBook` (offsets.py), :class:`RetryPolicy`
  (retry.py): the IO-free core; :class:`ConsumerMetrics` (metrics.py).

Guide: docs/consumer.md.
"""

from outbox_cdc.consumer.events import ConsumedEvent, RawRecord, decode_payload, parse_record
from outbox_cdc.consumer.inbox import Inbox, inbox_ddl
from outbox_cdc.consumer.metrics import ConsumerMetrics
from outbox_cdc.consumer.observer import ConsumerObserver
from outbox_cdc.consumer.offsets import CommitMode, OffsetBook
from outbox_cdc.consumer.retry import NO_RETRY, RetryPolicy
from outbox_cdc.consumer.stream import ConsumerOptions, EventStream
from outbox_cdc.consumer.stream_async import AsyncEventStream

__all__ = [
    "NO_RETRY",
    "AsyncEventStream",
    "CommitMode",
    "ConsumedEvent",
    "ConsumerMetrics",
    "ConsumerObserver",
    "ConsumerOptions",
    "EventStream",
    "Inbox",
    "OffsetBook",
    "RawRecord",
    "RetryPolicy",
    "decode_payload",
    "inbox_ddl",
    "parse_record",
]
