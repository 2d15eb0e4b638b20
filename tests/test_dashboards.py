"""Grafana dashboard and Prometheus config: they parse, and every query names a metric the code exports."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import REGISTRY

import worker.metrics  # noqa: F401 - registers the worker's metrics on the default registry
from drift.monitor import MonitorMetrics
from runtime.settings import DriftMonitorSettings, WorkerSettings
from tests.kafka_helpers import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "sentiment.json"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
METRIC_NAME = re.compile(r"\bsentiment_[a-z_]+\b")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def exported_series() -> set[str]:
    names: set[str] = set()
    for registry in (REGISTRY, MonitorMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    return queries


def test_dashboard_parses_and_has_the_panels_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for needed in ("throughput", "confidence", "uncertain", "drift", "latency", "lag", "model version"):
        assert needed in titles, needed
    assert dashboard["annotations"]["list"], "drift alerts are shown as annotations"


def test_every_dashboard_query_names_an_exported_metric():
    exported = exported_series()
    for query in dashboard_queries():
        names = METRIC_NAME.findall(query)
        assert names, query
        missing = [n for n in names if n not in exported]
        assert not missing, f"{query!r} uses {missing}, not exported by worker/metrics.py or the drift monitor"


def test_prometheus_scrapes_the_ports_the_processes_listen_on():
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["sentiment-worker"]["dns_sd_configs"][0]["port"] == WorkerSettings().metrics_port
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    monitor_port = compose["services"]["drift-monitor"]["environment"]["SENTIMENT_DRIFT_METRICS_PORT"]
    assert int(monitor_port) == DriftMonitorSettings().drift_metrics_port
    assert jobs["drift-monitor"]["static_configs"][0]["targets"] == [f"drift-monitor:{monitor_port}"]


INSTANCE_SELECTOR = 'instance=~"$instance"'
SELECTOR = re.compile(r"\b(sentiment_[a-z_]+)\b(\{[^}]*\})?")


def worker_series() -> set[str]:
    """Series the workers export (the default registry), as opposed to the drift monitor's own."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("sentiment_"):
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def grouping(expr: str) -> set[str]:
    match = re.search(r"\bby\s*\(([^)]*)\)", expr)
    return {label.strip() for label in match.group(1).split(",")} if match else set()


def test_confidence_heatmap_is_a_prometheus_histogram_per_label():
    dashboard = json.loads(DASHBOARD.read_text())
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert heatmaps, "the confidence distribution is a heatmap panel"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for panel in heatmaps:
        assert panel["options"].get("calculate") is False, "Prometheus has the buckets: no re-bucketing"
        for target in panel["targets"]:
            expr = target["expr"]
            assert target.get("format") == "heatmap", f"{panel['title']}: target needs format heatmap"
            assert "sentiment_confidence_bucket" in expr, expr
            assert {"le", "label"} <= grouping(expr), f"{expr!r} must keep le and label (labels not summed)"
            assert 'label=~"$label"' in expr, expr
        # One heatmap per label: the panel repeats over the label variable, which lists the exported labels.
        assert panel.get("repeat") == "label"
        assert "$label" in panel["title"]
    label_var = variables["label"]
    assert label_var["multi"] and label_var["includeAll"]
    assert "sentiment_confidence_bucket" in label_var["query"] and label_var["query"].rstrip(")").endswith("label")


def test_instance_variable_filters_every_worker_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["query"] == "label_values(sentiment_model_info, instance)"
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"
    workers = worker_series()
    filtered = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name, selector in SELECTOR.findall(target["expr"]):
                if name in workers:
                    assert INSTANCE_SELECTOR in selector, f"{panel['title']}: {name} is not filtered by $instance"
                    filtered += 1
    assert filtered >= 10


def test_every_variable_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    for variable in dashboard["templating"]["list"]:
        names = METRIC_NAME.findall(variable["query"])
        assert names and all(n in exported for n in names), variable["query"]
        # A variable's own query may not depend on itself.
        assert f"${variable['name']}" not in variable["query"]
