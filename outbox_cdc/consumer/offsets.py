"""Offset bookkeeping and the commit policy of the consumer: which offsets may be committed, and
when. No IO: the stream feeds it what it handed out and what was processed, and commits what it
returns.

The rule (Kafka consumer contract, KIP-41 and the ``KafkaConsumer.commitSync`` javadoc): the
offset committed for a partition is the *next* offset to read, i.e. the last **processed**
record's offset + 1, never the position of records merely fetched. Records of a partition are
processed in offset order, one after the other, so "processed up to" is a single number.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from outbox_cdc.errors import ConfigurationError

Partition = tuple[str, int]  # (topic, partition)


class CommitMode(enum.Enum):
    """When processed offsets are committed.

    * ``AUTO``: every ``commit_interval_ms`` (checked between events), and on close;
    * ``BATCH``: when every event of a fetched batch (up to ``max_poll_records``) is processed;
    * ``MESSAGE``: after each event, before the next one is handed out.
    """

    AUTO = "auto"
    BATCH = "batch"
    MESSAGE = "message"

    @classmethod
    def parse(cls, value: CommitMode | str) -> CommitMode:
        if isinstance(value, CommitMode):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ConfigurationError(
                f"commit: {value!r} is not a commit mode; use 'auto', 'batch' or 'message'"
            ) from None


class OffsetBook:
    """Processed and committed offsets per partition."""

    def __init__(self) -> None:
        self._processed: dict[Partition, int] = {}  # next offset after the last processed
        self._committed: dict[Partition, int] = {}  # what Kafka has (as far as we know)
        self._history: dict[Partition, int] = {}  # last commit per partition, kept on revoke

    def processed(self, partition: Partition, offset: int) -> None:
        """The record at ``offset`` is done (handled, or dead-lettered)."""
        nxt = offset + 1
        if nxt > self._processed.get(partition, -1):
            self._processed[partition] = nxt

    def to_commit(self) -> dict[Partition, int]:
        """Offsets to commit: the processed positions Kafka does not have yet."""
        return {p: off for p, off in self._processed.items() if self._committed.get(p, -1) != off}

    def committed(self, offsets: dict[Partition, int]) -> None:
        """Kafka acknowledged the commit of ``offsets``."""
        self._committed.update(offsets)
        self._history.update(offsets)

    def record_history(self, offsets: dict[Partition, int]) -> None:
        """A commit of partitions no longer ours was acknowledged (for committed_offsets())."""
        self._history.update(offsets)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """The partitions were revoked (or lost): what was not committed will be redelivered to
        their next owner, which the inbox makes harmless."""
        for p in partitions:
            self._processed.pop(p, None)
            self._committed.pop(p, None)

    def committed_offsets(self) -> dict[Partition, int]:
        """The last offset this consumer committed per partition (revoked ones included)."""
        return dict(self._history)

    @property
    def pending(self) -> int:
        """Partitions with processed offsets not committed yet."""
        return len(self.to_commit())


@dataclass(frozen=True)
class CommitPolicy:
    """Decides, from the mode and the clock, whether to commit now."""

    mode: CommitMode
    interval_s: float = 5.0

    def __post_init__(self) -> None:
        if self.interval_s < 0:
            raise ConfigurationError("commit_interval_ms: must be >= 0")

    def after_event(self, now: float, last_commit: float) -> bool:
        """Called after each processed event."""
        if self.mode is CommitMode.MESSAGE:
            return True
        return self.mode is CommitMode.AUTO and now - last_commit >= self.interval_s

    def after_batch(self, now: float, last_commit: float) -> bool:
        """Called when the fetched batch is exhausted (before fetching the next one), and after
        an empty fetch."""
        if self.mode is CommitMode.AUTO:
            return now - last_commit >= self.interval_s
        return True  # BATCH; MESSAGE has nothing left by then
