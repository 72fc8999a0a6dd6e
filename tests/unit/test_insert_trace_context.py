"""W3C trace context: with OpenTelemetry installed, the active span's ``traceparent`` (and
``tracestate``) go into the event's headers, so consumers continue the producer's trace. The
stored row is checked on SQLite here and on PostgreSQL in test_insert_api.py."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

import outbox_cdc
from outbox_cdc import Outbox
from outbox_cdc.schema import ddl, statements

tracer = TracerProvider().get_tracer("outbox-cdc-tests")
GOOD = {"topic": "t", "type": "x", "payload": b"1"}


def traceparent(ctx: SpanContext) -> bytes:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}".encode()


@pytest.fixture
def remote_parent() -> Iterator[SpanContext]:
    """An incoming trace with a tracestate, made the current context."""
    ctx = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")]),
    )
    token = context.attach(trace.set_span_in_context(NonRecordingSpan(ctx)))
    try:
        yield ctx
    finally:
        context.detach(token)


def test_active_span_adds_traceparent_before_user_headers() -> None:
    with tracer.start_as_current_span("place-order") as span:
        event = Outbox().event(**GOOD, headers={"tenant": "acme"})
    ctx = span.get_span_context()
    assert event.headers == (("traceparent", traceparent(ctx)), ("tenant", b"acme"))


def test_tracestate_is_carried_when_set(remote_parent: SpanContext) -> None:
    event = Outbox().event(**GOOD)
    assert dict(event.headers) == {
        "traceparent": b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    }
    with tracer.start_as_current_span("child") as child:
        headers = dict(Outbox().event(**GOOD).headers)
    assert headers["traceparent"] == traceparent(child.get_span_context())
    assert headers["traceparent"].startswith(b"00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert headers["tracestate"] == b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"


def test_no_span_no_traceparent() -> None:
    assert not trace.get_current_span().get_span_context().is_valid
    assert Outbox().event(**GOOD).headers == ()
    assert Outbox().event(**GOOD, headers={"a": "b"}).headers == (("a", b"b"),)


def test_user_header_wins(remote_parent: SpanContext) -> None:
    event = Outbox().event(
        **GOOD, headers={"traceparent": "00-mine", "tracestate": b"me=1", "x": "y"}
    )
    assert dict(event.headers) == {"traceparent": b"00-mine", "tracestate": b"me=1", "x": b"y"}


def test_capture_can_be_turned_off(remote_parent: SpanContext) -> None:
    assert Outbox(capture_trace_context=False).event(**GOOD).headers == ()


def test_bad_headers_are_still_refused_under_a_span(remote_parent: SpanContext) -> None:
    with pytest.raises(outbox_cdc.EventValidationError) as exc:
        Outbox().event(**GOOD, headers=[("a", "b")])  # type: ignore[arg-type]
    assert exc.value.field == "headers"
    with pytest.raises(outbox_cdc.EventValidationError) as exc:
        Outbox().event(**GOOD, headers={"ce_id": "x"})
    assert exc.value.field == "headers"


def test_stored_row_carries_the_trace(remote_parent: SpanContext) -> None:
    conn = sqlite3.connect(":memory:")
    for stmt in statements(ddl("sqlite", "outbox")):
        conn.execute(stmt)
    outbox_cdc.publish(conn, **GOOD)
    outbox_cdc.publish_many(conn, [GOOD])
    rows = conn.execute("SELECT headers FROM outbox ORDER BY seq").fetchall()
    expected = (
        '{"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",'
        '"tracestate":"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"}'
    )
    assert rows == [(expected,), (expected,)]
