"""The relay: source -> sink -> ack loop, with backpressure, retries and a clean shutdown.

One thread runs the loop. The sink's delivery callbacks (from the client's IO thread) only put
completions on a queue and wake the loop through a socket pair; all state changes happen here.

What it must not do: confirm a position before the sink acknowledged every event up to it
(that is :class:`~outbox_cdc.protocol.progress.AckTracker`'s rule), skip an event it could not
publish, or retry silently (every state change is one log line).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from outbox_cdc.errors import (
    ConfigurationError,
    EventDecodeError,
    OutboxError,
    PermanentDeliveryError,
    PoisonEventError,
    ProducerFencedError,
    SinkError,
    SourceError,
    SourceInUseError,
)
from outbox_cdc.events import KafkaRecord, OutboxEvent, to_record
from outbox_cdc.exactly_once import Progress
from outbox_cdc.protocol.progress import AckTracker, Transaction
from outbox_cdc.sinks.base import Sink
from outbox_cdc.sources.base import Begin, Commit, Item, Source

log = logging.getLogger(__name__)
_REFUSED_MEMORY = 10_000  # refused event ids remembered (see Relay._refused)
REMINDER_INTERVAL = 60.0  # seconds between two lines about the same unresolved failure


class RelayObserver(Protocol):
    """Hooks for metrics (:mod:`outbox_cdc.metrics`); every method must be cheap and must not
    raise. Times are epoch seconds; durations seconds."""

    def published(self, record: KafkaRecord, commit_time: float, send_seconds: float) -> None:
        """Kafka acknowledged ``record``; its transaction committed at ``commit_time`` (the
        event's creation time when the source cannot tell), it was sent ``send_seconds`` ago."""

    def source_time(self, commit_time: float) -> None:
        """The relay has read the source up to a transaction committed at ``commit_time``."""

    def state(self, state: str) -> None:
        """streaming, standby, stalled, failing:<error>, stopped."""

    def error(self, reason: str) -> None:
        """A publish or connection error, by reason (a short fixed word)."""

    def slot_gap(self) -> None:
        """The slot was recreated over a gap; its rows are re-published now."""

    def gap_published(self, events: int) -> None:
        """``events`` rows of a slot gap were re-published (acknowledged)."""


POISON_ADVICE = (
    "The relay stopped so that nothing after it is confirmed. Set a dead-letter topic "
    "(--dead-letter-topic) to route such rows there and restart; in polling mode fixing or "
    "deleting the row works too (in WAL mode the row stays in the WAL: deleting it does not help)"
)


class ProgressReader(Protocol):
    def load(self, key: str) -> dict[str, Any] | None: ...


class NullObserver:
    def published(self, record: KafkaRecord, commit_time: float, send_seconds: float) -> None:
        pass

    def source_time(self, commit_time: float) -> None:
        pass

    def state(self, state: str) -> None:
        pass

    def error(self, reason: str) -> None:
        pass

    def slot_gap(self) -> None:
        pass

    def gap_published(self, events: int) -> None:
        pass


@dataclass(frozen=True)
class RelayOptions:
    source_name: str = "outbox-cdc"
    max_in_flight_events: int = 20_000
    max_in_flight_bytes: int = 64 * 1024 * 1024
    read_batch: int = 2_000
    dead_letter_topic: str | None = None
    shutdown_timeout: float = 30.0
    standby_poll_interval: float = 2.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stall_warning: float = 15.0
    # exactly-once mode (Kafka transactions; see docs/exactly-once.md)
    exactly_once: bool = False
    progress_topic: str = "outbox_cdc_progress"
    transaction_max_events: int = 1000
    transaction_max_seconds: float = 0.1
    transaction_timeout: float = 60.0


class _Backoff:
    """Doubles up to ``maximum``, with jitter (each delay 75-100 % of the nominal one, so
    relays restarted together do not retry in step); reset only after real progress."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum, self.current = initial, maximum, initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.75, 1.0)
        self.current = min(self.maximum, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.initial


class _Completion:
    __slots__ = ("commit_time", "exc", "generation", "nbytes", "record", "sent_at", "txn")

    def __init__(
        self,
        generation: int,
        txn: Transaction,
        record: KafkaRecord,
        nbytes: int,
        commit_time: float,
        sent_at: float,
    ):
        self.generation = generation
        self.txn = txn
        self.record = record
        self.nbytes = nbytes
        self.commit_time = commit_time
        self.sent_at = sent_at
        self.exc: BaseException | None = None


class Relay:
    """Runs until :meth:`stop` is called (or a non-retriable error), then drains and returns."""

    def __init__(
        self,
        source: Source,
        sink_factory: Callable[[], Sink],
        options: RelayOptions | None = None,
        observer: RelayObserver | None = None,
        progress_store: ProgressReader | None = None,
    ) -> None:
        self.source = source
        self.progress_store = progress_store
        self.sink_factory = sink_factory
        self.options = options or RelayOptions()
        self.observer = observer or NullObserver()
        self.sink: Sink | None = None
        self.tracker = AckTracker()
        self.delivered = 0  # survives reconnects: this process's own record of delivery
        self._stopping = threading.Event()
        self._done: queue.SimpleQueue[_Completion] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_pending = False
        self._wake_w.setblocking(False)
        self._generation = 0
        self._in_flight_bytes = 0
        self._waiting_since = 0.0  # monotonic time of the last acknowledgment while waiting
        self._unackable = 0  # events that failed for good: never acknowledged, never confirmed
        # Events Kafka refused for good, by event id, kept across pipeline restarts: when the
        # source sends one again (the restart came before its dead letter was acknowledged),
        # it goes straight to the dead-letter topic instead of being refused again.
        self._refused: collections.OrderedDict[str, PermanentDeliveryError] = (
            collections.OrderedDict()
        )
        self._state = ""
        self._backoff = _Backoff(self.options.backoff_initial, self.options.backoff_max)
        # The failure being retried, until real progress (the confirmed position moves): its
        # first line, its reconnect, then one reminder a minute, instead of a line per retry.
        self._streak: str | None = None
        self._streak_since = 0.0
        self._streak_logged = 0.0
        self._streak_reconnected = 0  # successful reconnects during the streak
        self._repeated: dict[str, float] = {}  # repeated error lines: when each last went out
        self._confirmed_at = 0.0  # monotonic time the confirmed position last moved
        self._held_logged = 0.0  # last warning that it does not move although Kafka acknowledges
        self._stop_deadline = 0.0  # set by stop(): reading the open transaction, then draining
        self._commit_time: float | None = None  # of the transaction being read
        self.loop_time = time.monotonic()  # last pass of the loop: liveness for /healthz

    @property
    def state(self) -> str:
        """streaming, standby, stalled, failing:<error>, or empty before the first connection."""
        return self._state

    # -- control --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop reading, deliver what is in flight, confirm, and return.
        Safe to call from a signal handler or another thread."""
        self._stop_deadline = time.monotonic() + self.options.shutdown_timeout
        self._stopping.set()
        self._wake()

    def _wake(self) -> None:
        # Runs once per acknowledgment, on the client's IO thread. One byte per wake-up is
        # enough: while the flag is set, a byte is unread or the loop is about to clear the
        # flag and then drain the queue, so it sees this completion too (see _drain_wake).
        # A plain try is cheaper than contextlib.suppress here.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:  # noqa: SIM105
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already awake (buffer full) or closed

    def _set_state(
        self, state: str, message: str, *args: object, level: int = logging.INFO
    ) -> None:
        """One log line per state change: a retry loop never floods the log."""
        if state != self._state:
            log.log(level, message, *args)
            self._state = state
            self.observer.state(state)

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Raises a non-retriable OutboxError; returns after a requested stop."""
        backoff = self._backoff
        try:
            while not self._stopping.is_set():
                try:
                    self._run_once(backoff)
                except (SourceInUseError, ProducerFencedError) as exc:
                    self._set_state("standby", "standby: %s; waiting to take over", exc)
                    if isinstance(exc, ProducerFencedError):
                        self._abandon()
                    self._close_source()
                    self._sleep(self.options.standby_poll_interval)
                except (SourceError, SinkError) as exc:
                    if not exc.retriable:
                        raise
                    self.observer.error(
                        "kafka_unavailable"
                        if isinstance(exc, SinkError)
                        else "database_unavailable"
                    )
                    delay = backoff.next()
                    if isinstance(exc, SinkError):
                        what = (
                            "%s; nothing past %s is confirmed, the source keeps the events; "
                            "retrying with backoff (at most %.0fs)"
                        )
                    else:
                        self._salvage()
                        name = self.source.name
                        what = (
                            "" if str(exc).startswith(name) else f"{name}: "
                        ) + "%s; delivered up to %s; reconnecting with backoff (at most %.0fs)"
                    self._failing(
                        f"failing:{type(exc).__name__}",
                        exc,
                        what,
                        self.source.describe(max(self.tracker.confirmed, self.delivered)),
                        self.options.backoff_max,
                    )
                    self._abandon(
                        keep_sink=isinstance(exc, SourceError)
                        and self.sink is not None
                        # a new transactional producer aborts the open Kafka transaction
                        and not self.options.exactly_once
                    )
                    self._sleep(delay)
        finally:
            self._shutdown()

    def _failing(self, state: str, exc: OutboxError, message: str, *args: object) -> None:
        """One ERROR line when a failure starts (or changes); while the same failure repeats
        without progress in between, one reminder a minute."""
        now = time.monotonic()
        if self._streak != state:
            self._streak, self._streak_since, self._streak_logged = state, now, now
            self._streak_reconnected = 0
            self._state = ""  # a new failure: always its line
            self._set_state(state, message, exc, *args, level=logging.ERROR)
            return
        self._state = state
        self.observer.state(state)
        if now - self._streak_logged >= REMINDER_INTERVAL:
            self._streak_logged = now
            log.error(
                "still failing after %.0fs: %s; retrying with backoff (at most %.0fs)",
                now - self._streak_since,
                exc,
                self.options.backoff_max,
            )

    def _connected(self, message: str, *args: object) -> None:
        """The source is open: "streaming" (its line once per failure streak)."""
        if self._streak is not None and self._streak_reconnected:
            log.debug(message + " (again, %s not resolved yet)", *args, self._streak)
            self._state = "streaming"
            self.observer.state("streaming")
        else:
            self._set_state("streaming", message, *args)
        if self._streak is not None:
            self._streak_reconnected += 1

    def _progressed(self) -> None:
        """The confirmed position moved: real progress, the backoff starts over."""
        now = time.monotonic()
        if self._held_logged:
            self._held_logged = 0.0
            log.info("the confirmed position moves again after %.0fs", now - self._confirmed_at)
        self._confirmed_at = now
        self._backoff.reset()
        if self._repeated:
            self._repeated.clear()
        if self._streak is not None:
            if self._streak_reconnected > 1:  # the reconnects after the first were quiet
                log.info(
                    "delivering again after %.0fs of failures (%s, %d reconnects)",
                    time.monotonic() - self._streak_since,
                    self._streak.split(":", 1)[-1],
                    self._streak_reconnected,
                )
            self._streak = None

    def _log_repeating(self, key: str, message: str, *args: object) -> None:
        """An ERROR line that a retry loop would repeat (a dead letter sent again after each
        pipeline restart): once, then at most once a minute until progress."""
        now = time.monotonic()
        last = self._repeated.get(key)
        if last is None or now - last >= REMINDER_INTERVAL:
            self._repeated[key] = now
            log.error(message + ("" if last is None else " (again)"), *args)
        else:
            log.debug(message, *args)

    def _sleep(self, seconds: float) -> None:
        """Wait (backoff, standby), staying visibly alive for /healthz."""
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            self.loop_time = now = time.monotonic()
            if now >= deadline:
                return
            self._stopping.wait(min(5.0, deadline - now))

    def _run_once(self, backoff: _Backoff) -> None:
        if self.options.exactly_once:
            self._run_once_transactional(backoff)
            return
        if self.sink is None:
            self.sink = self.sink_factory()
        self._backfill()
        start = self.source.open(self.delivered)
        self.tracker = AckTracker(start)
        self.delivered = max(self.delivered, start)
        self._generation += 1
        self._in_flight_bytes = 0
        self._unackable = 0
        self._connected("streaming from %s", self.source.describe(start))
        self._confirmed_at, self._held_logged = time.monotonic(), 0.0
        self._pump()

    def _pump(self) -> None:
        opts = self.options
        source, tracker = self.source, self.tracker
        sink = self.sink
        assert sink is not None
        wake_fd = self._wake_r.fileno()
        source_name = opts.source_name
        generation = self._generation
        txn: Transaction | None = None
        send = self._send
        observer = self.observer
        monotonic = time.monotonic
        progress_at = tracker.confirmed
        first = False  # the next event is the first of its transaction

        # After stop(), read on to the end of a partly read transaction (bounded by the
        # shutdown timeout): its events delivered so far become confirmable, instead of being
        # sent again after a restart.
        while not self._stopping.is_set() or (
            tracker.in_transaction and time.monotonic() < self._stop_deadline
        ):
            self._drain_completions()
            # acknowledged events behind an unacknowledged one count too: the limit bounds
            # what a restart from the confirmed position sends again (AckTracker.window)
            window = tracker.window
            full = (
                window >= opts.max_in_flight_events
                or self._in_flight_bytes >= opts.max_in_flight_bytes
            )
            if full:
                # Backpressure: stop reading, keep the server connection alive.
                source.tick()
                self._check_held()
                self._check_stalled()
                self._wait_for_wake(0.5)
                continue
            # never read more events than the in-flight limit still allows
            room = min(opts.read_batch, opts.max_in_flight_events - window)
            items = source.read(1.0, wake_fd, room)
            commit_time = self._commit_time
            for item in items:
                kind = type(item)
                if kind is OutboxEvent:
                    assert isinstance(item, OutboxEvent)
                    record = to_record(item, source_name)
                    txn = tracker.add_event()
                    size = len(record.value) + 64
                    self._in_flight_bytes += size
                    when = commit_time if commit_time is not None else item.created_at.timestamp()
                    c = _Completion(generation, txn, record, size, when, monotonic())
                    if first:  # noted for the warning of _check_held
                        txn.first, first = c, False
                    refused = self._refused.get(record.event_id) if self._refused else None
                    if refused is not None and opts.dead_letter_topic:
                        self._send_dead_letter(c, str(refused), too_large=refused.too_large)
                    else:
                        send(c)
                elif kind is Begin:
                    assert isinstance(item, Begin)
                    tracker.begin()
                    commit_time, first = item.commit_time, True
                elif kind is Commit:
                    assert isinstance(item, Commit)
                    tracker.commit(item.end)
                    if item.commit_time is not None:
                        observer.source_time(item.commit_time)
                    commit_time = None
                else:
                    assert isinstance(item, EventDecodeError)
                    self._poison(item, tracker.add_event(), generation)
            self._commit_time = commit_time
            if not items:
                idle = source.idle_position()
                if idle is not None:
                    tracker.idle(idle)
            self._drain_wake()
            self._drain_completions()
            source.confirm(tracker.confirmed, tracker.delivered)
            if tracker.confirmed != progress_at:
                progress_at = tracker.confirmed
                self._progressed()
            if tracker.in_flight:
                self._check_held()
                self._check_stalled()
            else:
                self._waiting_since = 0.0

    # -- exactly-once mode ------------------------------------------------------------------------

    def _run_once_transactional(self, backoff: _Backoff) -> None:
        """Claim the source, fence older producers, read the committed progress, resume there.

        The order matters: a standby must not fence the active relay's producer, so the slot is
        checked first; creating the transactional producer settles the previous owner's last
        Kafka transaction, so the progress read after it is final; only then does the stream
        start, at the recorded position (the relay's own durable record, never a guess)."""
        source = self.source
        store = self.progress_store
        if store is None:
            raise ConfigurationError("exactly_once needs a progress store")
        check_available = getattr(source, "check_available", None)
        progress_key = getattr(source, "progress_key", None)
        if check_available is None or progress_key is None:
            raise ConfigurationError("exactly_once: this source does not support it")
        check_available()
        if self.sink is None:
            self.sink = self.sink_factory()
        self._backfill()
        key = progress_key()
        record = store.load(key)
        recorded = record["position"] if record else None
        restore = getattr(source, "restore", None)
        if record and record.get("state") and restore is not None:
            restore(record["state"])  # polling: the rows of the last committed batch
        start = source.open(max(self.delivered, recorded or 0))
        self.tracker = AckTracker(start)
        self.delivered = max(self.delivered, start)
        self._generation += 1
        self._in_flight_bytes = 0
        self._unackable = 0
        self._connected(
            "streaming from %s, exactly once (last committed progress: %s)",
            source.describe(start),
            "none" if recorded is None else source.describe(recorded),
        )
        self._pump_transactional(key)

    def _pump_transactional(self, key: str) -> None:
        """Whole source transactions per Kafka transaction, with the progress record; the
        source is confirmed only after Kafka committed."""
        opts = self.options
        source, observer = self.source, self.observer
        sink = self.sink
        assert sink is not None
        txn_sink: Any = sink
        wake_fd = self._wake_r.fileno()
        errors: list[BaseException] = []
        leftover: list[Item] = []
        commit_time: float | None = None

        acked = [0]  # records Kafka acknowledged (only written by the client's IO thread)

        def on_done(exc: BaseException | None) -> None:
            if exc is None:
                acked[0] += 1
            else:
                errors.append(exc)
                self._wake()

        while True:
            opened = False
            sent: list[tuple[KafkaRecord, float, float]] = []
            last_end: int | None = None
            in_txn = False
            started = 0.0
            while True:
                if self._stopping.is_set() and not in_txn and not leftover:
                    break
                if self._stopping.is_set() and time.monotonic() > self._stop_deadline:
                    if opened:  # a source transaction still unread: deliver none of it
                        txn_sink.abort_transaction()
                    return
                if leftover:
                    items, leftover = leftover, []
                else:
                    items = source.read(0.02 if sent else 1.0, wake_fd, opts.read_batch)
                cut = False
                for i, item in enumerate(items):
                    kind = type(item)
                    if kind is OutboxEvent or kind is EventDecodeError:
                        if not opened:
                            txn_sink.begin_transaction()
                            opened, started = True, time.monotonic()
                        if kind is OutboxEvent:
                            assert isinstance(item, OutboxEvent)
                            record = to_record(item, opts.source_name)
                            when = commit_time or item.created_at.timestamp()
                        else:
                            assert isinstance(item, EventDecodeError)
                            record = self._dead_letter_record(item)
                            when = time.time()
                        sink.send(record, on_done)
                        sent.append((record, when, time.monotonic()))
                    elif kind is Begin:
                        assert isinstance(item, Begin)
                        in_txn, commit_time = True, item.commit_time
                    else:
                        assert isinstance(item, Commit)
                        in_txn, last_end = False, item.end
                        if item.commit_time is not None:
                            observer.source_time(item.commit_time)
                        if opened and (
                            len(sent) >= opts.transaction_max_events
                            or time.monotonic() - started >= opts.transaction_max_seconds
                        ):
                            leftover, cut = list(items[i + 1 :]), True
                            break
                if errors:
                    raise self._transaction_error(errors[0])
                self._drain_wake()
                self.loop_time = time.monotonic()
                if cut or (not items and not in_txn and last_end is not None):
                    break
                if not items and not in_txn and not opened:
                    idle = source.idle_position()
                    if idle is not None:
                        self.tracker.idle(idle)
                        source.confirm(self.tracker.confirmed, self.delivered)
            if last_end is None:
                if opened:
                    txn_sink.abort_transaction()
                return  # stopping, and nothing read
            if opened:
                progress_state = getattr(source, "progress_state", None)
                state = progress_state(last_end) if progress_state is not None else None
                sink.send(Progress(key, last_end, state).record(opts.progress_topic), on_done)
                acked[0] -= len(sent) + 1  # < 0 while records of this transaction are pending
                left = self._await_acks(sink, acked, errors, opts.transaction_timeout)
                txn_sink.commit_transaction(left)
                if errors:
                    raise self._transaction_error(errors[0])
                now = time.monotonic()
                for record, when, sent_at in sent:
                    observer.published(record, when, now - sent_at)
            self.delivered = max(self.delivered, last_end)
            self.tracker.idle(last_end)
            source.confirm(self.tracker.confirmed, self.delivered)
            self._progressed()
            if self._stopping.is_set() and not leftover:
                return

    # -- a slot recreated over a gap ------------------------------------------------------------

    def _backfill(self) -> None:
        """Publish the rows of a slot gap (``source.backfill()``, see sources/slot_gap.py)
        before the source streams anything newer: page by page, each page fully acknowledged
        (in exactly-once mode: one Kafka transaction) before its progress is recorded."""
        backfill = getattr(self.source, "backfill", None)
        gap = backfill() if backfill is not None else None
        if gap is None:
            return
        opts = self.options
        sink = self.sink
        assert sink is not None
        txn_sink: Any = sink
        delivered = self.delivered
        self._generation += 1
        generation = self._generation
        tracker = self.tracker = AckTracker(0)
        self._in_flight_bytes = 0
        self._unackable = 0
        self._waiting_since = 0.0
        self._set_state("recovering", "%s", gap.describe(), level=logging.WARNING)
        self.observer.slot_gap()
        position = 0
        try:
            while not self._stopping.is_set():
                page = gap.next_page()
                if not page:
                    gap.finish()
                    return
                if opts.exactly_once:
                    txn_sink.begin_transaction()
                tracker.begin()
                for _seq, item in page:
                    txn = tracker.add_event()
                    if type(item) is OutboxEvent:
                        record = to_record(item, opts.source_name)
                        c = _Completion(
                            generation,
                            txn,
                            record,
                            len(record.value) + 64,
                            item.created_at.timestamp(),
                            time.monotonic(),
                        )
                        self._in_flight_bytes += c.nbytes
                        self._send(c)
                    else:
                        assert isinstance(item, EventDecodeError)
                        self._poison(item, txn, generation)
                position += 1
                tracker.commit(position)
                if opts.exactly_once:
                    txn_sink.commit_transaction(opts.transaction_timeout)
                while tracker.confirmed < position:
                    if self._stopping.is_set() and time.monotonic() >= self._stop_deadline:
                        return
                    self._wait_for_wake(0.5)
                    self._drain_completions()
                gap.acknowledged(page)
                self.observer.gap_published(len(page))
        finally:
            gap.close()
            self.tracker = AckTracker(delivered)
            self.delivered = delivered

    def _await_acks(
        self, sink: Sink, acked: list[int], errors: list[BaseException], timeout: float
    ) -> float:
        """Exactly-once mode: flush in slices of a second until Kafka acknowledged the
        transaction's records (``acked[0]`` back at 0), so that a silent broker gets the same
        warning as in at-least-once mode. Returns what is left of ``timeout``."""
        deadline = time.monotonic() + timeout
        self._waiting_since = 0.0
        seen = acked[0]
        while acked[0] < 0 and not errors:
            now = time.monotonic()
            if now >= deadline:
                break
            sink.flush(min(1.0, deadline - now))
            self.loop_time = time.monotonic()
            if acked[0] != seen:
                seen = acked[0]
                self._waiting_since = self.loop_time
                if self._state == "stalled":
                    self._set_state("streaming", "Kafka acknowledges again")
            elif acked[0] < 0:
                self._check_stalled(-acked[0])
        return max(1.0, deadline - time.monotonic())

    def _transaction_error(self, exc: BaseException) -> OutboxError:
        if isinstance(exc, PermanentDeliveryError):
            self.observer.error("rejected")
            return PermanentDeliveryError(
                f"{exc}. In exactly-once mode a refused record aborts its whole Kafka "
                "transaction and stops the relay: fix the cause and restart",
                event_id=None,
            )
        if isinstance(exc, SinkError):
            return exc
        return SinkError(f"Kafka delivery failed: {exc}")

    def _dead_letter_record(self, err: EventDecodeError) -> KafkaRecord:
        """The dead letter of an undecodable row (both modes); raises PoisonEventError when no
        dead-letter topic is set."""
        topic = self.options.dead_letter_topic
        self.observer.error("undecodable")
        if not topic:
            raise PoisonEventError(f"{err}. {POISON_ADVICE}")
        self._log_repeating(
            f"undecodable:{err.event_id}:{err}",
            "%s; sending it to dead-letter topic %s",
            err,
            topic,
        )
        return KafkaRecord(
            topic=topic,
            key=None,
            value=str(err).encode(),
            headers=[("outbox_cdc_error", str(err).encode())],
            event_id=err.event_id or "",
        )

    def _check_stalled(self, waiting: int | None = None) -> None:
        """Say so (once) when the broker has acknowledged nothing for a while: the client
        keeps retrying silently until its delivery timeout, which can be minutes.
        ``waiting``: the records waiting (default: the tracker's events in flight)."""
        now = time.monotonic()
        if not self._waiting_since:
            self._waiting_since = now
        elif (
            now - self._waiting_since >= self.options.stall_warning
            and self._state == "streaming"
            and not self._held_logged  # _check_held named the record it waits for
        ):
            self._set_state(
                "stalled",
                "Kafka has acknowledged nothing for %.0fs; %d events waiting; nothing past %s is "
                "confirmed; still trying",
                now - self._waiting_since,
                self.tracker.in_flight if waiting is None else waiting,
                self.source.describe(self.tracker.confirmed),
                level=logging.WARNING,
            )

    def _check_held(self) -> None:
        """Warn (then once a minute) when the confirmed position has not moved for the stall
        threshold although Kafka acknowledges events: one record holds everything after it
        back (e.g. for a partition that no longer exists), until the delivery timeout."""
        now = time.monotonic()
        waited = now - self._confirmed_at
        tracker = self.tracker
        behind = tracker.unconfirmed - tracker.in_flight  # acknowledged, not confirmed
        if (
            waited < self.options.stall_warning
            or not self._confirmed_at
            or (self._held_logged and now - self._held_logged < REMINDER_INTERVAL)
            # a broker outage (nothing acknowledged lately, and fewer events acknowledged
            # than waiting since the confirmed position) is _check_stalled's warning
            or behind <= 0
            or (
                now - self._waiting_since >= self.options.stall_warning / 2
                and behind < tracker.in_flight
            )
        ):
            return
        self._held_logged = now
        log.warning(
            "the confirmed position has not moved for %.0fs although Kafka acknowledges "
            "events: %d events (%d acknowledged) wait behind the oldest unacknowledged record "
            "(%s); nothing past %s is confirmed; reading stops at max_in_flight_events (%d)",
            waited,
            tracker.unconfirmed,
            behind,
            self._oldest_unacknowledged(now),
            self.source.describe(tracker.confirmed),
            self.options.max_in_flight_events,
        )

    def _oldest_unacknowledged(self, now: float) -> str:
        """Topic, partition (from the client, when it tells) or key, and age of the record
        confirmation waits for."""
        probe = getattr(self.sink, "oldest_unacknowledged", None)
        found = probe() if probe is not None else None
        if found is not None:
            topic, partition, age = found
            return f"topic {topic}, partition {partition}, sent {age:.0f}s ago"
        txn = self.tracker.oldest_unconfirmed
        c = txn.first if txn is not None else None
        if not isinstance(c, _Completion):
            return "unknown"
        key = c.record.key.decode(errors="replace") if c.record.key is not None else None
        return (
            f"topic {c.record.topic}, key {key!r}, sent {now - c.sent_at:.0f}s ago: the first "
            f"of its transaction, {txn.pending if txn else 0} of whose "
            f"{txn.events if txn else 0} events are unacknowledged"
        )

    def _wait_for_wake(self, timeout: float) -> None:
        import select

        select.select([self._wake_r], [], [], timeout)
        self._drain_wake()

    def _drain_wake(self) -> None:
        # Read the bytes first, then clear the flag, and only then drain the queue (callers
        # do). Clearing first loses a wake-up: a completion arriving in between sets the flag
        # and sends a byte that this read swallows; the flag then stays set with no byte
        # pending, later completions send none, and the loop sleeps out its whole timeout
        # (seen as one-second stalls between polling batches).
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._wake_pending = False

    def _drain_completions(self) -> None:
        tracker = self.tracker
        get = self._done.get_nowait
        observer = self.observer
        generation = self._generation
        advanced = False
        now = time.monotonic()
        self.loop_time = now
        try:
            while True:
                try:
                    c = get()
                except queue.Empty:
                    break
                if c.generation != generation:
                    continue  # from a pipeline we abandoned; the source resends those events
                if c.exc is not None:
                    self._delivery_failed(c)  # raises unless the event was dead-lettered
                    continue
                self._in_flight_bytes -= c.nbytes
                tracker.ack(c.txn)
                observer.published(c.record, c.commit_time, now - c.sent_at)
                advanced = True
        finally:
            # also when a failure interrupts the drain: what was acknowledged before it counts
            if advanced:
                self._acknowledged()

    def _acknowledged(self) -> None:
        self._waiting_since = time.monotonic()
        if self._state == "stalled":
            self._set_state("streaming", "Kafka acknowledges again")
        if self.tracker.delivered > self.delivered:
            self.delivered = self.tracker.delivered

    def _delivery_failed(self, c: _Completion) -> None:
        exc = c.exc
        assert exc is not None
        if isinstance(exc, PermanentDeliveryError):
            self.observer.error("rejected")
            if self.options.dead_letter_topic and c.record.topic != self.options.dead_letter_topic:
                self._log_repeating(
                    f"refused:{c.record.event_id}",
                    "%s; sending it to dead-letter topic %s",
                    exc,
                    self.options.dead_letter_topic,
                )
                if c.record.event_id:
                    self._refused[c.record.event_id] = exc
                    if len(self._refused) > _REFUSED_MEMORY:
                        self._refused.popitem(last=False)
                self._send_dead_letter(c, str(exc), too_large=exc.too_large)
                return
            self._unackable += 1
            raise PermanentDeliveryError(
                f"{exc}. Nothing after this event was confirmed. Fix the cause, or set a "
                "dead-letter topic (--dead-letter-topic) to route such events there",
                event_id=None,
            )
        if isinstance(exc, SinkError):
            raise exc
        raise SinkError(f"Kafka delivery failed: {exc}")

    def _send_dead_letter(self, c: _Completion, reason: str, too_large: bool = False) -> None:
        topic = self.options.dead_letter_topic
        assert topic is not None and self.sink is not None
        rec = c.record
        extra = [
            ("outbox_cdc_error", reason.encode()),
            ("outbox_cdc_original_topic", rec.topic.encode()),
        ]
        value = rec.value
        if too_large:
            # too large for Kafka: too large for the dead-letter topic too; the row keeps it
            value = b""
            extra.append(("outbox_cdc_original_size", str(len(rec.value)).encode()))
        dlq = KafkaRecord(
            topic=topic,
            key=rec.key,
            value=value,
            headers=[*rec.headers, *extra],
            event_id=rec.event_id,
        )
        self._send(_Completion(c.generation, c.txn, dlq, c.nbytes, c.commit_time, c.sent_at))

    def _send(self, c: _Completion) -> None:
        """Hand one record to the sink; its completion comes back through the queue."""
        done_put, wake = self._done.put, self._wake

        def on_done(exc: BaseException | None) -> None:
            c.exc = exc
            done_put(c)
            wake()

        assert self.sink is not None
        try:
            self.sink.send(c.record, on_done)
        except PermanentDeliveryError as exc:  # refused before it was even queued
            on_done(exc)

    def _poison(self, err: EventDecodeError, txn: Transaction, generation: int) -> None:
        """A committed row that cannot become a record: dead-letter it or stop."""
        if not self.options.dead_letter_topic:
            self._unackable += 1  # never acknowledged: nothing after it is confirmed
        rec = self._dead_letter_record(err)
        c = _Completion(generation, txn, rec, 64, time.time(), time.monotonic())
        self._in_flight_bytes += c.nbytes
        self._send(c)

    # -- failure and shutdown -------------------------------------------------------------------

    def _salvage(self) -> None:
        """The database went away but Kafka works: let the events in flight finish, so that
        the reconnect resumes after them instead of sending them again."""
        if self.sink is None or self.tracker.in_flight <= self._unackable:
            return
        try:
            self.sink.flush(min(10.0, self.options.shutdown_timeout))
            self._drain_completions()
        except OutboxError as exc:
            log.warning("could not finish the events in flight: %s", exc)
            self.sink.close(0)
            self.sink = None

    def _abandon(self, keep_sink: bool = False) -> None:
        """Drop the pipeline after a retriable failure. Events in flight are resent by the
        source after reconnecting (from the last delivered position): duplicates, not losses."""
        # report what was delivered before the failure, if the server still listens
        with contextlib.suppress(OutboxError):
            self.source.confirm(self.tracker.confirmed, self.tracker.delivered)
        self._generation += 1
        if self.sink is not None and not keep_sink:
            self.sink.close(0)
            self.sink = None
        self._close_source()

    def _close_source(self) -> None:
        try:
            self.source.close()
        except OutboxError as exc:
            log.debug("closing the source failed: %s", exc)

    def _shutdown(self) -> None:
        """Deliver what is in flight (bounded), confirm it, close everything."""
        deadline = self._stop_deadline or time.monotonic() + self.options.shutdown_timeout
        try:
            if self.sink is not None and self.tracker.in_flight > self._unackable:
                log.info(
                    "stopping: waiting up to %.0fs for %d events in flight",
                    self.options.shutdown_timeout,
                    self.tracker.in_flight,
                )
                while self.tracker.in_flight > self._unackable and time.monotonic() < deadline:
                    self.sink.flush(max(0.1, min(1.0, deadline - time.monotonic())))
                    self._drain_completions()
                    self.source.confirm(self.tracker.confirmed, self.tracker.delivered)
                if self.tracker.in_flight > self._unackable:
                    log.warning(
                        "stopping with %d events unacknowledged: they will be "
                        "delivered again after restart",
                        self.tracker.in_flight,
                    )
        except OutboxError as exc:
            log.warning("stopping: could not deliver the events in flight: %s", exc)
            deadline = 0.0  # the broker failed: do not wait for it any longer
        finally:
            if self.sink is not None:
                self.sink.close(max(0.0, deadline - time.monotonic()))
                self.sink = None
            self._close_source()
            self._wake_r.close()
            self._wake_w.close()
            self.observer.state("stopped")
            log.info("stopped; confirmed up to %s", self.source.describe(self.tracker.confirmed))
