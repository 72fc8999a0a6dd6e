"""The Grafana dashboard and the metrics reference cannot drift from the code: every metric name
used in deploy/grafana/outbox-cdc.json exists in what RelayMetrics (and the insert API's
StoreMetrics) export, and docs/metrics.md documents exactly the exported metrics, no more, no
fewer."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from outbox_cdc.metrics import PREFIX, PROBE_GAUGES, RelayMetrics, StoreMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-cdc.json"
METRICS_DOC = ROOT / "docs" / "metrics.md"

NAME = re.compile(rf"\b{PREFIX}[a-zA-Z0-9_:]*")
# a row of a reference table: its first cell is a metric name in backticks
DOC_ROW = re.compile(rf"^\|\s*`({PREFIX}[a-zA-Z0-9_:]*)`\s*\|", re.MULTILINE)


@functools.cache
def families() -> tuple[tuple[str, str], ...]:
    """(name, type) of every metric family the project exports: the relay's, with every probe
    gauge set (they are only exported once the watchdog has a value), and the insert API's, as
    ``Outbox(table, registry=registry)`` adds them to an application's registry."""
    relay = RelayMetrics(version="0.0.0", mode="wal")
    relay.set_probe(dict.fromkeys(PROBE_GAUGES, 1.0))
    app = CollectorRegistry()
    StoreMetrics(app)  # what Outbox(registry=app) registers, through StoreMetrics.for_registry
    return tuple(
        (family.name, family.type)
        for registry in (relay.registry, app)
        for family in registry.collect()
    )


def documented_name(name: str, kind: str) -> str:
    """The name a reader looks for: counters with ``_total`` (prometheus_client drops it from
    the family name), info metrics with ``_info``, histograms and gauges as they are."""
    if kind == "counter":
        return name + "_total"
    if kind == "info":
        return name + "_info"
    return name


def sample_names(name: str, kind: str) -> set[str]:
    """The sample names a query can use. Derived from the type rather than from the collected
    samples: a labelled counter has no sample before its first increment."""
    if kind == "counter":
        return {name + "_total"}
    if kind == "info":
        return {name + "_info"}
    if kind == "histogram":
        return {name + "_bucket", name + "_count", name + "_sum"}
    if kind == "summary":
        return {name, name + "_count", name + "_sum"}
    return {name}


def exported_samples() -> set[str]:
    return {s for name, kind in families() for s in sample_names(name, kind)}


def exported_documented_names() -> set[str]:
    return {documented_name(name, kind) for name, kind in families()}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries() -> list[str]:
    data = dashboard()
    queries = [
        target["expr"]
        for panel in all_panels(data["panels"])
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in data.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            queries.append(query["query"] if isinstance(query, dict) else str(query))
    return queries


def test_the_registries_export_what_the_reference_expects() -> None:
    # guards the helpers above: one name of each kind, with its suffixes
    samples = exported_samples()
    assert "outbox_cdc_events_published_total" in samples
    assert "outbox_cdc_commit_to_ack_seconds_bucket" in samples
    assert "outbox_cdc_slot_retained_wal_bytes" in samples
    assert "outbox_cdc_store_errors_total" in samples
    assert "outbox_cdc_events_published" not in samples


def test_every_metric_in_the_dashboard_is_exported() -> None:
    samples = exported_samples()
    queries = dashboard_queries()
    used = {name for query in queries for name in NAME.findall(query)}
    assert len(used) >= 20, sorted(used)  # the extraction found the dashboard's queries
    unknown = sorted(used - samples)
    assert not unknown, f"the dashboard uses metrics the code does not export: {unknown}"


def test_every_panel_queries_the_prometheus_datasource_variable() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = []
    for panel in all_panels(data["panels"]):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert data["schemaVersion"] >= 36


def test_the_reference_documents_exactly_the_exported_metrics() -> None:
    documented = DOC_ROW.findall(METRICS_DOC.read_text())
    assert len(documented) == len(set(documented)), "a metric is documented twice"
    exported = exported_documented_names()
    missing = sorted(exported - set(documented))
    unknown = sorted(set(documented) - exported)
    assert not missing, f"exported but not in docs/metrics.md: {missing}"
    assert not unknown, f"in docs/metrics.md but not exported: {unknown}"


@pytest.mark.parametrize("path", [METRICS_DOC, DASHBOARD], ids=["docs", "dashboard"])
def test_no_metric_name_anywhere_in_the_file_is_unknown(path: Path) -> None:
    """Beyond the tables and the panels: PromQL examples, alert rules and prose."""
    samples = exported_samples() | exported_documented_names()
    # a name followed by a `_` placeholder or `*` is a family written generically
    unknown = sorted(
        {n for n in NAME.findall(path.read_text()) if n not in samples and not n.endswith("_")}
    )
    assert not unknown, f"{path.name} names metrics the code does not export: {unknown}"
