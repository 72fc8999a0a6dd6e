"""One exception tree for everything outbox-cdc raises.

Every error says whether retrying the same operation can succeed (``retriable``). Driver
exceptions (psycopg, kafka-python, ...) are mapped to these at the edge, never leaked raw from
the relay. Messages never include passwords, tokens or full connection strings.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every outbox-cdc error."""

    retriable: bool = False


class ConfigurationError(OutboxError):
    """A setting is missing or invalid; the message names the setting and what is expected."""


class EventValidationError(OutboxError, ValueError):
    """An event given to the insert API is invalid. Nothing was written.

    ``field`` names the offending argument (``topic``, ``payload``, ``headers``...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsupportedConnectionError(OutboxError, TypeError):
    """The object passed as ``conn`` to the insert API is not a supported connection kind."""


class ProtocolError(OutboxError):
    """The replication stream or a wal2json object did not have the expected shape."""


class EventDecodeError(OutboxError):
    """A committed outbox row (or message) cannot be turned into a Kafka record.

    Raised for rows written by other tools that bypass the insert API. The relay stops (or
    dead-letters the event, if configured); it never skips it silently.
    """

    def __init__(
        self,
        message: str,
        *,
        event_id: str | None = None,
        lsn: str | None = None,
        seq: int | None = None,
    ):
        where = ", ".join(
            p
            for p in (
                f"event {event_id}" if event_id else "",
                f"commit LSN {lsn}" if lsn else "",
                f"row seq {seq}" if seq is not None else "",
            )
            if p
        )
        super().__init__(f"{message} ({where})" if where else message)
        self.event_id = event_id
        self.lsn = lsn
        self.seq = seq


class SourceError(OutboxError):
    """The database side failed (connection lost, server restarting...). Retriable."""

    retriable = True


class SourceInUseError(SourceError):
    """Another relay holds the source (the replication slot, or the polling lock of the table);
    this relay waits as a standby and takes over when it is free."""


class SlotInUseError(SourceInUseError):
    """Another process streams from the replication slot."""

    def __init__(self, slot: str, pid: int | None) -> None:
        who = f"PID {pid}" if pid is not None else "another process"
        super().__init__(f"replication slot {slot!r} is active for {who}")
        self.slot = slot
        self.pid = pid


class SlotInvalidatedError(SourceError):
    """The slot lost WAL it needed (``wal_status = lost``). Only recreating it helps."""

    retriable = False


class SinkError(OutboxError):
    """Publishing to the broker failed in a way that a retry can fix (broker down, timeout)."""

    retriable = True


class TopicChangedError(SinkError):
    """A topic the relay publishes to disappeared, or has fewer partitions than the relay saw
    (deleted, and perhaps re-created by the broker's auto-create with its default count).
    Waiting cannot fix it: records for the lost partitions are never acknowledged and keys
    would map to other partitions; the message says what to do."""

    retriable = False


class ProducerFencedError(SinkError):
    """Another relay took over the Kafka transactional id (exactly-once mode): this one is a
    zombie and must stop producing; it waits as a standby."""

    retriable = True


class PermanentDeliveryError(SinkError):
    """The broker refused a record for good (too large, not authorized, invalid topic)."""

    retriable = False

    def __init__(
        self,
        message: str,
        *,
        event_id: str | None = None,
        topic: str | None = None,
        too_large: bool = False,
    ):
        detail = ", ".join(
            p
            for p in (f"event {event_id}" if event_id else "", f"topic {topic!r}" if topic else "")
            if p
        )
        super().__init__(f"{message} ({detail})" if detail else message)
        self.event_id = event_id
        self.topic = topic
        self.too_large = too_large  # the record itself exceeds the broker's or client's limit


class PoisonEventError(OutboxError):
    """A committed outbox row cannot be published and no dead-letter topic is set: the relay
    stops rather than skip it."""


# -- consumer side (outbox_cdc.consumer) -----------------------------------------------------------


class ConsumerError(OutboxError):
    """The consumer's Kafka side failed (broker unreachable, a commit or a dead letter not
    acknowledged). Nothing past the last committed offset is lost: a restart redelivers it."""

    retriable = True


class EventParseError(ConsumerError):
    """A Kafka record is not an outbox event (a CloudEvents binary-binding header missing,
    ``ce_specversion`` not 1.0, a key that is not UTF-8) or its payload does not decode as its
    ``content-type`` says. Retrying cannot help: it goes to the dead-letter topic, or, without
    one, the consumer stops before it. ``record`` is the raw record."""

    retriable = False

    def __init__(self, message: str, *, record: object = None) -> None:
        super().__init__(message)
        self.record = record


class HandlerFailedError(ConsumerError):
    """The handler failed on an event after every attempt, and no dead-letter topic is set:
    the consumer stops before that event rather than skip it (its offset is not committed)."""

    retriable = False

    def __init__(self, message: str, *, event: object = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.event = event
        self.attempts = attempts
