"""The ack rule: a position is confirmed only when everything up to it was acknowledged."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox_cdc.protocol.progress import AckTracker


def test_commit_confirmed_only_after_all_its_events_are_acked() -> None:
    t = AckTracker(100)
    t.begin()
    a, b = t.add_event(), t.add_event()
    t.commit(200)
    assert t.confirmed == 100
    t.ack(a)
    assert t.confirmed == 100
    t.ack(b)
    assert (t.confirmed, t.delivered, t.in_flight) == (200, 200, 0)


def test_later_transaction_waits_for_earlier_one() -> None:
    t = AckTracker(0)
    t.begin()
    first = t.add_event()
    t.commit(10)
    t.begin()
    second = t.add_event()
    t.commit(20)
    t.ack(second)
    assert t.confirmed == 0
    t.ack(first)
    assert (t.confirmed, t.delivered) == (20, 20)


def test_acks_before_commit_arrive_are_kept() -> None:
    t = AckTracker(0)
    t.begin()
    t.ack(t.add_event())
    assert t.confirmed == 0  # the transaction is still open
    t.commit(30)
    assert t.confirmed == 30


def test_empty_transactions_are_confirmed_once_everything_before_is() -> None:
    t = AckTracker(0)
    t.begin()
    t.commit(5)
    assert (t.confirmed, t.delivered) == (5, 0)
    t.begin()
    ev = t.add_event()
    t.commit(10)
    for end in (11, 12, 13):  # a busy database: runs of empty transactions
        t.begin()
        t.commit(end)
    assert t.confirmed == 5
    t.ack(ev)
    assert (t.confirmed, t.delivered) == (13, 10)


def test_idle_position_only_when_nothing_in_flight_and_no_open_transaction() -> None:
    t = AckTracker(0)
    t.idle(50)
    assert t.confirmed == 50
    t.begin()
    t.idle(60)
    assert t.confirmed == 50  # inside a transaction
    ev = t.add_event()
    t.commit(70)
    t.idle(80)
    assert t.confirmed == 50  # an event is in flight
    t.ack(ev)
    assert t.confirmed == 70
    t.idle(65)
    assert t.confirmed == 70  # never backwards
    t.idle(90)
    assert t.confirmed == 90


def test_misuse_is_reported() -> None:
    t = AckTracker()
    with pytest.raises(RuntimeError):
        t.commit(1)
    with pytest.raises(RuntimeError):
        t.add_event()
    t.begin()
    with pytest.raises(RuntimeError):
        t.begin()


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=30),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_confirmed_never_passes_an_unacknowledged_event(sizes: list[int], seed: int) -> None:
    """Model check: feed transactions, ack their events in a random order, interleave idle
    positions; after every step, confirmed <= the commit end of every transaction that still
    has an unacknowledged event, and confirmed never goes backwards."""
    rng = random.Random(seed)
    t = AckTracker(0)
    outstanding: list[tuple[int, object]] = []  # (commit end, ticket)
    ends: list[int] = []
    pos = 0
    last_confirmed = 0
    pending_commit: list[tuple[int, object]] = []

    def check() -> None:
        nonlocal last_confirmed
        assert t.confirmed >= last_confirmed
        last_confirmed = t.confirmed
        for end, _ in outstanding:
            assert t.confirmed < end
        if t.in_flight == 0 and not t.busy:
            assert t.confirmed >= (ends[-1] if ends else 0)

    for size in sizes:
        t.begin()
        tickets = [t.add_event() for _ in range(size)]
        # some acks may come before the commit
        early = [tk for tk in tickets if rng.random() < 0.3]
        pos += rng.randint(1, 100)
        for tk in tickets:
            pending_commit.append((pos, tk))
        for tk in early:
            t.ack(tk)
            pending_commit.remove((pos, tk))
        t.commit(pos)
        ends.append(pos)
        outstanding.extend((e, k) for e, k in pending_commit if e == pos)
        pending_commit = [(e, k) for e, k in pending_commit if e != pos]
        check()
        while outstanding and rng.random() < 0.5:
            i = rng.randrange(len(outstanding))
            _, tk = outstanding.pop(i)
            t.ack(tk)  # type: ignore[arg-type]
            check()
        if rng.random() < 0.2:
            # a keepalive's walEnd: beyond everything sent so far, before anything sent later
            pos += rng.randint(0, 50)
            t.idle(pos)
            check()
    while outstanding:
        _, tk = outstanding.pop(rng.randrange(len(outstanding)))
        t.ack(tk)  # type: ignore[arg-type]
        check()
    assert t.confirmed >= ends[-1]
    assert t.in_flight == 0
