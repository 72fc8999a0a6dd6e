"""The retry policy of a failing handler: how many attempts, how long to wait between them, and
the time budget after which the event goes to the dead-letter topic. No IO, no sleeping.

The budget is what bounds a poison event's harm: the consumer handles its partitions one event
at a time, so while an event is retried every other event of this consumer waits (other keys
included). After ``max_attempts`` attempts, or once the next wait would end after
``max_seconds`` since the first attempt, the event is given up on.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbox_cdc.errors import ConfigurationError, EventParseError


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``initial_backoff_s * multiplier ** (attempt - 1)``, capped at
    ``max_backoff_s``. Exceptions of the ``give_up_on`` classes are not retried."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    max_seconds: float = 30.0
    give_up_on: tuple[type[BaseException], ...] = (EventParseError,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("retry max_attempts: must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.max_seconds < 0:
            raise ConfigurationError("retry backoff and max_seconds: must be >= 0")
        if self.multiplier < 1:
            raise ConfigurationError("retry multiplier: must be >= 1")

    def backoff(self, attempt: int) -> float:
        """The wait after the failed attempt number ``attempt`` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))

    def next_wait(self, attempt: int, elapsed_s: float, exc: BaseException) -> float | None:
        """After attempt ``attempt`` failed with ``exc``, ``elapsed_s`` after the first began:
        the seconds to wait before the next attempt, or None to give up."""
        if isinstance(exc, self.give_up_on) or attempt >= self.max_attempts:
            return None
        wait = self.backoff(attempt)
        if elapsed_s + wait > self.max_seconds:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)
