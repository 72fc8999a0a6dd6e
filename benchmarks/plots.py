"""PNG plots of a benchmark suite result (benchmarks/suite.py --full writes them itself).

.venv/bin/pip install -e '.[bench]'   # matplotlib
.venv/bin/python benchmarks/plots.py benchmarks/results/suite.json docs/benchmarks
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BACKENDS = ("kafka-python", "confluent")
COLORS = {"kafka-python": "tab:blue", "confluent": "tab:orange", "polling": "tab:green"}


def _title(r: dict[str, Any], what: str) -> str:
    h = r.get("host") or {}
    return f"{what}\n{h.get('nproc')} vCPU {h.get('cpu_model', '')}, {r.get('date', '')[:10]}"


def plot_latency(r: dict[str, Any], out: Path) -> Path:
    lat = (r.get("scenarios") or {}).get("latency") or {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, key, label in (
        (axes[0], "latency_commit_to_consume", "from commit"),
        (axes[1], "latency_schedule_to_consume", "from scheduled send time"),
    ):
        for client in BACKENDS:
            runs = {int(k): v for k, v in (lat.get(client) or {}).items() if k.isdigit()}
            rates = sorted(runs)
            for p, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p99_9_ms", "--")):
                ys = [runs[x][key].get(p) for x in rates]
                ax.plot(rates, ys, style, marker="o", color=COLORS[client],
                        label=f"{client} {p[:-3].replace('_', '.')}")  # fmt: skip
        ax.axhline(50, color="red", linewidth=0.8, label="target p99 at 1,000/s: 50 ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({int(k) for c in lat.values() for k in c if k.isdigit()})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("offered events/s (open loop)")
        ax.set_title(f"latency to the consumer, {label}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(_title(r, "Commit-to-consume latency by offered rate"), fontsize=10)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sustained(r: dict[str, Any], out: Path) -> Path:
    s = (r.get("scenarios") or {}).get("sustained") or {}
    steps = s.get("steps") or []
    ins = ((r.get("ceilings") or {}).get("insert") or {}).get("events_per_s")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = list(range(len(steps)))
    offered = [x["offered_rate_per_s"] for x in steps]
    achieved = [x["achieved_commit_rate_per_s"] for x in steps]
    ok = [x["relay_kept_up"] and x["kept_schedule"] for x in steps]
    ax.bar([x - 0.2 for x in xs], offered, 0.4, label="offered", color="lightgray")
    ax.bar([x + 0.2 for x in xs], achieved, 0.4, label="committed (achieved)",
           color=["tab:green" if o else "tab:red" for o in ok])  # fmt: skip
    if ins:
        ax.axhline(
            ins, color="black", linestyle="--", label=f"INSERT ceiling (pgbench) {ins:,.0f}/s"
        )
    for x, st in zip(xs, steps, strict=True):
        growth = st["relay_backlog_growth_per_s"]
        ax.annotate(f"backlog {growth:+.0f}/s", (x, st["offered_rate_per_s"]),
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(xs, [f"{o:,.0f}" for o in offered])
    ax.set_xlabel("step (offered events/s); green: sustained, red: not")
    ax.set_ylabel("events/s")
    ax.legend(fontsize=8)
    ax.set_title(_title(r, f"Step search ({s.get('client')}): highest sustained "
                           f"{s.get('highest_sustained_per_s')}/s"), fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = out / "sustained.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drain(r: dict[str, Any], out: Path) -> Path:
    sc = r.get("scenarios") or {}
    d = sc.get("drain") or {}
    c = r.get("ceilings") or {}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    tmax = 0.0
    for client in BACKENDS:
        run = d.get(client) or {}
        pts = run.get("progress_per_s") or []
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[client],
                    label=f"{client}: {run.get('events_per_s_incl_startup'):,.0f}/s, peak RSS "
                          f"{run.get('relay_peak_rss_mb')} MB")  # fmt: skip
            tmax = max(tmax, pts[-1][0])
    poll = (sc.get("polling") or {}).get("drain") or {}
    if poll.get("progress_per_s"):
        pts = poll["progress_per_s"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS["polling"],
                label=f"polling (kafka-python, {poll.get('events'):,} events): "
                      f"{poll.get('events_per_s_incl_startup'):,.0f}/s")  # fmt: skip
    n = (d.get("load") or {}).get("rows") or 0
    for k, style in (("decode", "--"), ("insert", ":")):
        rate = (c.get(k) or {}).get("events_per_s")
        if rate and n:
            t = n / rate
            ax.plot([0, t], [0, n], style, color="black", label=f"{k} ceiling {rate:,.0f}/s")
    ax.set_xlabel("seconds since the relay was started")
    ax.set_ylabel("events in Kafka")
    ax.set_xlim(0, tmax * 1.05 if tmax else None)
    ax.legend(fontsize=8)
    ax.set_title(_title(r, f"Backlog drain of {n:,} events"), fontsize=10)
    fig.tight_layout()
    path = out / "drain.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_wal_idle(r: dict[str, Any], out: Path) -> Path:
    w = (r.get("scenarios") or {}).get("wal_idle") or {}
    samples = w.get("samples") or []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    t = [s[0] for s in samples]
    for col, label, style in (
        (2, f"heartbeats every {w.get('heartbeat_interval_s')} s: WAL kept (restart_lsn)", "-"),
        (1, "heartbeats: unconfirmed (confirmed_flush_lsn)", ":"),
        (4, "no heartbeats: WAL kept (restart_lsn)", "-"),
        (3, "no heartbeats: unconfirmed (confirmed_flush_lsn)", ":"),
    ):
        ys = [(s[col] or 0) / 1024 / 1024 for s in samples]
        ax.plot(t, ys, style, label=label, color="tab:blue" if col <= 2 else "tab:red")
    ax.set_xlabel("seconds (outbox idle; another table written at ~100 transactions/s)")
    ax.set_ylabel("MiB behind pg_current_wal_lsn()")
    ax.legend(fontsize=8)
    ax.set_title(_title(r, "WAL retained by the relay's slot while the outbox idles"), fontsize=10)
    fig.tight_layout()
    path = out / "wal-idle.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ratios(r: dict[str, Any], out: Path) -> Path:
    rat = r.get("ratios_to_ceilings") or {}
    names = [k for k, v in rat.items() if v.get("events_per_s")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ys = list(range(len(names)))
    for i, (k, color) in enumerate(
        (("over_insert_ceiling", "tab:blue"), ("over_decode_ceiling", "tab:orange"),
         ("over_produce_ceiling", "tab:gray"))
    ):  # fmt: skip
        vals = [rat[n].get(k) or 0 for n in names]
        ax.barh([y + (i - 1) * 0.27 for y in ys], vals, 0.27, color=color,
                label=k.replace("over_", "÷ ").replace("_", " "))  # fmt: skip
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel("ratio to the ceiling measured in the same run")
    ax.legend(fontsize=8)
    ax.set_title(_title(r, "Relay throughput as a ratio to the ceilings"), fontsize=10)
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(r: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        f(r, out) for f in (plot_latency, plot_sustained, plot_drain, plot_wal_idle, plot_ratios)
    ]


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/suite.json")
    dst = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/benchmarks")
    for p in plot_all(json.loads(src.read_text()), dst):
        print(p)
