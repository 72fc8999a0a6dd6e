"""outbox-cdc: the transactional outbox for Python, relayed from the PostgreSQL WAL to Kafka.

Public API: write events in your own transaction with :func:`publish` (or its async twin), or
through an :class:`Outbox` bound to another table or to the table-less mode.
"""

from outbox_cdc.errors import (
    ConfigurationError,
    EventValidationError,
    OutboxError,
    UnsupportedConnectionError,
)
from outbox_cdc.events import KafkaRecord, OutboxEvent, to_record
from outbox_cdc.outbox import (
    Outbox,
    publish,
    publish_async,
    publish_many,
    publish_many_async,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigurationError",
    "EventValidationError",
    "KafkaRecord",
    "Outbox",
    "OutboxError",
    "OutboxEvent",
    "UnsupportedConnectionError",
    "__version__",
    "publish",
    "publish_async",
    "publish_many",
    "publish_many_async",
    "to_record",
]
