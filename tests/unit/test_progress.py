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


def test_acknowledged_events_behind_an_unacknowledged_one_count_as_unconfirmed() -> None:
    """What a restart from ``confirmed`` would send again: the stuck first event, and every
    event after it, acknowledged or not."""
    t = AckTracker(0)
    t.begin()
    stuck = t.add_event()
    t.commit(10)
    tickets = []
    for end in (20, 30, 40):
        t.begin()
        tickets.append((t.add_event(), t.add_event()))
        t.commit(end)
    for a, b in tickets:
        t.ack(a)
        t.ack(b)
    assert (t.in_flight, t.unconfirmed, t.window, t.confirmed) == (1, 7, 7, 0)
    assert t.oldest_unconfirmed is stuck
    t.begin()
    t.add_event()
    assert (t.unconfirmed, t.window) == (8, 8)  # the open transaction counts too
    t.ack(stuck)
    assert (t.confirmed, t.in_flight, t.unconfirmed, t.window) == (40, 1, 1, 1)
    assert t.oldest_unconfirmed is None


def test_a_transaction_larger_than_the_window_is_gated_on_its_unacknowledged_events() -> None:
    """Nothing committed waits: the open transaction's own acknowledged events do not count
    against the in-flight limit (else a transaction larger than it could never complete)."""
    t = AckTracker(0)
    t.begin()
    for _ in range(1000):
        t.ack(t.add_event())
    assert (t.in_flight, t.unconfirmed, t.window) == (0, 1000, 0)
    t.commit(10)
    assert (t.confirmed, t.unconfirmed, t.window) == (10, 0, 0)


def test_empty_transactions_add_nothing_to_the_unconfirmed_count() -> None:
    t = AckTracker(0)
    t.begin()
    ticket = t.add_event()
    t.commit(10)
    for end in (20, 30):
        t.begin()
        t.commit(end)
    assert (t.unconfirmed, t.window) == (1, 1)
    t.ack(ticket)
    assert (t.confirmed, t.unconfirmed) == (30, 0)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=30),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_unconfirmed_counts_every_event_after_the_confirmed_position(
    sizes: list[int], seed: int
) -> None:
    """Model check: after every step, ``unconfirmed`` is the number of events of the
    transactions whose commit end is past ``confirmed`` (plus the open one's), ``window`` is
    that count while a committed transaction waits and ``in_flight`` otherwise, and
    ``window >= in_flight``."""
    rng = random.Random(seed)
    t = AckTracker(0)
    txns: list[tuple[int, int]] = []  # (commit end, events) of committed transactions
    outstanding: list[object] = []
    pos = 0

    def check(open_events: int) -> None:
        expected = sum(n for end, n in txns if end > t.confirmed) + open_events
        assert t.unconfirmed == expected
        waiting = any(end > t.confirmed for end, _ in txns)
        assert t.window == (expected if waiting else t.in_flight)
        assert t.window >= t.in_flight

    for size in sizes:
        t.begin()
        for i in range(size):
            ticket = t.add_event()
            if rng.random() < 0.3:
                t.ack(ticket)
            else:
                outstanding.append(ticket)
            check(i + 1)
        pos += rng.randint(1, 100)
        t.commit(pos)
        txns.append((pos, size))
        check(0)
        while outstanding and rng.random() < 0.5:
            t.ack(outstanding.pop(rng.randrange(len(outstanding))))  # type: ignore[arg-type]
            check(0)
    while outstanding:
        t.ack(outstanding.pop(rng.randrange(len(outstanding))))  # type: ignore[arg-type]
        check(0)
    assert (t.unconfirmed, t.window, t.in_flight) == (0, 0, 0)
