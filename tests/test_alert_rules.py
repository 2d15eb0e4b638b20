"""Prometheus alert rules (deploy/prometheus/alerts.yml): promtool accepts them and their unit tests pass, every
rule names only exported series, links a runbook section that exists, and is tested firing and silent.

promtool is the real one (Debian's ``prometheus`` package ships it; .ci/run installs it). Never mocked.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.kafka_helpers import REPO
from tests.test_dashboards import PROMETHEUS, exported_series

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
RUNBOOK = REPO / "docs" / "RUNBOOK.md"
PROMETHEUS_OWN = {"up"}  # series Prometheus writes itself for every scrape target
PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "group_left",
                "group_right", "inf", "nan"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package (apt-get install -y prometheus), "
                    "which ships promtool; .ci/run installs it")
    return subprocess.run([binary, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def series_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: what is left once strings, label matchers and lists,
    durations, numbers and function calls are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text))
    return {n for n in names if n.lower() not in PROMQL_WORDS and not re.fullmatch(r"\d\w*", n)}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", RUNBOOK.read_text(), re.MULTILINE)}


def test_promtool_checks_the_rules_and_the_config_that_loads_them():
    checked = promtool("check", "rules", str(ALERTS.relative_to(REPO)))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout + checked.stderr
    config = promtool("check", "config", str(PROMETHEUS.relative_to(REPO)))
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout + config.stderr


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_loads_the_rules_and_compose_mounts_them():
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes


def test_the_alerts_the_issue_asks_for_exist():
    names = {rule["alert"] for rule in rules()}
    assert names >= {"SentimentDriftAlert", "SentimentUncertainRateHigh", "SentimentDeadLetterRateHigh",
                     "SentimentConsumerLagHigh", "SentimentLagExporterStale", "SentimentNoProgress",
                     "SentimentWorkerDown", "SentimentDriftMonitorDown"}
    assert all("alert" in rule for rule in rules()), "alerts only: no recording rules in this file"


def test_every_rule_names_only_exported_series():
    exported = exported_series() | PROMETHEUS_OWN
    for rule in rules():
        names = series_names(rule["expr"])
        assert names, rule["expr"]
        missing = sorted(names - exported)
        assert not missing, f"{rule['alert']} uses {missing}, not exported by the worker or the drift monitor"


def test_series_names_reads_promql():
    expr = ('sum by (group) (sentiment_consumer_group_lag{topic="a"}) > 0 and on() '
            '(sum(rate(sentiment_messages_total[10m])) or on() vector(0)) == 0 unless up offset 15m')
    assert series_names(expr) == {"sentiment_consumer_group_lag", "sentiment_messages_total", "up"}


def test_every_rule_has_severity_summary_and_a_runbook_section():
    anchors = runbook_anchors()
    for rule in rules():
        assert rule["labels"]["severity"], rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path.endswith("docs/RUNBOOK.md"), annotations["runbook_url"]
        assert anchor == github_anchor(rule["alert"]), f"{rule['alert']}: the runbook heading is the alert's name"
        assert anchor in anchors, f"{rule['alert']}: no heading for #{anchor} in docs/RUNBOOK.md"


def test_every_rule_is_tested_firing_and_silent():
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    for rule in rules():
        assert cases.get(rule["alert"]) == {True, False}, f"{rule['alert']}: needs a firing and a silent case"
