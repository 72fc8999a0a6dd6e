"""Cost of the insert API against a hand-written INSERT, on a real PostgreSQL with psycopg.

    scripts/services.sh up && . ./.services.env && .venv/bin/python benchmarks/insert_api.py

One event per transaction (publish, then commit), as an application that emits one event per
business transaction does, against a plain ``INSERT`` of the same row into the same table
(``conn.execute`` with the same values, then commit) in the same run, on the same connection.
The two are interleaved: after a warm-up, each round runs N transactions of each side in
alternating blocks of ``--block`` transactions, the side that goes first alternating from round
to round, so drift of the machine or the server (checkpoints, autovacuum, other load) hits both
alike.

Both sides do the work an application needs for a row: a new UUID, the current time, the payload
bytes (``--payload dict``: ``json.dumps`` of a dict on both sides) and the headers JSON. The
difference is what the insert API adds: validation, trace context capture (OpenTelemetry is
installed in the dev environment; no span is active), connection-kind dispatch and the cached
statement.

Prints events/s of both and their ratio (insert API / plain INSERT; the goal is >= 0.9), and
writes the figures, the machine and the versions to benchmarks/results/insert_api.json.
``--synchronous-commit off`` removes the WAL flush from each commit, leaving mostly client CPU
and the round trips: the harshest setting for the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg

from outbox_cdc import Outbox, schema

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "insert_api.json"

TOPIC = "orders.v1"
TYPE = "order.created"
CONTENT_TYPE = "application/json"
PAYLOAD_DICT = {
    "order_id": 123456,
    "customer": "c-9f2d41",
    "currency": "EUR",
    "total": 149.9,
    "lines": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
}
PAYLOAD_BYTES = json.dumps(PAYLOAD_DICT, separators=(",", ":")).encode()

PLAIN_SQL = (
    'INSERT INTO {table} (id, created_at, topic, "key", type, content_type, payload, headers) '
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dsn",
        default=os.environ.get("OUTBOX_CDC_TEST_POSTGRES_URL"),
        help="PostgreSQL URL (default: $OUTBOX_CDC_TEST_POSTGRES_URL)",
    )
    p.add_argument("-n", "--events", type=int, default=5000, help="transactions per round and side")
    p.add_argument("--rounds", type=int, default=3, help="rounds (each runs both sides)")
    p.add_argument("--warmup", type=int, default=300, help="untimed transactions per side first")
    p.add_argument(
        "--block", type=int, default=100, help="transactions per side before switching sides"
    )
    p.add_argument(
        "--payload",
        choices=("bytes", "dict"),
        default="bytes",
        help="pass the payload as ready bytes (default) or as a dict to JSON-encode",
    )
    p.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        default=None,
        help="set synchronous_commit for the session (default: the server's setting)",
    )
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON file")
    p.add_argument("--no-output", action="store_true", help="do not write the results file")
    args = p.parse_args(argv)
    if not args.dsn:
        p.error("no PostgreSQL URL: pass --dsn or set OUTBOX_CDC_TEST_POSTGRES_URL")
    if args.events < 1 or args.rounds < 1 or args.block < 1 or args.warmup < 0:
        p.error("--events, --rounds and --block must be >= 1, --warmup >= 0")
    return args


def plain_side(conn: psycopg.Connection[Any], table: str, payload: str) -> Callable[[int], None]:
    sql = PLAIN_SQL.format(table=table)

    def run(n: int) -> None:
        for i in range(n):
            data = json.dumps(PAYLOAD_DICT).encode() if payload == "dict" else PAYLOAD_BYTES
            conn.execute(
                sql,
                (
                    uuid.uuid4(),
                    datetime.now(UTC),
                    TOPIC,
                    f"order-{i}",
                    TYPE,
                    CONTENT_TYPE,
                    data,
                    "{}",
                ),
            )
            conn.commit()

    return run


def outbox_side(conn: psycopg.Connection[Any], table: str, payload: str) -> Callable[[int], None]:
    outbox = Outbox(table)
    publish = outbox.publish
    value: object = PAYLOAD_DICT if payload == "dict" else PAYLOAD_BYTES

    def run(n: int) -> None:
        for i in range(n):
            publish(
                conn,
                topic=TOPIC,
                type=TYPE,
                payload=value,
                key=f"order-{i}",
                content_type=CONTENT_TYPE,
            )
            conn.commit()

    return run


def interleaved(
    sides: dict[str, Callable[[int], None]], order: list[str], n: int, block: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Run n transactions of each side in alternating blocks; wall-clock seconds and this
    process's CPU seconds spent per side."""
    wall = dict.fromkeys(order, 0.0)
    cpu = dict.fromkeys(order, 0.0)
    done = 0
    while done < n:
        size = min(block, n - done)
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            sides[name](size)
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - start_cpu
        done += size
    return wall, cpu


def versions(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    def dist(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    row = conn.execute(
        "SELECT version(), current_setting('synchronous_commit'), current_setting('fsync'), "
        "current_setting('wal_level')"
    ).fetchone()
    assert row is not None
    return {
        "python": platform.python_version(),
        "outbox-cdc": dist("outbox-cdc"),
        "psycopg": psycopg.__version__,
        "psycopg-binary": dist("psycopg-binary"),
        "libpq": psycopg.pq.version(),
        "opentelemetry-api": dist("opentelemetry-api"),
        "postgresql": row[0],
        "server settings": {"synchronous_commit": row[1], "fsync": row[2], "wal_level": row[3]},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table = f"bench_insert_{secrets.token_hex(5)}"
    options = f"-c synchronous_commit={args.synchronous_commit}" if args.synchronous_commit else ""
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        for stmt in schema.statements(schema.ddl("postgresql", table)):
            admin.execute(stmt)
    try:
        with psycopg.connect(args.dsn, options=options) as conn:
            sides = {
                "plain_insert": plain_side(conn, table, args.payload),
                "insert_api": outbox_side(conn, table, args.payload),
            }
            env = versions(conn)
            print(
                f"PostgreSQL at {conn.info.host}:{conn.info.port}, table {table}, "
                f"{args.rounds} rounds x {args.events} transactions per side, payload "
                f"{args.payload} ({len(PAYLOAD_BYTES)} bytes), synchronous_commit="
                f"{env['server settings']['synchronous_commit']}"
            )
            rounds: list[dict[str, Any]] = []
            for name in sides:  # warm-up: connection, prepared statements, caches
                sides[name](args.warmup)
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                seconds, cpu = interleaved(sides, order, args.events, args.block)
                rate = {name: args.events / s for name, s in seconds.items()}
                cpu_us = {name: c / args.events * 1e6 for name, c in cpu.items()}
                rounds.append(
                    {
                        "order": order,
                        "seconds": seconds,
                        "events_per_s": rate,
                        "client_cpu_us_per_event": cpu_us,
                        "ratio": rate["insert_api"] / rate["plain_insert"],
                    }
                )
                print(
                    f"  round {r + 1} ({order[0]} first): plain INSERT "
                    f"{rate['plain_insert']:7.0f} ev/s ({cpu_us['plain_insert']:4.0f} us CPU)   "
                    f"insert API {rate['insert_api']:7.0f} ev/s ({cpu_us['insert_api']:4.0f} us "
                    f"CPU)   ratio {rounds[-1]['ratio']:.3f}"
                )
            with conn.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {table}")
                row = cur.fetchone()
                assert row is not None
                written = row[0]
    finally:
        with psycopg.connect(args.dsn, autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {table}")
            admin.execute("DELETE FROM outbox_cdc_schema WHERE table_name = %s", (table,))

    expected = 2 * (args.rounds * args.events + args.warmup)
    if written != expected:
        print(f"error: {written} rows written, expected {expected}", file=sys.stderr)
        return 1
    total = {
        name: args.rounds * args.events / sum(r["seconds"][name] for r in rounds)
        for name in ("plain_insert", "insert_api")
    }
    ratio = total["insert_api"] / total["plain_insert"]
    cpu_total = {
        name: statistics.fmean(r["client_cpu_us_per_event"][name] for r in rounds)
        for name in ("plain_insert", "insert_api")
    }
    median_ratio = statistics.median(r["ratio"] for r in rounds)
    print(
        f"overall: plain INSERT {total['plain_insert']:.0f} ev/s, insert API "
        f"{total['insert_api']:.0f} ev/s, ratio {ratio:.3f} (median of rounds "
        f"{median_ratio:.3f}; goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})"
    )
    extra = cpu_total["insert_api"] - cpu_total["plain_insert"]
    print(
        f"client CPU per event: plain INSERT {cpu_total['plain_insert']:.1f} us, insert API "
        f"{cpu_total['insert_api']:.1f} us ({extra:+.1f} us)"
    )
    result = {
        "benchmark": "insert_api",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "description": "one event per transaction with psycopg: Outbox.publish + commit vs a "
        "plain INSERT of the same row + commit, alternating rounds",
        "parameters": {
            "events_per_round": args.events,
            "rounds": args.rounds,
            "warmup_per_side": args.warmup,
            "block": args.block,
            "payload": args.payload,
            "payload_bytes": len(PAYLOAD_BYTES),
            "synchronous_commit": env["server settings"]["synchronous_commit"],
        },
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "database": "same host, TCP 127.0.0.1" if "127.0.0.1" in args.dsn else "remote",
        },
        "versions": env,
        "rounds": rounds,
        "events_per_s": total,
        "client_cpu_us_per_event": cpu_total,
        "ratio": ratio,
        "median_round_ratio": median_ratio,
        "goal_ratio": 0.9,
        "goal_met": ratio >= 0.9,
    }
    if not args.no_output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.output)
        shown = args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output
        print(f"results written to {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
