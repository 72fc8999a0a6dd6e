"""Markdown tables of a benchmark suite result, as pasted into docs/benchmarks.md.

.venv/bin/python benchmarks/tables.py benchmarks/results/suite.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}" if abs(v) >= 10 else f"{v:.{max(nd, 2)}f}"
    return str(v)


def table(head: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += [
        "| " + " | ".join(f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows
    ]
    return "\n".join(out)


def g(d: Any, *path: Any) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def render(r: dict[str, Any]) -> str:
    parts: list[str] = []
    h, v, pg = r.get("host") or {}, r.get("versions") or {}, r.get("postgresql_settings") or {}
    parts.append(
        f"Run of {r.get('date')} ({r.get('mode')} mode, {f(r.get('duration_s'))} s, status "
        f"`{r.get('status')}`). Machine: {h.get('nproc')} vCPU {h.get('cpu_model')}, "
        f"{f(h.get('mem_total_mib'))} MiB RAM, {h.get('platform')}; load average at the start "
        f"{h.get('loadavg_start')}, at the end {h.get('loadavg_end')}. PostgreSQL "
        f"{v.get('postgresql')} (synchronous_commit {pg.get('synchronous_commit')}, fsync "
        f"{pg.get('fsync')}, shared_buffers {pg.get('shared_buffers')}), Kafka {v.get('kafka')} "
        f"(one broker), kafka-python {v.get('kafka_python')}, confluent-kafka "
        f"{v.get('confluent_kafka')} (librdkafka {v.get('librdkafka')}), psycopg "
        f"{v.get('psycopg')}, Python {v.get('python')}, {v.get('java')}; outbox-cdc at "
        f"{str(g(v, 'git', 'commit'))[:10]}."
    )
    c = r.get("ceilings") or {}
    ins = g(c, "insert", "by_clients") or {}
    parts.append(
        "### Ceilings\n\n"
        + table(
            ["ceiling", "tool", "events/s"],
            [
                [
                    "INSERT (database)",
                    f"pgbench, best of {', '.join(ins)} clients: {g(c, 'insert', 'best_clients')}"
                    + " ("
                    + ", ".join(f"{k}: {f(x['tps'])}" for k, x in ins.items())
                    + ")",
                    g(c, "insert", "events_per_s"),
                ],
                [
                    "decode (wal2json)",
                    f"pg_recvlogical → /dev/null, {f(g(c, 'decode', 'events'))} events in "
                    f"{f(g(c, 'decode', 'seconds'), 2)} s",
                    g(c, "decode", "events_per_s"),
                ],
                [
                    "produce (broker)",
                    f"ProducerPerformance, {f(g(c, 'produce', 'records'))} x 256 B, acks=all",
                    g(c, "produce", "events_per_s"),
                ],
            ],
        )
    )
    parts.append(
        "### Targets\n\n"
        + table(
            ["target", "goal", "measured", "figure", "met"],
            [
                [t["target"], t["goal"], t["measured"], t["value"], t["met"]]
                for t in r.get("targets") or []
            ],
        )
    )
    rows = []
    for client, rates in (g(r, "scenarios", "latency") or {}).items():
        for rate, x in rates.items():
            if not isinstance(x, dict) or "latency_commit_to_consume" not in x:
                continue
            lc, ls = x["latency_commit_to_consume"], x["latency_schedule_to_consume"]
            rows.append(
                [
                    client,
                    f(int(rate)),
                    x["achieved_commit_rate_per_s"],
                    f"{f(lc.get('p50_ms'))} / {f(lc.get('p99_ms'))} / {f(lc.get('p99_9_ms'))}",
                    f"{f(ls.get('p50_ms'))} / {f(ls.get('p99_ms'))} / {f(ls.get('p99_9_ms'))}",
                    g(x, "latency_commit_to_relay_send", "p99_ms"),
                    x["relay_backlog_growth_per_s"],
                    x["relay_cpu_percent_of_one_core"],
                    x["relay_cpu_ms_per_1000_events"],
                    f"{x['gaps']} / {x['duplicates']} / {x['per_key_reorders']}",
                ]
            )
    parts.append(
        "### Latency (open loop)\n\n"
        + table(
            [
                "client",
                "offered/s",
                "committed/s",
                "commit → consume p50 / p99 / p99.9 ms",
                "schedule → consume p50 / p99 / p99.9 ms",
                "commit → relay send p99 ms",
                "backlog growth /s",
                "relay CPU % core",
                "relay CPU ms / 1,000",
                "gaps / dups / reorders",
            ],
            rows,
        )
    )
    s = g(r, "scenarios", "sustained") or {}
    parts.append(
        f"### Highest sustained rate ({s.get('client')})\n\n"
        + table(
            [
                "offered/s",
                "committed/s",
                "backlog growth /s",
                "backlog at end",
                "schedule kept",
                "relay kept up",
                "commit → consume p99 ms",
                "relay CPU % core",
            ],
            [
                [
                    x["offered_rate_per_s"],
                    x["achieved_commit_rate_per_s"],
                    x["relay_backlog_growth_per_s"],
                    x["relay_backlog_at_end"],
                    x["kept_schedule"],
                    x["relay_kept_up"],
                    g(x, "latency_commit_to_consume", "p99_ms"),
                    x["relay_cpu_percent_of_one_core"],
                ]
                for x in s.get("steps") or []
            ],
        )
        + f"\n\nHighest sustained: **{f(s.get('highest_sustained_per_s'))}/s**; first failed "
        f"step: {f(s.get('first_failed_rate_per_s'))}/s, limited by: {s.get('limited_by')}."
    )
    k = g(r, "scenarios", "keep_up_pgbench") or {}
    if k:
        parts.append(
            "### Keep-up with pgbench at its best\n\n"
            f"pgbench with {k.get('pgbench_clients')} clients for {f(k.get('run_s'))} s while "
            f"the relay ({k.get('client')}) ran: {f(k.get('insert_rate_per_s'))} INSERTs/s; the "
            f"relay delivered {f(k.get('relay_rate_during_per_s'))}/s meanwhile (ratio "
            f"**{f(k.get('relay_over_insert_rate'), 3)}**); backlog when pgbench ended "
            f"{f(k.get('backlog_when_pgbench_ended'))} events "
            f"({f(k.get('backlog_seconds_of_inserts'), 2)} s of inserts), all in Kafka "
            f"{f(k.get('seconds_after_pgbench_until_all_in_kafka'), 2)} s later; relay CPU "
            f"{f(k.get('relay_cpu_ms_per_1000_events'))} ms per 1,000 events."
        )
    d = g(r, "scenarios", "drain") or {}
    rat = r.get("ratios_to_ceilings") or {}
    rows = []
    for client in ("kafka-python", "confluent"):
        x = d.get(client) or {}
        q = rat.get(f"drain {client}") or {}
        rows.append(
            [
                client,
                x.get("events_per_s_incl_startup"),
                x.get("events_per_s_after_first"),
                q.get("over_decode_ceiling"),
                q.get("over_insert_ceiling"),
                q.get("over_produce_ceiling"),
                x.get("relay_cpu_ms_per_1000_events"),
                x.get("relay_peak_rss_mb"),
                x.get("database_cpu_us_per_event"),
            ]
        )
    p = g(r, "scenarios", "polling", "drain") or {}
    q = rat.get("drain polling (kafka-python)") or {}
    if p:
        rows.append(
            [
                f"polling, kafka-python ({f(p.get('events'))} events)",
                p.get("events_per_s_incl_startup"),
                p.get("events_per_s_after_first"),
                q.get("over_decode_ceiling"),
                q.get("over_insert_ceiling"),
                q.get("over_produce_ceiling"),
                p.get("relay_cpu_ms_per_1000_events"),
                round(p["relay_peak_rss_mib"] * 1.048576, 1)
                if p.get("relay_peak_rss_mib")
                else None,
                p.get("database_cpu_us_per_event"),
            ]
        )
    load = d.get("load") or {}
    parts.append(
        f"### Backlog drain ({f(load.get('rows'))} events, loaded at "
        f"{f(load.get('load_rate_per_s'))}/s)\n\n"
        + table(
            [
                "relay",
                "events/s (from spawn)",
                "events/s (after first)",
                "x decode",
                "x insert",
                "x produce",
                "relay CPU ms / 1,000",
                "relay peak RSS MB",
                "walsender / session µs per event",
            ],
            rows,
        )
    )
    w = g(r, "scenarios", "wal_idle") or {}
    if w:

        def mib(x: Any) -> str:
            return "-" if x is None else f"{x / 1048576:.2f} MiB"

        rows = []
        hb = f"heartbeats every {w.get('heartbeat_interval_s')} s"
        for key, label in (("with_heartbeats", hb), ("without_heartbeats", "no heartbeats")):
            x = w.get(key) or {}
            a, b = (
                x.get("confirmed_flush_lag") or {},
                x.get("restart_lsn_lag (WAL kept on disk)") or {},
            )
            rows.append([label, mib(a.get("max_bytes")), mib(a.get("last_bytes")),
                         mib(b.get("max_bytes")), mib(b.get("last_bytes"))])  # fmt: skip
        parts.append(
            f"### WAL retained while the outbox idles ({f(w.get('seconds'))} s, "
            f"{mib(w.get('wal_written_bytes'))} of WAL written by another table)\n\n"
            + table(
                [
                    "relay",
                    "unconfirmed max",
                    "unconfirmed at end",
                    "WAL kept max (restart_lsn)",
                    "WAL kept at end",
                ],
                rows,
            )
        )
    pl = g(r, "scenarios", "polling", "latency_1000") or {}
    wl = g(r, "scenarios", "latency", "kafka-python", "1000") or {}
    if pl and wl:
        pcts = ("p50_ms", "p99_ms", "p99_9_ms")
        rows = [
            [name, *(g(x, "latency_commit_to_consume", q) for q in pcts),
             x.get("relay_cpu_percent_of_one_core")]
            for name, x in (("WAL", wl), ("polling (0.1 s)", pl))
        ]  # fmt: skip
        parts.append(
            "### WAL against polling at 1,000 events/s (kafka-python)\n\n"
            + table(["mode", "p50 ms", "p99 ms", "p99.9 ms", "relay CPU % core"], rows)
        )
    rows = []
    for name, m in (r.get("phases") or {}).items():
        top = ", ".join(f"{t['comm']} {t['cpu_s']} s" for t in m.get("others_top", [])[:3])
        rows.append(
            [
                name,
                m.get("wall_s"),
                f"{m.get('loadavg_start', ['?'])[0]} → {m.get('loadavg_end', ['?'])[0]}",
                m.get("machine_cpu_busy_percent"),
                g(m, "cpu_s", "benchmark_and_relay"),
                g(m, "cpu_s", "services"),
                m.get("others_cores"),
                top,
                "; ".join(m.get("disturbed") or []) or "-",
            ]
        )
    parts.append(
        "### What else the machine did, per phase\n\n"
        + table(
            [
                "phase",
                "wall s",
                "load (1 min)",
                "machine busy %",
                "benchmark + relay CPU s",
                "services CPU s",
                "others (cores)",
                "top others",
                "disturbed",
            ],
            rows,
        )
    )
    cor = r.get("correctness") or {}
    parts.append(
        f"Correctness over {cor.get('open_loop_runs')} open-loop runs "
        f"({f(cor.get('events_committed'))} events): gaps {cor.get('gaps')}, duplicates "
        f"{cor.get('duplicates')}, per-key reorders {cor.get('per_key_reorders')}, unexpected "
        f"records {cor.get('unexpected_records')}; extra records after the drains "
        f"{cor.get('drain_extra_records_in_kafka')}."
    )
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/suite.json")
    print(render(json.loads(src.read_text())), end="")
