"""The drift monitor: pooling and manifest lookup (pure), then against the real broker (stats in, alerts out)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from drift.monitor import DriftMonitor, MonitorMetrics
from drift.service import run
from runtime.numeric import BIN_EDGES as DEFAULT_BIN_EDGES
from runtime.settings import DriftMonitorSettings
from schemas import ConfidenceReference, DriftAlert, ModelManifest, ModelRef, ModelUpdate, RetrainRequest, WindowStats
from tests.kafka_helpers import REPO, Topics, create_topic, produce_raw, read_all
from worker.window_stats import WindowAccumulator

LABELS = ["NEGATIVE", "POSITIVE"]
THRESHOLD = 0.7


def write_package(directory: Path, version: str = "1.0.0", seed: int = 0) -> ModelManifest:
    """A package directory whose manifest carries a synthetic reference (the monitor never loads the model)."""
    rng = np.random.default_rng(seed)
    pred, conf = rng.integers(0, 2, 872), 0.5 + 0.5 * rng.beta(6, 1, 872)
    edges = np.asarray(DEFAULT_BIN_EDGES)
    reference = ConfidenceReference(
        bin_edges=list(DEFAULT_BIN_EDGES),
        confidence_hist={lab: np.histogram(conf[pred == i], bins=edges)[0].tolist() for i, lab in enumerate(LABELS)},
        label_mix={lab: float((pred == i).mean()) for i, lab in enumerate(LABELS)},
        uncertain_rate=float((conf < THRESHOLD).mean()), expected_accuracy=float(conf.mean()),
        mean_confidence=float(conf.mean()), n=872, samples=list(zip(pred.tolist(), conf.tolist(), strict=True)),
    )
    manifest = ModelManifest(name="sentiment-en", version=version, labels=LABELS, max_length=64, threshold=THRESHOLD,
                             files={"model.onnx": "0" * 64, "tokenizer.json": "0" * 64}, reference=reference)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(manifest.model_dump_json())
    return manifest


def worker_windows(worker: str, version: str, shifted: bool, count: int, n: int, seed: int) -> list[WindowStats]:
    rng = np.random.default_rng(seed)
    ref = ModelRef(name="sentiment-en", version=version, sha256="0" * 64)
    acc = WindowAccumulator(ref, LABELS, worker_id=worker, window_count=n, window_seconds=1e9)
    out: list[WindowStats] = []
    for _ in range(count):
        if shifted:
            pred, conf = (rng.random(n) < 0.8).astype(np.int64), 0.5 + 0.5 * rng.beta(2, 2, n)
        else:
            pred, conf = rng.integers(0, 2, n), 0.5 + 0.5 * rng.beta(6, 1, n)
        out += acc.add_batch(pred, conf, conf < THRESHOLD, np.full(n, 60), now=time.time())
    return out


def settings(tmp_path: Path, **overrides: object) -> DriftMonitorSettings:
    base: dict[str, object] = {"model_dir": tmp_path / "sentiment-en", "drift_window_min_n": 200,
                               "drift_replicates": 2000, "drift_metrics_port": 0, "retrain_cooldown_s": 3600}
    return DriftMonitorSettings(**{**base, **overrides})


# --------------------------------------------------------------------------------------- pure logic


def test_pools_workers_alerts_once_and_requests_retrain_once(tmp_path: Path) -> None:
    write_package(tmp_path / "sentiment-en")
    monitor = DriftMonitor(settings(tmp_path), MonitorMetrics())
    calm = worker_windows("a", "1.0.0", False, 4, 100, 1) + worker_windows("b", "1.0.0", False, 4, 100, 2)
    results = [r for s in calm for r in monitor.handle_stats(s)]
    assert [r.n for r in results] == [200] * 4, "two workers' windows of 100 pool into windows of 200"
    assert not any(r.alerts for r in results)
    drift = worker_windows("a", "1.0.0", True, 6, 100, 3)
    results = [r for s in drift for r in monitor.handle_stats(s)]
    alerts = [a for r in results for a in r.alerts]
    assert len(alerts) == 1 and alerts[0].severity == "critical"
    first = monitor.retrain_request_for(alerts[0])
    assert first is not None and first.alert_id == alerts[0].alert_id
    assert monitor.retrain_request_for(alerts[0]) is None, "cooldown"
    exported = monitor.metrics.registry.get_sample_value("sentiment_drift_windows_total")
    assert exported == 7


def test_new_version_loads_its_manifest_from_the_registry(tmp_path: Path) -> None:
    write_package(tmp_path / "sentiment-en")
    registry = tmp_path / "registry"
    write_package(registry / "sentiment-en" / "2.0.0", version="2.0.0", seed=5)
    monitor = DriftMonitor(settings(tmp_path, registry_dir=registry), MonitorMetrics())
    old = worker_windows("a", "1.0.0", False, 1, 150, 1)
    new = worker_windows("a", "2.0.0", False, 2, 100, 2)
    assert monitor.handle_stats(old[0]) == []
    results = monitor.handle_stats(new[0])  # the old version's pool is flushed (150 >= floor 50)
    assert [r.n for r in results] == [150]
    assert [r.n for r in monitor.handle_stats(new[1])] == [200]
    assert ("sentiment-en", "2.0.0") in monitor.detectors
    unknown = worker_windows("a", "9.9.9", False, 1, 100, 3)[0]
    assert monitor.handle_stats(unknown) == []
    assert monitor.metrics.registry.get_sample_value("sentiment_drift_stats_total", {"result": "no_manifest"}) == 1


def test_model_update_path_is_used(tmp_path: Path) -> None:
    write_package(tmp_path / "sentiment-en")
    elsewhere = tmp_path / "somewhere" / "else"
    write_package(elsewhere, version="3.0.0")
    monitor = DriftMonitor(settings(tmp_path), MonitorMetrics())
    monitor.note_model_update(ModelUpdate(model=ModelRef(name="sentiment-en", version="3.0.0", sha256="0" * 64),
                                          path=str(elsewhere)))
    assert monitor.detector_for("sentiment-en", "3.0.0") is not None


def test_time_flush_of_a_small_pool(tmp_path: Path) -> None:
    write_package(tmp_path / "sentiment-en")
    clock = [0.0]
    monitor = DriftMonitor(settings(tmp_path, drift_window_max_wait_s=30), MonitorMetrics(), clock=lambda: clock[0])
    monitor.handle_stats(worker_windows("a", "1.0.0", False, 1, 80, 1)[0])
    assert monitor.tick() == []
    clock[0] = 31.0
    assert [r.n for r in monitor.tick()] == [80]


# ------------------------------------------------------------------------------------------- Kafka


@pytest.mark.kafka
async def test_monitor_consumes_stats_and_publishes_one_alert(kafka: str, topics: Topics, tmp_path: Path) -> None:
    write_package(tmp_path / "sentiment-en")
    names = {"stats_topic": topics.stats, "drift_alerts_topic": f"{topics.prefix}.drift-alerts",
             "retrain_requests_topic": f"{topics.prefix}.retrain-requests",
             "model_updates_topic": topics.model_updates}
    for name in names.values():
        await create_topic(name, partitions=1)
    cfg = settings(tmp_path, kafka_bootstrap=kafka, drift_group_id=f"{topics.prefix}-monitor",
                   drift_auto_offset_reset="earliest", **names)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run(cfg, stop, DriftMonitor(cfg, MonitorMetrics()), ready))
    await asyncio.wait_for(ready.wait(), 30)
    calm = worker_windows("w1", "1.0.0", False, 3, 100, 1) + worker_windows("w2", "1.0.0", False, 3, 100, 2)
    drift = worker_windows("w1", "1.0.0", True, 4, 100, 3) + worker_windows("w2", "1.0.0", True, 4, 100, 4)
    await produce_raw(topics.stats, [(s.worker_id.encode(), s.to_json_bytes()) for s in calm + drift])
    await produce_raw(topics.stats, [(None, b"{not json")])  # skipped, never fatal
    alerts = await read_all([names["drift_alerts_topic"]], expected=1, timeout=60, idle=3)
    requests = await read_all([names["retrain_requests_topic"]], expected=1, timeout=20, idle=1)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert len(alerts) == 1, [a.value for a in alerts]
    alert = DriftAlert.model_validate(alerts[0].value)
    assert alert.severity == "critical" and alert.model.version == "1.0.0" and alert.window.n >= 200
    assert alerts[0].key == "sentiment-en"
    assert len(requests) == 1
    request = RetrainRequest.model_validate(requests[0].value)
    assert request.alert_id == alert.alert_id and request.model_name == "sentiment-en"


@pytest.mark.kafka
def test_monitor_process_stops_cleanly_on_sigterm(kafka: str, topics: Topics, tmp_path: Path) -> None:
    write_package(tmp_path / "sentiment-en")
    env = {**os.environ, "SENTIMENT_KAFKA_BOOTSTRAP": kafka, "SENTIMENT_STATS_TOPIC": topics.stats,
           "SENTIMENT_MODEL_UPDATES_TOPIC": topics.model_updates, "SENTIMENT_DRIFT_GROUP_ID": topics.prefix,
           "SENTIMENT_MODEL_DIR": str(tmp_path / "sentiment-en"), "SENTIMENT_DRIFT_METRICS_PORT": "0"}
    asyncio.run(create_topic(topics.stats, 1))
    asyncio.run(create_topic(topics.model_updates, 1))
    proc = subprocess.Popen([sys.executable, "-m", "cli", "drift-monitor"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        started = False
        while time.monotonic() < deadline and not started:
            line = proc.stderr.readline()
            if not line:
                break
            started = "drift_monitor_started" in line
        assert started, "the monitor never reported it started"
        time.sleep(2)  # let the consumer join its group
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        tail = proc.stderr.read()
        assert "drift_monitor_stopped" in tail, tail[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_exits_zero() -> None:
    result = subprocess.run([sys.executable, "-m", "cli", "drift-monitor", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "drift-monitor" in result.stdout



def test_the_monitor_reads_the_workers_threshold_setting_and_refuses_the_old_name(monkeypatch):
    """One threshold setting (issue 16): SENTIMENT_THRESHOLD is read by workers and monitor alike; the old
    SENTIMENT_DRIFT_THRESHOLD is refused rather than silently ignored."""
    import pydantic

    from runtime.settings import DriftMonitorSettings, WorkerSettings

    monkeypatch.setenv("SENTIMENT_THRESHOLD", "0.7")
    assert DriftMonitorSettings().threshold == WorkerSettings().threshold == 0.7
    monkeypatch.setenv("SENTIMENT_DRIFT_THRESHOLD", "0.6")
    with pytest.raises(pydantic.ValidationError, match="SENTIMENT_THRESHOLD"):
        DriftMonitorSettings()
