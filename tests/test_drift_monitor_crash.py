"""The drift monitor across crashes: kill -9, a failed alert send, restarts, aborted stats, a second instance.

All against the real broker. The monitor runs as a real process (``python -m cli drift-monitor``) where
a test kills it, and in-process where the test needs its metrics. Alerts and retrain requests are counted with
a read_committed consumer: what a downstream consumer (the trainer) sees.

Stats come as worker windows of 100 records; the monitor pools them into windows of 500 (the default
``drift_window_min_n``), so five stats records make one evaluated window.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from drift.monitor import DriftMonitor, MonitorMetrics
from drift.service import run
from runtime.settings import DriftMonitorSettings
from schemas import DriftAlert, RetrainRequest
from tests.kafka_helpers import BOOTSTRAP, REPO, Topics, create_topic, produce_raw, report
from tests.test_drift_monitor import worker_windows, write_package

WINDOW = 100  # records per worker window (one stats record)
MIN_N = 500  # records per pooled window: five stats records
SESSION_MS = 6000  # the broker's group.min.session.timeout.ms: a killed monitor's member expires this fast


def stats(shifted: bool, count: int, seed: int) -> list[tuple[bytes | None, bytes | None]]:
    return [(s.worker_id.encode(), s.to_json_bytes())
            for s in worker_windows("w1", "1.0.0", shifted, count, WINDOW, seed)]


class Names:
    """Fresh topics and group for one test."""

    def __init__(self, tmp_path: Path) -> None:
        prefix = Topics().prefix
        self.prefix = prefix
        self.stats, self.model_updates = f"{prefix}.stats", f"{prefix}.model-updates"
        self.alerts, self.retrain = f"{prefix}.drift-alerts", f"{prefix}.retrain-requests"
        self.state, self.group = f"{prefix}.drift-monitor-state", f"{prefix}-monitor"
        self.model_dir = tmp_path / "sentiment-en"
        write_package(self.model_dir)

    async def create(self, **alert_configs: str) -> None:
        for name in (self.stats, self.model_updates, self.retrain):
            await create_topic(name, partitions=1)
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.alerts, 1, 1, topic_configs=alert_configs)])
        finally:
            await admin.close()

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "SENTIMENT_KAFKA_BOOTSTRAP": BOOTSTRAP, "SENTIMENT_STATS_TOPIC": self.stats,
            "SENTIMENT_MODEL_UPDATES_TOPIC": self.model_updates, "SENTIMENT_DRIFT_ALERTS_TOPIC": self.alerts,
            "SENTIMENT_RETRAIN_REQUESTS_TOPIC": self.retrain, "SENTIMENT_DRIFT_STATE_TOPIC": self.state,
            "SENTIMENT_DRIFT_GROUP_ID": self.group, "SENTIMENT_MODEL_DIR": str(self.model_dir),
            "SENTIMENT_DRIFT_METRICS_PORT": "0", "SENTIMENT_DRIFT_AUTO_OFFSET_RESET": "earliest",
            "SENTIMENT_DRIFT_REPLICATES": "2000", "SENTIMENT_DRIFT_SESSION_TIMEOUT_MS": str(SESSION_MS),
            "SENTIMENT_DRIFT_RETRY_BACKOFF_S": "0.5", **extra,
        }

    def settings(self, **overrides: object) -> DriftMonitorSettings:
        base: dict[str, object] = {
            "kafka_bootstrap": BOOTSTRAP, "stats_topic": self.stats, "model_updates_topic": self.model_updates,
            "drift_alerts_topic": self.alerts, "retrain_requests_topic": self.retrain,
            "drift_state_topic": self.state, "drift_group_id": self.group, "model_dir": self.model_dir,
            "drift_metrics_port": 0, "drift_auto_offset_reset": "earliest", "drift_replicates": 2000,
            "drift_window_min_n": MIN_N, "drift_session_timeout_ms": SESSION_MS, "drift_retry_backoff_s": 0.5,
        }
        return DriftMonitorSettings(**{**base, **overrides})


class MonitorProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> MonitorProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", "drift-monitor"], cwd=REPO,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                raise
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


# ------------------------------------------------------------------------------------ broker helpers


async def group_members(group: str) -> tuple[str, set[str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        description = (await admin.describe_consumer_groups([group]))[0].groups[0]
        return description[2], {member[0] for member in description[5]}
    finally:
        await admin.close()


async def wait_member(group: str, old: set[str] | None = None, timeout: float = 60) -> set[str]:
    """Waits until the group is stable with a member that is not in ``old``; returns its members."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, members = await group_members(group)
        if state == "Stable" and members - (old or set()):
            return members
        await asyncio.sleep(0.5)
    raise AssertionError(f"no new member of {group} within {timeout}s")


async def committed(group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    meta = offsets.get(TopicPartition(topic, 0))
    return meta.offset if meta is not None and meta.offset >= 0 else 0


async def end_offset(topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


async def wait_committed(group: str, topic: str, offset: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await committed(group, topic) >= offset:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"{group} did not commit {topic} up to {offset} within {timeout}s "
                         f"(at {await committed(group, topic)})")


async def read_committed(topic: str, expected: int, timeout: float, idle: float = 2.0) -> list[dict]:
    """Every committed record of the one-partition ``topic`` (read_committed), until ``expected`` arrived and
    ``idle`` seconds passed without more (to catch duplicates), or ``timeout`` passed."""
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None, enable_auto_commit=False,
                                isolation_level="read_committed")
    await consumer.start()
    values: list[dict] = []
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = last_new = time.monotonic()
        deadline += timeout
        while time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                values += [json.loads(message.value) for message in batch]
                last_new = time.monotonic()
            if len(values) >= expected and time.monotonic() - last_new > idle:
                break
    finally:
        await consumer.stop()
    return values


async def alerts_and_requests(names: Names, alerts: int, requests: int, timeout: float = 60,
                              idle: float = 2.0) -> tuple[list[DriftAlert], list[RetrainRequest]]:
    found = await read_committed(names.alerts, alerts, timeout, idle)
    asked = await read_committed(names.retrain, requests, 10, 0.5)
    return ([DriftAlert.model_validate(v) for v in found], [RetrainRequest.model_validate(v) for v in asked])


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.kafka
async def test_kill9_with_a_pooled_window_still_alerts_exactly_once(kafka: str, tmp_path: Path) -> None:
    names = Names(tmp_path)
    await names.create()
    first = MonitorProcess(names.env(), tmp_path / "monitor.log").start()
    second: MonitorProcess | None = None
    try:
        members = await wait_member(names.group)
        await produce_raw(names.stats, stats(True, 4, 3))  # 400 drifted records: pooled, under 500
        await wait_committed(names.group, names.stats, 4)  # the monitor has consumed them
        first.kill9()
        second = MonitorProcess(names.env(), tmp_path / "monitor.log").start()
        await wait_member(names.group, members)
        await produce_raw(names.stats, stats(True, 2, 4))  # 100 completes the window, 100 start the next
        alerts, requests = await alerts_and_requests(names, 1, 1)
        await wait_committed(names.group, names.stats, 6)
        assert second.stop() == 0, second.log()
    finally:
        for proc in (first, second):
            if proc is not None and proc.proc is not None and proc.proc.poll() is None:
                proc.kill9()
    assert len(alerts) == 1, [a.alert_id for a in alerts]
    assert alerts[0].window.n == MIN_N, "the 400 records pooled before the crash count in the window"
    assert len(requests) == 1 and requests[0].alert_id == alerts[0].alert_id
    report("drift_monitor_kill9_with_400_pooled", alerts_sent=len(alerts), retrain_requests=len(requests),
           window_n=alerts[0].window.n)


@pytest.mark.kafka
async def test_restart_after_an_alert_keeps_hysteresis_and_retrain_cooldown(kafka: str, tmp_path: Path) -> None:
    names = Names(tmp_path)
    await names.create()
    env = names.env(SENTIMENT_DRIFT_COOLDOWN_WINDOWS="0")  # a new episode alerts at once; retrain cooldown 1 h
    first = MonitorProcess(env, tmp_path / "monitor.log").start()
    second: MonitorProcess | None = None
    try:
        members = await wait_member(names.group)
        await produce_raw(names.stats, stats(True, 5, 3))  # window 0: drift, alert, retrain request
        alerts, requests = await alerts_and_requests(names, 1, 1, idle=0.2)
        assert len(alerts) == 1 and len(requests) == 1
        first.kill9()  # right after the alert became visible
        second = MonitorProcess(env, tmp_path / "monitor.log").start()
        await wait_member(names.group, members)
        # window 1: the same drift (still in alarm: no alert); 2, 3: calm (the episode ends); 4: drift again,
        # a new episode: an alert, but the retrain request is inside the cooldown.
        await produce_raw(names.stats, stats(True, 5, 4) + stats(False, 5, 6) + stats(False, 5, 8) + stats(True, 5, 7))
        await wait_committed(names.group, names.stats, 25)
        alerts, requests = await alerts_and_requests(names, 2, 1)
        assert second.stop() == 0, second.log()
    finally:
        for proc in (first, second):
            if proc is not None and proc.proc is not None and proc.proc.poll() is None:
                proc.kill9()
    assert [a.details["window_index"] for a in alerts] == [0, 4], [a.details["window_index"] for a in alerts]
    assert len({a.alert_id for a in alerts}) == 2
    assert len(requests) == 1 and requests[0].alert_id == alerts[0].alert_id


def _failures(monitor: DriftMonitor) -> float:
    return monitor.metrics.registry.get_sample_value("sentiment_drift_transaction_failures_total") or 0.0


@pytest.mark.kafka
async def test_a_refused_alert_is_not_lost(kafka: str, tmp_path: Path) -> None:
    names = Names(tmp_path)
    await names.create(**{"max.message.bytes": "256"})  # the broker refuses every alert (about 1.5 kB)
    cfg = names.settings()
    stop, ready = asyncio.Event(), asyncio.Event()
    monitor = DriftMonitor(cfg, MonitorMetrics())
    task = asyncio.create_task(run(cfg, stop, monitor, ready))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        await produce_raw(names.stats, stats(True, 5, 3))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not task.done() and _failures(monitor) < 2:
            await asyncio.sleep(0.2)
        assert await read_committed(names.alerts, 0, 2, 0.5) == []
        assert await read_committed(names.retrain, 0, 2, 0.5) == [], "no retrain request without its alert"
        # The stats that make the alert stay uncommitted while it cannot be sent.
        assert await committed(names.group, names.stats) < 5
        admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
        await admin.start()
        try:
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, names.alerts,
                                                      configs={"max.message.bytes": "1000000"})])
        finally:
            await admin.close()
        if task.done():  # a supervisor restarts a monitor that died
            task.exception()
            stop, ready = asyncio.Event(), asyncio.Event()
            monitor = DriftMonitor(cfg, MonitorMetrics())
            task = asyncio.create_task(run(cfg, stop, monitor, ready))
        alerts, requests = await alerts_and_requests(names, 1, 1, timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 30)
    assert len(alerts) == 1 and alerts[0].window.n == MIN_N
    assert len(requests) == 1 and requests[0].alert_id == alerts[0].alert_id
    assert await committed(names.group, names.stats) == 5


@pytest.mark.kafka
async def test_stats_of_an_aborted_transaction_are_not_pooled(kafka: str, tmp_path: Path) -> None:
    names = Names(tmp_path)
    await names.create()
    cfg = names.settings()
    stop, ready = asyncio.Event(), asyncio.Event()
    monitor = DriftMonitor(cfg, MonitorMetrics())
    task = asyncio.create_task(run(cfg, stop, monitor, ready))
    try:
        await asyncio.wait_for(ready.wait(), 60)
        producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, transactional_id=f"{names.prefix}-aborter")
        await producer.start()
        try:
            await producer.begin_transaction()
            for key, value in stats(True, 6, 3):
                await producer.send_and_wait(names.stats, value, key=key)
            await producer.abort_transaction()
        finally:
            await producer.stop()
        await produce_raw(names.stats, stats(False, 6, 5))
        await wait_committed(names.group, names.stats, await end_offset(names.stats))
        alerts = await read_committed(names.alerts, 0, 2, 0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    accepted = monitor.metrics.registry.get_sample_value("sentiment_drift_stats_total", {"result": "accepted"})
    assert accepted == 6, "only the committed stats are pooled"
    assert alerts == []


@pytest.mark.kafka
async def test_a_second_instance_refuses_to_start(kafka: str, tmp_path: Path) -> None:
    names = Names(tmp_path)
    await names.create()
    first = MonitorProcess(names.env(), tmp_path / "first.log").start()
    second = MonitorProcess(names.env(), tmp_path / "second.log")
    try:
        await wait_member(names.group)
        second.start()
        assert second.proc is not None
        code = await asyncio.to_thread(second.proc.wait, SESSION_MS / 1000 + 30)
        assert code == 3 and "drift_monitor_already_running" in second.log(), second.log()
        assert first.proc is not None and first.proc.poll() is None, first.log()
        await produce_raw(names.stats, stats(True, 5, 3))  # the first instance still does the work, once
        alerts, requests = await alerts_and_requests(names, 1, 1)
        assert first.stop() == 0, first.log()
    finally:
        for proc in (first, second):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.kill9()
    assert len(alerts) == 1 and len(requests) == 1


def test_state_snapshot_round_trip(tmp_path: Path) -> None:
    """Pools, hysteresis, cooldown and model paths survive a snapshot and a restore into a fresh monitor."""
    names = Names(tmp_path)
    cfg = names.settings(drift_cooldown_windows=0)
    clock = [1000.0]
    monitor = DriftMonitor(cfg, MonitorMetrics(), clock=lambda: clock[0])
    windows = worker_windows("w1", "1.0.0", True, 9, WINDOW, 3)
    results = [r for s in windows for r in monitor.handle_stats(s)]
    alert = results[0].alerts[0]
    assert monitor.retrain_request_for(alert) is not None
    snapshot = json.loads(json.dumps(monitor.snapshot()))  # what the state topic carries is JSON
    restored = DriftMonitor(cfg, MonitorMetrics(), clock=lambda: clock[0])
    restored.restore(snapshot)
    assert restored.pools[("sentiment-en", "1.0.0")].n == 4 * WINDOW
    assert restored.retrain_request_for(alert) is None, "cooldown kept"
    more = worker_windows("w2", "1.0.0", True, 1, WINDOW, 4)
    again = restored.handle_stats(more[0])
    assert [r.index for r in again] == [1] and again[0].in_alarm and not again[0].alerts, "hysteresis kept"
    assert restored.snapshot()["detectors"] != snapshot["detectors"]


def test_a_window_evaluated_again_gets_the_same_alert_and_request_ids(tmp_path: Path) -> None:
    """What a failed transaction does: restore the committed state, read the same stats, evaluate again."""
    names = Names(tmp_path)
    cfg = names.settings()
    windows = worker_windows("w1", "1.0.0", True, 5, WINDOW, 3)
    first = DriftMonitor(cfg, MonitorMetrics())
    for s in windows[:3]:
        first.handle_stats(s)
    committed_state = json.loads(json.dumps(first.snapshot()))
    ids = []
    for _ in range(2):
        monitor = DriftMonitor(cfg, MonitorMetrics())
        monitor.restore(committed_state)
        alerts = [a for s in windows[3:] for r in monitor.handle_stats(s) for a in r.alerts]
        request = monitor.retrain_request_for(alerts[0])
        assert len(alerts) == 1 and request is not None
        ids.append((alerts[0].alert_id, request.request_id))
    assert ids[0] == ids[1]


def test_a_stats_record_whose_histogram_does_not_match_its_edges_is_skipped_not_fatal(tmp_path: Path) -> None:
    """Found in review: a valid-looking WindowStats whose histogram rows have another length than its edges
    made the pool merge raise outside the per-record guard, and the monitor crash-looped on that offset."""
    import json as json_

    from pydantic import ValidationError

    from drift.monitor import DriftMonitor
    from drift.service import _handle_record
    from runtime.settings import DriftMonitorSettings
    from schemas import WindowStats

    settings = DriftMonitorSettings(drift_metrics_port=0, model_dir=tmp_path)
    monitor = DriftMonitor(settings)
    bad = {"schema": "sentiment.stats/v1", "worker_id": "w", "model": {"name": "m", "version": "1",
           "sha256": "0" * 64}, "window_start": "2026-01-01T00:00:00Z", "window_end": "2026-01-01T00:01:00Z",
           "n": 1, "bin_edges": [0.0, 0.5, 1.0], "confidence_hist": {"POSITIVE": [1, 0, 0, 0]},
           "label_counts": {"POSITIVE": 1}, "uncertain_count": 0, "sum_confidence": 0.9,
           "text_length_quantiles": {"p10": 1, "p50": 1, "p90": 1}}
    assert _handle_record(monitor, settings, settings.stats_topic, json_.dumps(bad).encode()) == []
    # Refused as one invalid record by the schema, before any pool could try (and fail) to merge it; the old
    # code let it through (here it was counted no_manifest; with a known model the merge raised).
    assert monitor.metrics.stats.labels(result="invalid")._value.get() == 1
    with pytest.raises(ValidationError, match="len\\(bin_edges\\) - 1"):
        WindowStats.model_validate(bad)
