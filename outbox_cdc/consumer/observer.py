"""What the consumer reports to its observer (e.g. :class:`outbox_cdc.consumer.metrics.
ConsumerMetrics`). The stream and the inbox call these hooks; they never import
prometheus_client. Topics are the subscribed ones: a bounded label set.
"""

from __future__ import annotations

from typing import Protocol


class ConsumerObserver(Protocol):
    def consumed(self, topic: str, count: int) -> None:
        """``count`` records of ``topic`` were fetched (before parsing)."""

    def processed(self, topic: str, seconds: float) -> None:
        """An event is done (its handler returned); ``seconds`` since it was handed out."""

    def duplicate(self, topic: str) -> None:
        """The inbox found the event already processed; the handler skipped it."""

    def handler_error(self, topic: str, error: str) -> None:
        """One handler attempt failed (``error``: the exception class name)."""

    def dead_lettered(self, topic: str, reason: str) -> None:
        """A record went to the dead-letter topic; reason ``handler`` or ``unparsable``."""

    def committed(self, partitions: int) -> None:
        """Offsets of ``partitions`` partitions were committed."""

    def commit_failed(self) -> None:
        """A commit failed (it is retried at the next commit point)."""


class NullObserver:
    def consumed(self, topic: str, count: int) -> None:
        pass

    def processed(self, topic: str, seconds: float) -> None:
        pass

    def duplicate(self, topic: str) -> None:
        pass

    def handler_error(self, topic: str, error: str) -> None:
        pass

    def dead_lettered(self, topic: str, reason: str) -> None:
        pass

    def committed(self, partitions: int) -> None:
        pass

    def commit_failed(self) -> None:
        pass
