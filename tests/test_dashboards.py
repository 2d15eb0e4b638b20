"""Grafana dashboard and Prometheus config: they parse, and every query names a metric the code exports."""

from __future__ import annotations

import json
import re

import yaml
from prometheus_client import REGISTRY

import worker.metrics  # noqa: F401 - registers the worker's metrics on the default registry
from tests.kafka_helpers import REPO
from worker.drift_monitor import MonitorMetrics
from worker.settings import DriftMonitorSettings, WorkerSettings

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
