"""The acceptance checker itself (no services): it must see every kind of violation it reports,
or the scenarios prove nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.acceptance.harness import CONTENT_TYPE, EVENT_TYPE, LoadResult, Written, check


@dataclass(frozen=True)
class Rec:
    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def written(key: str, seq: int) -> Written:
    return Written(
        f"00000000-0000-4000-8000-{seq:06d}{ord(key[-1]):06d}",
        key,
        seq,
        f"{key}:{seq}".encode(),
        (("seq", str(seq).encode()),),
        time.time(),
    )


def record(w: Written, partition: int = 0, source: str = "outbox-cdc") -> Rec:
    now = datetime.fromtimestamp(w.written_at, UTC).isoformat()
    return Rec(
        partition,
        w.key.encode(),
        w.payload,
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", w.id.encode()),
            ("ce_type", EVENT_TYPE.encode()),
            ("ce_source", source.encode()),
            ("ce_time", now.replace("+00:00", "Z").encode()),
            ("content-type", CONTENT_TYPE.encode()),
            *w.headers,
        ],
    )


@pytest.fixture
def load() -> LoadResult:
    res = LoadResult()
    for key in ("k-a", "k-b"):
        for seq in range(3):
            w = written(key, seq)
            res.committed[w.id] = w
            res.order[key].append(w.id)
    res.rolled_back.add("00000000-0000-4000-8000-999999999999")
    return res


def good(load: LoadResult) -> list[Any]:
    return [
        record(load.committed[i], partition=p)
        for p, key in enumerate(("k-a", "k-b"))
        for i in load.order[key]
    ]


def test_a_complete_topic_passes(load: LoadResult) -> None:
    res = check(good(load), load)
    res.assert_complete(exactly_once=True)
    assert (res.records, res.unique, res.partitions_used) == (6, 6, 2)


def test_missing_event(load: LoadResult) -> None:
    res = check(good(load)[1:], load)
    assert res.missing == [load.order["k-a"][0]]
    with pytest.raises(AssertionError, match="1 committed events missing"):
        res.assert_complete()


def test_rolled_back_event_seen(load: LoadResult) -> None:
    ghost = replace(load.committed[load.order["k-a"][0]], id="00000000-0000-4000-8000-999999999999")
    res = check([*good(load), record(ghost)], load)
    assert res.rolled_back_seen == [ghost.id]
    with pytest.raises(AssertionError, match="rolled-back events published"):
        res.assert_complete()


def test_order_violation_and_duplicates(load: LoadResult) -> None:
    recs = good(load)
    swapped = [recs[1], recs[0], recs[2], *recs[3:], recs[3]]  # k-a seq 1 before 0; k-b dup
    res = check(swapped, load)
    assert len(res.order_violations) == 1
    assert res.duplicates == 1
    assert res.duplicate_ids == [load.order["k-b"][0]]
    res_dup_only = check([*good(load), good(load)[0]], load)
    res_dup_only.assert_complete()  # duplicates are allowed ...
    with pytest.raises(AssertionError, match="duplicates in a run"):
        res_dup_only.assert_complete(exactly_once=True)  # ... unless exactly once is asked


def test_a_later_duplicate_does_not_hide_an_order_violation(load: LoadResult) -> None:
    recs = good(load)
    # first arrivals: seq 0, 2, 1 (then a redelivered 2): seq 1 arrived after 2
    res = check([recs[0], recs[2], recs[1], recs[2], *recs[3:]], load)
    assert len(res.order_violations) == 1


@pytest.mark.parametrize(
    "what",
    ["key", "value", "ce_id", "ce_type", "user header", "source", "header order", "partition"],
)
def test_content_mismatch(load: LoadResult, what: str) -> None:
    recs = good(load)
    r = recs[0]
    headers = list(r.headers)
    if what == "key":
        recs[0] = replace(r, key=b"other")
    elif what == "value":
        recs[0] = replace(r, value=b"other")
    elif what in ("ce_type", "source", "user header"):
        index = {"ce_type": 2, "source": 3, "user header": 6}[what]
        headers[index] = (headers[index][0], b"other")
        recs[0] = replace(r, headers=headers)
    elif what == "ce_id":  # the id of another event of the same key: content differs
        headers[1] = ("ce_id", recs[1].headers[1][1])
        recs[0] = replace(r, headers=headers)
    elif what == "header order":
        headers[2], headers[3] = headers[3], headers[2]
        recs[0] = replace(r, headers=headers)
    else:
        recs[0] = replace(r, partition=1)
    res = check(recs, load)
    with pytest.raises(AssertionError):
        res.assert_complete()
