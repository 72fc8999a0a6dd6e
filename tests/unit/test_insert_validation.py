"""Validation and payload encoding of the insert API (no server needed).

Every bad input raises EventValidationError naming the field, before any statement runs: the
tests write through an in-memory sqlite3 connection whose trace callback records every
statement. That the caller's transaction stays usable on a real PostgreSQL is proven in
tests/integration/test_insert_api*.py (test_validation_error_keeps_the_transaction_usable).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

import outbox_cdc
from outbox_cdc import (
    ConfigurationError,
    EventValidationError,
    Outbox,
    OutboxEvent,
    UnsupportedConnectionError,
)
from outbox_cdc import outbox as outbox_module
from outbox_cdc.events import (
    CONTENT_TYPE_BYTES,
    CONTENT_TYPE_JSON,
    CONTENT_TYPE_TEXT,
    DEFAULT_MAX_PAYLOAD_BYTES,
    create_event,
)
from outbox_cdc.schema import ddl, statements

MiB = 1024 * 1024


class Traced:
    """An in-memory SQLite outbox that records every statement run on it."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        for stmt in statements(ddl("sqlite", "outbox")):
            self.conn.execute(stmt)
        self.conn.commit()
        self.statements: list[str] = []
        self.conn.set_trace_callback(self.statements.append)

    def rows(self) -> list[tuple[Any, ...]]:
        self.conn.set_trace_callback(None)  # the test's own reads are not recorded
        try:
            return self.conn.execute(
                "SELECT id, topic, key, type, content_type, payload, headers FROM outbox "
                "ORDER BY seq"
            ).fetchall()
        finally:
            self.conn.set_trace_callback(self.statements.append)


@pytest.fixture
def db() -> Iterator[Traced]:
    t = Traced()
    yield t
    t.conn.close()


GOOD: dict[str, Any] = {"topic": "orders", "type": "order.created", "payload": b"{}"}


def refused(db: Traced, field: str, outbox: Outbox | None = None, **changes: Any) -> None:
    """publish(**GOOD, **changes) raises EventValidationError(field) and runs no statement;
    so does publish_many with the bad event after a good one (field events[1].<field>)."""
    outbox = outbox or Outbox()
    with pytest.raises(EventValidationError) as exc:
        outbox.publish(db.conn, **{**GOOD, **changes})
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")
    with pytest.raises(EventValidationError) as exc:
        outbox.publish_many(db.conn, [GOOD, {**GOOD, **changes}])
    assert exc.value.field == f"events[1].{field}"
    assert db.statements == []
    assert db.rows() == []


# -- topic ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["", "a b", "x" * 250, ".", "..", "tópico", "a/b", "a\x00", "tab\t", None, 5, b"t"]
)
def test_illegal_topics(db: Traced, topic: object) -> None:
    refused(db, "topic", topic=topic)


@pytest.mark.parametrize("topic", ["x" * 249, "a", "...", "Orders.v1_eu-West-9", "_"])
def test_legal_topics(db: Traced, topic: str) -> None:
    Outbox().publish(db.conn, **{**GOOD, "topic": topic})
    assert db.rows()[0][1] == topic


# -- type, key, content type ---------------------------------------------------------------------


@pytest.mark.parametrize("type_", ["", "   ", None, 5, "order\x00created", "lone \ud800"])
def test_bad_types(db: Traced, type_: object) -> None:
    refused(db, "type", type=type_)


@pytest.mark.parametrize("key", [5, b"bytes", uuid.uuid4(), "nul\x00", "\udc80"])
def test_bad_keys(db: Traced, key: object) -> None:
    refused(db, "key", key=key)


@pytest.mark.parametrize("content_type", ["", 5, b"text/plain", "text/\x00"])
def test_bad_content_types(db: Traced, content_type: object) -> None:
    refused(db, "content_type", content_type=content_type)


# -- headers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("a", "b")],  # not a mapping
        "a=b",
        {"a": 1},
        {"a": None},
        {"a": {"nested": "x"}},
        {"a": ["x"]},
        {1: "x"},
        {"": "x"},
        {"a\x00": "x"},
        {"a": "lone \ud800"},
        *(
            {name: "x"}
            for name in (
                "ce_specversion",
                "ce_id",
                "ce_type",
                "ce_source",
                "ce_time",
                "content-type",
                "Content-Type",
                "CE_ID",
            )
        ),
    ],
)
def test_bad_headers(db: Traced, headers: object) -> None:
    refused(db, "headers", headers=headers)


def test_header_values_str_and_bytes_keep_their_order(db: Traced) -> None:
    event = Outbox().event(**GOOD, headers={"z": "1", "a": b"\xff", "m": bytearray(b"x"), "n": "é"})
    assert event.headers == (("z", b"1"), ("a", b"\xff"), ("m", b"x"), ("n", "é".encode()))


# -- payload -------------------------------------------------------------------------------------


def test_payload_limit_default_is_one_mebibyte(db: Traced) -> None:
    assert MiB == DEFAULT_MAX_PAYLOAD_BYTES
    refused(db, "payload", payload=b"x" * (MiB + 1))
    Outbox().publish(db.conn, **{**GOOD, "payload": b"x" * MiB})
    assert len(db.rows()[0][5]) == MiB


def test_custom_payload_limit(db: Traced) -> None:
    small = Outbox(max_payload_bytes=100)
    refused(db, "payload", outbox=small, payload=b"x" * 101)
    refused(db, "payload", outbox=small, payload="é" * 51)  # 102 bytes in UTF-8
    refused(db, "payload", outbox=small, payload={"k": "v" * 100})  # limit applies to the JSON
    small.publish(db.conn, **{**GOOD, "payload": b"x" * 100})
    assert len(db.rows()) == 1


class Opaque:
    pass


@pytest.mark.parametrize(
    "payload",
    [
        {1, 2},
        frozenset(),
        {"a": Opaque()},
        [Opaque()],
        {"a": {1, 2}},
        {(1, 2): "tuple key"},
        {"nan": float("nan")},
        {"inf": float("inf")},
        "lone \ud800",
        {"k": "lone \ud800"},
        None,
        5,
        1.5,
        True,
        Opaque(),
        uuid.uuid4(),
        datetime.now(UTC),
    ],
)
def test_payload_not_serializable(db: Traced, payload: object) -> None:
    refused(db, "payload", payload=payload)


def test_circular_payload(db: Traced) -> None:
    loop: list[Any] = []
    loop.append(loop)
    refused(db, "payload", payload=loop)


class Order(pydantic.BaseModel):
    id: int
    customer: str
    total: float


class Broken(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
    thing: Opaque


def test_pydantic_model_that_cannot_serialize(db: Traced) -> None:
    refused(db, "payload", payload=Broken(thing=Opaque()))


@pytest.mark.parametrize(
    ("payload", "data", "content_type"),
    [
        (b"\x00\xff raw", b"\x00\xff raw", CONTENT_TYPE_BYTES),
        (bytearray(b"ba"), b"ba", CONTENT_TYPE_BYTES),
        (memoryview(b"mv"), b"mv", CONTENT_TYPE_BYTES),
        (b"", b"", CONTENT_TYPE_BYTES),
        (
            {"b": 1, "a": [1, 2.5, None, True], "s": "Zoë €"},
            '{"b":1,"a":[1,2.5,null,true],"s":"Zoë €"}'.encode(),
            CONTENT_TYPE_JSON,
        ),
        ([1, "two"], b'[1,"two"]', CONTENT_TYPE_JSON),
        ({}, b"{}", CONTENT_TYPE_JSON),
        (
            Order(id=7, customer="Zoë", total=9.5),
            '{"id":7,"customer":"Zoë","total":9.5}'.encode(),
            CONTENT_TYPE_JSON,
        ),
        ("héllo 🐢", "héllo 🐢".encode(), CONTENT_TYPE_TEXT),
        ("", b"", CONTENT_TYPE_TEXT),
    ],
)
def test_payload_encodings(db: Traced, payload: object, data: bytes, content_type: str) -> None:
    event_id = Outbox().publish(db.conn, **{**GOOD, "payload": payload})
    (row,) = db.rows()
    assert row[0] == str(event_id)
    assert (row[5], row[4]) == (data, content_type)


def test_text_content_type_names_the_charset() -> None:
    assert Outbox().event(**{**GOOD, "payload": "x"}).content_type == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    "payload", [b"\x08\x96\x01", {"a": 1}, "text", Order(id=1, customer="c", total=0)]
)
def test_content_type_override(payload: object) -> None:
    event = Outbox().event(**{**GOOD, "payload": payload}, content_type="application/x-custom")
    assert event.content_type == "application/x-custom"


# -- id ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["", "not-a-uuid", "1234", 12345, "g" * 32, [1]])
def test_invalid_ids(db: Traced, bad_id: object) -> None:
    refused(db, "id", id=bad_id)


def test_ids_given_or_generated() -> None:
    given = uuid.uuid4()
    outbox = Outbox()
    assert outbox.event(**GOOD, id=given).id == given
    assert outbox.event(**GOOD, id=str(given).upper()).id == given
    assert outbox.event(**GOOD, id=f"urn:uuid:{given}").id == given
    generated = {outbox.event(**GOOD).id for _ in range(100)}
    assert len(generated) == 100
    assert {g.version for g in generated} == {4}


def test_created_at_is_now_in_utc() -> None:
    before = datetime.now(UTC)
    event = Outbox().event(**GOOD)
    assert before <= event.created_at <= datetime.now(UTC)
    assert event.created_at.utcoffset() is not None
    assert event.created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


# -- publish_many specifics ----------------------------------------------------------------------


def test_publish_many_item_errors(db: Traced) -> None:
    outbox = Outbox()
    with pytest.raises(EventValidationError) as exc:
        outbox.publish_many(db.conn, [GOOD, "not an event"])  # type: ignore[list-item]
    assert exc.value.field == "events[1]"
    with pytest.raises(EventValidationError) as exc:
        outbox.publish_many(db.conn, [GOOD, {**GOOD, "colour": "red"}])
    assert exc.value.field == "events[1]"
    assert "colour" in str(exc.value)
    with pytest.raises(EventValidationError) as exc:
        outbox.publish_many(db.conn, [{"topic": "t", "type": "no.payload"}])
    assert exc.value.field == "events[0]"
    assert db.statements == []


def valid_event(**changes: Any) -> OutboxEvent:
    fields: dict[str, Any] = {
        "id": uuid.uuid4(),
        "created_at": datetime.now(UTC),
        "topic": "t",
        "type": "x",
        "payload": b"1",
        "content_type": "application/octet-stream",
    }
    fields.update(changes)
    return OutboxEvent(**fields)


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("topic", {"topic": "bad topic"}),
        ("type", {"type": ""}),
        ("key", {"key": 5}),
        ("content_type", {"content_type": ""}),
        ("payload", {"payload": "not bytes"}),
        ("payload", {"payload": b"x" * (MiB + 1)}),
        ("headers", {"headers": (("ce_id", b"x"),)}),
        ("headers", {"headers": (("a", "str, not bytes"),)}),
        ("headers", {"headers": {"a": b"x"}}),
        ("id", {"id": "not a UUID object"}),
        ("created_at", {"created_at": "2026-01-01"}),
    ],
)
def test_publish_many_checks_prebuilt_events_too(
    db: Traced, field: str, changes: dict[str, Any]
) -> None:
    with pytest.raises(EventValidationError) as exc:
        Outbox().publish_many(db.conn, [valid_event(), valid_event(**changes)])
    assert exc.value.field == f"events[1].{field}"
    assert db.statements == []


def test_publish_many_accepts_prebuilt_and_mapping_events_in_order(db: Traced) -> None:
    outbox = Outbox()
    built = outbox.event(topic="a", type="built", payload=b"1")
    raw = valid_event(type="raw", key="k", headers=(("h", b"v"),))
    ids = outbox.publish_many(db.conn, [built, {**GOOD, "type": "mapping"}, raw])
    assert ids[0] == built.id
    assert ids[2] == raw.id
    assert [r[3] for r in db.rows()] == ["built", "mapping", "raw"]
    assert sum(s.startswith("INSERT") for s in db.statements) == 1


def test_batches_are_split_only_when_too_large() -> None:
    def sizes(payload_sizes: list[int], max_rows: int = 1000) -> list[int]:
        events = [valid_event(payload=b"x" * n) for n in payload_sizes]
        chunks = list(outbox_module._chunks(events, max_rows))
        assert [e for c in chunks for e in c] == events  # all of them, in order
        return [len(c) for c in chunks]

    limit = outbox_module.MAX_BATCH_PAYLOAD_BYTES
    assert sizes([1] * 1000) == [1000]
    assert sizes([1] * 2500) == [1000, 1000, 500]
    assert sizes([1] * 10, max_rows=4) == [4, 4, 2]
    assert sizes([limit]) == [1]
    assert sizes([limit * 2]) == [1]  # one event larger than the budget still goes alone
    assert sizes([limit // 2, limit // 2]) == [2]
    assert sizes([limit // 2, limit // 2, 1]) == [2, 1]
    assert sizes([1, limit, 1]) == [1, 1, 1]


def test_large_batch_in_sqlite_is_written_in_order(db: Traced) -> None:
    ids = Outbox().publish_many(db.conn, ({**GOOD, "key": str(i)} for i in range(5000)))
    rows = db.rows()
    assert [r[0] for r in rows] == [str(i) for i in ids]
    assert [r[2] for r in rows] == [str(i) for i in range(5000)]


# -- connections ---------------------------------------------------------------------------------


def test_unsupported_connection_kinds(db: Traced) -> None:
    from sqlalchemy import create_engine

    engine = create_engine("sqlite://")
    for conn, match in [
        (engine, "not an Engine"),
        (object(), "unsupported connection type builtins.object"),
        ("postgresql://localhost/db", "unsupported connection type builtins.str"),
        (None, "unsupported connection type"),
        (sqlite3, "unsupported connection type"),
    ]:
        with pytest.raises(UnsupportedConnectionError, match=match) as exc:
            Outbox().publish(conn, **GOOD)
        assert isinstance(exc.value, TypeError)
        with pytest.raises(UnsupportedConnectionError):
            Outbox().publish_many(conn, [GOOD])
    engine.dispose()


async def test_unsupported_connection_kinds_async() -> None:
    with pytest.raises(UnsupportedConnectionError):
        await Outbox().publish_async(object(), **GOOD)
    with pytest.raises(UnsupportedConnectionError, match="sync connection"):
        await Outbox().publish_async(sqlite3.connect(":memory:"), **GOOD)


def test_validation_comes_before_the_connection_check() -> None:
    with pytest.raises(EventValidationError):
        Outbox().publish(object(), **{**GOOD, "topic": ""})


def test_subclassed_and_scoped_connections(tmp_path: Any) -> None:
    """Apps and frameworks subclass connections and sessions (Flask-SQLAlchemy's db.session is
    a scoped_session of its own Session subclass)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session, scoped_session, sessionmaker

    class AppConnection(sqlite3.Connection):
        pass

    class AppSession(Session):
        pass

    path = tmp_path / "app.sqlite3"
    conn = sqlite3.connect(path, factory=AppConnection)
    for stmt in statements(ddl("sqlite", "outbox")):
        conn.execute(stmt)
    outbox_cdc.publish(conn, **{**GOOD, "type": "subclassed.sqlite3"})
    conn.commit()
    conn.close()

    engine = create_engine(f"sqlite:///{path}")
    with AppSession(engine) as session:
        outbox_cdc.publish(session, **{**GOOD, "type": "subclassed.session"})
        session.commit()
    scoped = scoped_session(sessionmaker(engine, class_=AppSession))
    outbox_cdc.publish_many(scoped, [{**GOOD, "type": "scoped.session"}])
    scoped.commit()
    scoped.remove()
    with engine.connect() as c:
        types = c.execute(text("SELECT type FROM outbox ORDER BY seq")).scalars().all()
    engine.dispose()
    assert types == ["subclassed.sqlite3", "subclassed.session", "scoped.session"]


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"table": "bad name"}, "table"),
        ({"table": "x; DROP TABLE y"}, "table"),
        ({"table": ""}, "table"),
        ({"mode": "queue"}, "mode"),
        ({"message_prefix": ""}, "message_prefix"),
        ({"max_payload_bytes": -1}, "max_payload_bytes"),
        ({"max_payload_bytes": "1MB"}, "max_payload_bytes"),
    ],
)
def test_bad_outbox_settings(kwargs: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigurationError, match=f"^{setting}: "):
        Outbox(**kwargs)


def test_create_event_is_the_same_validation() -> None:
    with pytest.raises(EventValidationError) as exc:
        create_event(topic="t", type="x", payload=b"12", max_payload_bytes=1)
    assert exc.value.field == "payload"
    event = create_event(
        topic="t", type="x", payload=b"1", now=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    )
    assert event.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_ddl_statements_keep_dollar_quoted_function_bodies_whole() -> None:
    from outbox_cdc.schema import ddl, statements

    stmts = statements(ddl("postgresql", "public.outbox", polling=True, notify=True))
    (function,) = [s for s in stmts if "CREATE OR REPLACE FUNCTION" in s]
    assert function.rstrip().endswith("$$")
    assert "RETURN NULL;" in function
    assert any(s.startswith("CREATE OR REPLACE TRIGGER outbox_notify") for s in stmts)
    assert any(s.startswith("CREATE INDEX IF NOT EXISTS outbox_pending") for s in stmts)


def test_store_metrics_go_to_the_registry_the_application_passes() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    conn = sqlite3.connect(":memory:")
    for stmt in statements(ddl("sqlite", "outbox")):
        conn.execute(stmt)
    outbox = Outbox("outbox", registry=registry, capture_trace_context=False)
    second = Outbox("outbox", registry=registry)  # shares the same metrics, no clash
    outbox.publish(conn, topic="t", type="x", payload=b"1")
    second.publish_many(conn, [{"topic": "t", "type": "x", "payload": b"2"}])
    with pytest.raises(EventValidationError):
        outbox.publish(conn, topic="", type="x", payload=b"1")
    with pytest.raises(UnsupportedConnectionError):
        outbox.publish(object(), topic="t", type="x", payload=b"1")
    conn.execute("DROP TABLE outbox")
    with pytest.raises(sqlite3.OperationalError):
        outbox.publish(conn, topic="t", type="x", payload=b"1")
    value = registry.get_sample_value
    assert value("outbox_cdc_store_seconds_count") == 2
    assert value("outbox_cdc_store_errors_total", {"reason": "invalid_event"}) == 1
    assert value("outbox_cdc_store_errors_total", {"reason": "unsupported_connection"}) == 1
    assert value("outbox_cdc_store_errors_total", {"reason": "database"}) == 1
