"""The dead letter of a record the consumer could not process. No IO.

A dead letter is the original record (key, value, headers, untouched) plus headers that say what
went wrong and where the record came from, so it can be inspected and replayed::

    outbox_cdc_error                the error message (at most 2,000 characters)
    outbox_cdc_error_class          the exception class, module-qualified
    outbox_cdc_original_topic       topic, partition and offset of the original record
    outbox_cdc_original_partition
    outbox_cdc_original_offset
    outbox_cdc_attempts             how many times the handler ran (0: the record never reached it)
    outbox_cdc_consumer_group       the consumer group that gave up

``outbox_cdc_error`` and ``outbox_cdc_original_topic`` are the relay's own dead-letter headers.
"""

from __future__ import annotations

from outbox_cdc.consumer.events import RawRecord
from outbox_cdc.events import KafkaRecord

MAX_ERROR_CHARS = 2000


def error_class(exc: BaseException) -> str:
    cls = type(exc)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def dead_letter_record(
    record: RawRecord, exc: BaseException, *, topic: str, attempts: int, group: str
) -> KafkaRecord:
    message = str(exc) or type(exc).__name__
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    extra = [
        ("outbox_cdc_error", message.encode("utf-8", "replace")),
        ("outbox_cdc_error_class", error_class(exc).encode()),
        ("outbox_cdc_original_topic", record.topic.encode()),
        ("outbox_cdc_original_partition", str(record.partition).encode()),
        ("outbox_cdc_original_offset", str(record.offset).encode()),
        ("outbox_cdc_attempts", str(attempts).encode()),
        ("outbox_cdc_consumer_group", group.encode("utf-8", "replace")),
    ]
    event_id = next((v.decode("utf-8", "replace") for n, v in record.headers if n == "ce_id"), "")
    return KafkaRecord(
        topic=topic,
        key=record.key,
        value=record.value if record.value is not None else b"",
        headers=[*record.headers, *extra],
        event_id=event_id,
    )
