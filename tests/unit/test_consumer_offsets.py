"""The IO-free core of the consumer: offset book, commit policy, retry policy."""

from __future__ import annotations

import pytest

from outbox_cdc.consumer import CommitMode, OffsetBook, RetryPolicy
from outbox_cdc.consumer.offsets import CommitPolicy
from outbox_cdc.errors import ConfigurationError, EventParseError


def test_book_commits_next_offset_after_last_processed() -> None:
    book = OffsetBook()
    assert book.to_commit() == {}
    book.processed(("t", 0), 4)
    book.processed(("t", 0), 5)
    book.processed(("t", 1), 0)
    assert book.to_commit() == {("t", 0): 6, ("t", 1): 1}
    book.committed({("t", 0): 6, ("t", 1): 1})
    assert book.to_commit() == {}
    assert book.pending == 0
    book.processed(("t", 0), 3)  # an older offset never moves the position back
    assert book.to_commit() == {}
    book.processed(("t", 0), 6)
    assert book.to_commit() == {("t", 0): 7}
    book.forget([("t", 0)])
    assert book.to_commit() == {}
    assert book.committed_offsets() == {("t", 0): 6, ("t", 1): 1}  # history survives revoke


@pytest.mark.parametrize(
    ("mode", "after_event", "after_batch"),
    [
        (CommitMode.MESSAGE, True, True),
        (CommitMode.BATCH, False, True),
        (CommitMode.AUTO, False, False),
    ],
)
def test_policy_before_the_interval(mode: CommitMode, after_event: bool, after_batch: bool) -> None:
    policy = CommitPolicy(mode, interval_s=5.0)
    assert policy.after_event(now=101.0, last_commit=100.0) is after_event
    assert policy.after_batch(now=101.0, last_commit=100.0) is after_batch


def test_policy_auto_commits_once_the_interval_is_over() -> None:
    policy = CommitPolicy(CommitMode.AUTO, interval_s=5.0)
    assert policy.after_event(now=105.0, last_commit=100.0)
    assert policy.after_batch(now=105.0, last_commit=100.0)


def test_commit_mode_parse() -> None:
    assert CommitMode.parse("MESSAGE") is CommitMode.MESSAGE
    assert CommitMode.parse(CommitMode.AUTO) is CommitMode.AUTO
    with pytest.raises(ConfigurationError, match="'auto', 'batch' or 'message'"):
        CommitMode.parse("sometimes")
    with pytest.raises(ConfigurationError):
        CommitPolicy(CommitMode.AUTO, interval_s=-1)


def test_retry_backoff_and_budget() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.5, max_backoff_s=2.0, max_seconds=4.0)
    assert [policy.backoff(a) for a in range(1, 5)] == [0.5, 1.0, 2.0, 2.0]
    err = RuntimeError()
    assert policy.next_wait(1, 0.0, err) == 0.5
    assert policy.next_wait(2, 0.6, err) == 1.0
    assert policy.next_wait(3, 1.7, err) == 2.0
    assert policy.next_wait(4, 3.8, err) is None  # the next wait would end past 4 s
    assert policy.next_wait(5, 0.0, err) is None  # attempts exhausted
    assert policy.next_wait(1, 0.0, EventParseError("x")) is None  # never retried


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial_backoff_s": -1}, {"multiplier": 0.5}, {"max_seconds": -1}],
)
def test_retry_policy_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
