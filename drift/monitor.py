"""``sentiment drift-monitor``: pools every worker's WindowStats, runs the drift detector, publishes alerts.

Contract:
  * Consumes ``sentiment.stats`` (and ``sentiment.model-updates``, to learn where new packages live) in
    its own consumer group, ``read_committed``: stats a producer wrote in an aborted transaction are never
    pooled. Offsets are never auto-committed: they are committed in the same Kafka transaction as the state
    they fed and the alerts they caused (see "Delivery and recovery" below).
  * Pools stats per model (name, version) in arrival order, so all workers' windows count together; a
    pool is evaluated as one window once it holds ``drift_window_min_n`` records, or once its oldest stats
    are ``drift_window_max_wait_s`` old (wall clock, so the age survives a restart) and it holds at least
    ``drift_window_min_n_floor``. A pool is kept as the running merge of its stats (counts and histograms
    add exactly), so its size is bounded whatever the worker window size; a stats record that cannot be
    merged into its pool (other bin edges or labels) is rejected alone.
  * Stats of a model version it has not seen load that version's manifest (the configured model dir, the
    registry ``<root>/<name>/<version>/``, or the path a ``ModelUpdate`` named); one ``DriftDetector`` per
    version, so a reload starts a fresh history against the new model's own reference. Stats whose
    manifest cannot be found are counted and dropped, never crash the monitor.
  * Each ``DriftAlert`` goes to ``sentiment.drift-alerts`` (key: model name). An alert at or above
    ``retrain_min_severity`` also sends a ``RetrainRequest`` to ``sentiment.retrain-requests``, at most one
    per ``retrain_cooldown_s`` (wall clock, persisted). Alert ids are deterministic (uuid5 of model, window
    index, window bounds and size, metric, severity), and a request's id derives from its alert's, so a
    consumer reading uncommitted records can still recognise a retried send.
  * Its state (pools, each detector's hysteresis / cooldown / window index, the last retrain time, the
    ``ModelUpdate`` paths it learned, the ids of the last alerts it sent) survives restarts in the compacted
    topic ``drift_state_topic`` (default ``sentiment.drift-monitor-state``, 1 partition, created if missing):
    one snapshot record, key = ``drift_group_id``, always on partition 0.
  * One instance per ``drift_group_id``. A second one refuses to start (log ``drift_monitor_already_running``,
    exit code 3); see "Two instances" below.
  * Prometheus (own port): ``sentiment_drift_score{metric}``, ``sentiment_drift_threshold{metric}``,
    ``sentiment_drift_in_alarm{metric}``, ``sentiment_drift_estimated_accuracy``,
    ``sentiment_drift_expected_accuracy``, ``sentiment_drift_window_records``,
    ``sentiment_drift_alerts_total{metric,severity}``, ``sentiment_drift_windows_total``,
    ``sentiment_drift_retrain_requests_total``, ``sentiment_drift_stats_total{result}``,
    ``sentiment_drift_transaction_failures_total``. The alert and retrain counters count committed sends;
    the window and score series describe evaluations, which a retried transaction repeats.
  * SIGTERM / SIGINT stop it cleanly: the poll in progress is committed, the consumer leaves its group,
    exit code 0.

Why a compacted topic and not a faust table: the monitor is a plain aiokafka client, and its whole state is
one small record (pools are merged, so bounded). A Kafka transaction can then write that record, the alerts
and the consumer offsets atomically, with no more machinery than a transactional producer. A faust table
would bring faust's app, its changelog-per-partition and its rebalance recovery, and faust commits a table's
changelog and the source offsets separately unless its exactly-once mode is on: the very gap this fixes.

Delivery and recovery (one poll of the loop in ``_session``; the order is the guarantee):
  1. ``getmany`` up to 500 records (read_committed). Each is applied to the in-memory monitor: pooled,
     evaluated; alerts are produced in memory only.
  2. ``tick`` evaluates pools that waited long enough.
  3. If anything was consumed or changed: ``begin_transaction``; send each alert not already in the
     sent-ids list, then its retrain request (the cooldown clock moves in memory); send the state snapshot
     taken after those changes; ``send_offsets_to_transaction`` with the offsets just past the records of
     step 1, for ``drift_group_id``; ``commit_transaction``.
  4. Only after the commit: alert / retrain counters and the ``drift_alert`` / ``retrain_requested`` logs.
  Any error in step 3 (a refused send, a broker gone, a timeout) aborts the transaction where it still can,
  throws the in-memory state away and starts a new session after ``drift_retry_backoff_s``, exactly as a
  restart after ``kill -9`` does:
  a. wait until no other member is in the group (refuse to start if one stays: see below);
  b. start the transactional producer, ``transactional.id = <drift_group_id>.txn``. Its InitProducerId
     aborts whatever transaction the previous incarnation left open and fences that incarnation;
  c. read the state topic to its end, read_committed, and restore the last snapshot for our key;
  d. join the group and consume from the committed offsets.
  So the stats after the last committed offsets are read again into the state committed with those offsets,
  which rebuilds the same windows (and the same alert ids) and sends them in a fresh transaction; consumers
  reading read_committed never see the aborted one. Invariants (each is why the above is exactly-once):
  * The committed offsets and the committed snapshot always describe the same point of the stats stream:
    they are only ever written together, in one transaction.
  * An alert or retrain request is committed if and only if the state that records it (the detector moved
    past the window, the pool emptied, the cooldown started, the id in the sent list) is committed.
  * Between polls the in-memory state equals the committed one, so a rebalance inside ``getmany`` (which
    resets positions to the committed offsets) loses nothing.
  * An unreadable snapshot (another format version, bad JSON) stops the monitor (``drift_state_unreadable``,
    exit 1) instead of starting from nothing and repeating alerts; delete the record (a tombstone for the
    key) to start fresh deliberately.
  A transaction left open by a process that was killed blocks read_committed readers of the alerts topic
  until the next instance starts (step b) or ``transaction.timeout.ms`` (60 s) passes.

Two instances: the pools join every worker's windows of a model into one window, whatever stats partition
they came from, so the work cannot be split between instances without changing the windows. At start (step
a) the monitor describes its consumer group; a member there is either a live instance (it keeps sending
heartbeats) or a killed one (it expires after ``drift_session_timeout_ms``). The new instance waits that long
plus a margin and refuses to start if a member is still there. Two instances started at the same moment can
both pass that check; then the fixed transactional id decides: the later InitProducerId fences the earlier
producer, whose next transaction fails with ProducerFenced, and that instance exits 1 without having
committed anything after the other one restored its state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from pydantic import ValidationError

from drift.detector import SEVERITY_RANK, DetectorConfig, DriftDetector, WindowResult
from drift.lag import LagExporter, lag_gauges
from drift.reference import METRICS, DriftConfigError
from runtime.errors import RefusedError, SentimentError
from runtime.package import PackageError, read_manifest, resolve_package_dir
from runtime.settings import DriftMonitorSettings
from runtime.window_stats import StatsMergeError, merge_window_stats
from schemas import DriftAlert, ModelManifest, ModelUpdate, RetrainRequest, WindowStats

log = structlog.get_logger("sentiment.drift_monitor")

MAX_KNOWN_PATHS = 16  # package paths learned from model updates, oldest dropped first
MAX_DETECTORS = 4  # model versions kept in memory (current, previous, and a couple in flight)
STATE_VERSION = 1  # format of the state snapshot; another one is refused, never guessed
SENT_ALERTS_KEPT = 100  # ids of the last alerts sent, kept in the snapshot
# Fixed namespace of the deterministic alert ids: the same window evaluated again gets the same id.
ALERT_ID_NAMESPACE = uuid.UUID("5b0e7c52-43a4-4f57-9d7e-1f0a1b6d2c88")
EXIT_ALREADY_RUNNING = 3
COORDINATOR_WAIT_S = 120.0  # how long a start waits for the group coordinator of a broker that is starting


class MonitorAlreadyRunning(RefusedError):
    """Another instance is a live member of the monitor's consumer group."""


class StateError(SentimentError):
    """The state snapshot cannot be read back."""


class _TransactionFailed(SentimentError):
    """A transaction of one poll failed and was aborted; the session restarts from the committed state."""


class MonitorMetrics:
    """The monitor's Prometheus series, on their own registry (tests build several monitors)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.score = Gauge("sentiment_drift_score", "Latest drift statistic per metric (PSI, JS bits, rate, "
                           "estimated accuracy).", ["metric"], registry=r)
        self.threshold = Gauge("sentiment_drift_threshold", "Fire threshold for the latest window, in the units "
                               "of sentiment_drift_score.", ["metric"], registry=r)
        self.in_alarm = Gauge("sentiment_drift_in_alarm", "1 while the metric is in alarm (hysteresis).",
                              ["metric"], registry=r)
        self.estimated_accuracy = Gauge("sentiment_drift_estimated_accuracy",
                                        "Label-free accuracy estimate of the latest window.", registry=r)
        self.expected_accuracy = Gauge("sentiment_drift_expected_accuracy",
                                       "Accuracy the manifest measured on its reference split.", registry=r)
        self.window_records = Gauge("sentiment_drift_window_records", "Records in the latest evaluated window.",
                                    registry=r)
        self.alerts = Counter("sentiment_drift_alerts_total", "Drift alerts published.", ["metric", "severity"],
                              registry=r)
        self.windows = Counter("sentiment_drift_windows_total", "Pooled windows evaluated.", registry=r)
        self.retrains = Counter("sentiment_drift_retrain_requests_total", "Retrain requests sent.", registry=r)
        self.stats = Counter("sentiment_drift_stats_total", "WindowStats records by result.", ["result"], registry=r)
        self.group_lag = lag_gauges(r)
        self.transaction_failures = Counter(
            "sentiment_drift_transaction_failures_total", "Polls whose transaction (alerts, state, offsets) failed "
            "and was retried from the committed state.", registry=r)

    def observe(self, result: WindowResult) -> None:
        for metric in METRICS:
            self.score.labels(metric=metric).set(result.values[metric])
            self.threshold.labels(metric=metric).set(result.limits[metric])
            self.in_alarm.labels(metric=metric).set(1.0 if metric in result.in_alarm else 0.0)
        self.estimated_accuracy.set(result.values["estimated_accuracy"])
        self.expected_accuracy.set(result.expected_accuracy)
        self.window_records.set(result.n)
        self.windows.inc()


@dataclass
class _Pool:
    """The windows of one model pooled so far, kept as their running merge (bounded size)."""

    merged: WindowStats | None = None
    workers: set[str] = field(default_factory=set)
    records: int = 0  # stats records in the pool
    first_seen: float = 0.0  # wall clock

    @property
    def n(self) -> int:
        return self.merged.n if self.merged is not None else 0

    def add(self, stats: WindowStats) -> None:
        """Raises StatsMergeError (and leaves the pool as it was) when stats do not fit the pool."""
        self.merged = stats if self.merged is None else merge_window_stats([self.merged, stats], worker_id="pool")
        self.workers.add(stats.worker_id)
        self.records += 1

    def to_json(self, key: tuple[str, str]) -> dict[str, Any]:
        assert self.merged is not None
        return {"name": key[0], "version": key[1], "first_seen": self.first_seen, "records": self.records,
                "workers": sorted(self.workers), "stats": json.loads(self.merged.to_json_bytes())}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> tuple[tuple[str, str], _Pool]:
        pool = cls(merged=WindowStats.model_validate(data["stats"]), workers=set(data["workers"]),
                   records=int(data["records"]), first_seen=float(data["first_seen"]))
        return (str(data["name"]), str(data["version"])), pool


def alert_id_for(alert: DriftAlert) -> str:
    """A deterministic alert id: the same window of the same detector history always gets the same id."""
    basis = "|".join(str(part) for part in (
        alert.model.name, alert.model.version, alert.model.sha256, alert.details.get("window_index"),
        alert.window.start.isoformat(), alert.window.end.isoformat(), alert.window.n, alert.metric,
        alert.severity, alert.details.get("escalation")))
    return str(uuid.uuid5(ALERT_ID_NAMESPACE, basis))


ManifestLoader = Callable[[str, str], ModelManifest | None]


class DriftMonitor:
    """The monitor's logic without Kafka: feed it stats, get alerts and retrain requests back."""

    def __init__(self, settings: DriftMonitorSettings, metrics: MonitorMetrics | None = None,
                 loader: ManifestLoader | None = None, clock: Callable[[], float] = time.time) -> None:
        # The clock is the wall clock by default: pool ages and the retrain cooldown are persisted, and must
        # mean the same after a restart (a monotonic clock restarts with the process).
        self.settings = settings
        self.metrics = metrics or MonitorMetrics()
        self.clock = clock
        self.known_paths: dict[tuple[str, str], Path] = {}
        self.loader = loader or self.find_manifest
        self.detectors: OrderedDict[tuple[str, str], DriftDetector] = OrderedDict()
        self.missing: set[tuple[str, str]] = set()
        self.pools: dict[tuple[str, str], _Pool] = {}
        self.last_retrain: float | None = None
        self.sent_alerts: deque[str] = deque(maxlen=SENT_ALERTS_KEPT)
        # Restored detector states whose detector is not loaded yet (its manifest is loaded on first use).
        self.pending_states: dict[tuple[str, str], dict[str, Any]] = {}
        self.config = DetectorConfig(
            false_alarm_rate=settings.drift_false_alarm_rate, warn_rate=max(10 * settings.drift_false_alarm_rate,
                                                                            0.02),
            cooldown_windows=settings.drift_cooldown_windows, threshold=settings.threshold,
            replicates=settings.drift_replicates,
        )

    # ------------------------------------------------------------------------------------ manifests

    def note_model_update(self, update: ModelUpdate) -> None:
        """Remembers where a promoted version lives, so its stats can find their manifest."""
        # Bounded: the snapshot that holds these must stay far under the state topic's record limit.
        if len(self.known_paths) >= MAX_KNOWN_PATHS:
            self.known_paths.pop(next(iter(self.known_paths)))
        self.known_paths[(update.model.name, update.model.version)] = Path(update.path)

    def candidate_dirs(self, name: str, version: str) -> list[Path]:
        s = self.settings
        dirs: list[Path] = []
        if (name, version) in self.known_paths:
            dirs.append(self.known_paths[(name, version)])
        dirs.append(resolve_package_dir(s.model_dir))
        for root in (s.registry_dir, s.model_dir, s.model_dir.parent):
            if root is not None:
                dirs += [root / name / version, root / version]
        return dirs

    def find_manifest(self, name: str, version: str) -> ModelManifest | None:
        """The manifest of (name, version) from the first candidate directory that holds it, else None."""
        for directory in self.candidate_dirs(name, version):
            try:
                manifest = read_manifest(directory)
            except (PackageError, OSError):
                continue
            if manifest.name == name and manifest.version == version:
                return manifest
        return None

    def detector_for(self, name: str, version: str) -> DriftDetector | None:
        key = (name, version)
        if key in self.detectors:
            self.detectors.move_to_end(key)
            return self.detectors[key]
        manifest = self.loader(name, version)
        if manifest is None:
            if key not in self.missing:
                log.error("drift_manifest_not_found", model=name, version=version,
                          looked_in=[str(p) for p in self.candidate_dirs(name, version)])
                self.missing.add(key)
            return None
        try:
            detector = DriftDetector(manifest, self.config)
        except DriftConfigError as exc:
            log.error("drift_reference_unusable", model=name, version=version, error=str(exc))
            self.missing.add(key)
            return None
        self.missing.discard(key)
        self._apply_state(key, detector)
        self.detectors[key] = detector
        while len(self.detectors) > MAX_DETECTORS:
            self.detectors.popitem(last=False)
        log.info("drift_reference_loaded", model=name, version=version, reference_n=detector.reference.n,
                 expected_accuracy=detector.reference.expected_accuracy)
        return detector

    # ---------------------------------------------------------------------------------------- stats

    def handle_stats(self, stats: WindowStats) -> list[WindowResult]:
        """Adds one worker window; returns the results of any pooled windows this completed."""
        key = (stats.model.name, stats.model.version)
        if self.detector_for(*key) is None:
            self.metrics.stats.labels(result="no_manifest").inc()
            return []
        results = []
        # Another version's pool will not grow any more once a new version reports: flush it now.
        for other in [k for k in self.pools if k[0] == key[0] and k != key]:
            results += self._evaluate(other, force=True)
        pool = self.pools.get(key) or _Pool(first_seen=self.clock())
        try:
            pool.add(stats)
        except StatsMergeError as exc:
            log.error("drift_stats_rejected", model=key[0], version=key[1], worker=stats.worker_id, error=str(exc))
            self.metrics.stats.labels(result="rejected").inc()
            return results
        self.pools[key] = pool
        self.metrics.stats.labels(result="accepted").inc()
        if pool.n >= self.settings.drift_window_min_n:
            results += self._evaluate(key)
        return results

    def tick(self) -> list[WindowResult]:
        """Evaluates pools that waited long enough (call every few seconds)."""
        now = self.clock()
        results = []
        for key, pool in list(self.pools.items()):
            if now - pool.first_seen >= self.settings.drift_window_max_wait_s:
                results += self._evaluate(key, force=True)
        return results

    def _evaluate(self, key: tuple[str, str], force: bool = False) -> list[WindowResult]:
        pool = self.pools.pop(key, None)
        detector = self.detectors.get(key)
        if pool is None or detector is None or pool.merged is None:
            return []
        if force and pool.n < self.settings.drift_window_min_n_floor:
            log.info("drift_pool_dropped", model=key[0], version=key[1], n=pool.n)
            return []
        try:
            merged = pool.merged.model_copy(update={"worker_id": f"pool:{len(pool.workers)}"})
            result = detector.update(merged)
        except DriftConfigError as exc:
            log.error("drift_window_rejected", model=key[0], version=key[1], error=str(exc))
            self.metrics.stats.labels(result="rejected").inc(pool.records)
            return []
        # Deterministic ids: evaluating the same window again (after a failed transaction) names it the same.
        result.alerts = [a.model_copy(update={"alert_id": alert_id_for(a)}) for a in result.alerts]
        self.metrics.observe(result)
        log.info("drift_window", model=key[0], version=key[1], n=result.n, values=result.values,
                 in_alarm=result.in_alarm, alerts=len(result.alerts))
        return [result]

    def retrain_request_for(self, alert: DriftAlert) -> RetrainRequest | None:
        """A RetrainRequest when the alert is severe enough and the cooldown has passed, else None."""
        minimum = self.settings.retrain_min_severity
        if minimum == "off" or SEVERITY_RANK[alert.severity] < SEVERITY_RANK[minimum]:
            return None
        now = self.clock()
        if self.last_retrain is not None and now - self.last_retrain < self.settings.retrain_cooldown_s:
            return None
        self.last_retrain = now
        return RetrainRequest(
            request_id=str(uuid.uuid5(ALERT_ID_NAMESPACE, f"retrain|{alert.alert_id}")), model_name=alert.model.name,
            alert_id=alert.alert_id,
            reason=f"drift {alert.severity}: {alert.metric}={alert.value:.4f} (threshold {alert.threshold:.4f}, "
                   f"n={alert.window.n}, model {alert.model.version})",
        )


    # ---------------------------------------------------------------------------------------- state

    def snapshot(self) -> dict[str, Any]:
        """Everything a restart needs, as JSON values: pools, detector histories, cooldown, learned paths."""
        detectors = [{"name": k[0], "version": k[1], "state": d.state_dict()} for k, d in self.detectors.items()]
        detectors += [{"name": k[0], "version": k[1], "state": state} for k, state in self.pending_states.items()
                      if k not in self.detectors]
        return {
            "v": STATE_VERSION,
            "pools": [pool.to_json(key) for key, pool in self.pools.items() if pool.merged is not None],
            "detectors": detectors[-2 * MAX_DETECTORS:],
            "last_retrain": self.last_retrain,
            "known_paths": [[k[0], k[1], str(path)] for k, path in self.known_paths.items()],
            "sent_alerts": list(self.sent_alerts),
        }

    def restore(self, snapshot: dict[str, Any] | None) -> None:
        """Replaces the whole state by ``snapshot`` (None: a fresh start). Raises StateError, leaving the
        state as it was, when the snapshot is of another format or malformed."""
        snapshot = snapshot or {"v": STATE_VERSION}
        if not isinstance(snapshot, dict) or snapshot.get("v") != STATE_VERSION:
            raise StateError(f"state snapshot format {snapshot.get('v') if isinstance(snapshot, dict) else None!r}, "
                             f"expected {STATE_VERSION}")
        try:
            pools = dict(_Pool.from_json(p) for p in snapshot.get("pools", []))
            pending = {(str(d["name"]), str(d["version"])): dict(d["state"]) for d in snapshot.get("detectors", [])}
            last_retrain = snapshot.get("last_retrain")
            last_retrain = None if last_retrain is None else float(last_retrain)
            known = {(str(n), str(v)): Path(p) for n, v, p in snapshot.get("known_paths", [])}
            sent = [str(a) for a in snapshot.get("sent_alerts", [])]
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise StateError(f"malformed state snapshot: {exc!r}") from exc
        self.pools, self.pending_states, self.last_retrain, self.known_paths = pools, pending, last_retrain, known
        self.sent_alerts = deque(sent, maxlen=SENT_ALERTS_KEPT)
        for key, detector in self.detectors.items():
            self._apply_state(key, detector)

    def _apply_state(self, key: tuple[str, str], detector: DriftDetector) -> None:
        state = self.pending_states.pop(key, None)
        detector.reset()
        if state is None:
            return
        try:
            detector.load_state(state)
        except ValueError as exc:
            # Only a reference that changed under the same (name, version) gets here: its history means nothing.
            log.error("drift_detector_state_dropped", model=key[0], version=key[1], error=str(exc))


# ------------------------------------------------------------------------------------------- Kafka


FENCED_ERRORS = ("ProducerFenced", "InvalidProducerEpoch", "TransactionalIdAuthorizationFailed")


def transactional_id(settings: DriftMonitorSettings) -> str:
    """Fixed per group: a new incarnation's producer aborts its predecessor's open transaction and fences it."""
    return f"{settings.drift_group_id}.txn"


async def run(settings: DriftMonitorSettings, stop: asyncio.Event, monitor: DriftMonitor | None = None,
              ready: asyncio.Event | None = None) -> None:
    """Consumes until ``stop`` is set; publishes alerts and retrain requests (module docstring: the order).

    Raises MonitorAlreadyRunning when another instance holds the group, StateError on an unreadable snapshot,
    aiokafka's ProducerFenced when a newer instance took over, and aiokafka errors of the first start (broker
    unreachable). A failed transaction later on is retried from the committed state, never raised.
    """
    monitor = monitor or DriftMonitor(settings)
    await _ensure_state_topic(settings)
    while not stop.is_set():
        try:
            await _session(settings, stop, monitor, ready)
            return
        except _TransactionFailed as exc:
            monitor.metrics.transaction_failures.inc()
            log.error("drift_transaction_failed", error=repr(exc.__cause__), retry_in_s=settings.drift_retry_backoff_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.drift_retry_backoff_s)


async def _session(settings: DriftMonitorSettings, stop: asyncio.Event, monitor: DriftMonitor,
                   ready: asyncio.Event | None) -> None:
    """Steps a-d of the module docstring, then polls until ``stop``; raises _TransactionFailed."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    kafka = settings.aiokafka_kwargs()
    await _refuse_if_running(settings, stop)  # a
    if stop.is_set():
        return
    # b: InitProducerId happens in start(). It must come before reading the state: it aborts the transaction a
    # killed predecessor left open, which would otherwise hold the read_committed end of the state topic back.
    producer = AIOKafkaProducer(transactional_id=transactional_id(settings), acks="all", enable_idempotence=True,
                                **kafka)
    await producer.start()
    try:
        monitor.restore(await _read_state(settings))  # c
        consumer = AIOKafkaConsumer(  # d
            group_id=settings.drift_group_id, enable_auto_commit=False, isolation_level="read_committed",
            auto_offset_reset=settings.drift_auto_offset_reset, session_timeout_ms=settings.drift_session_timeout_ms,
            heartbeat_interval_ms=max(settings.drift_session_timeout_ms // 3, 300),
            # Topics the workers have not created yet are found within seconds, not aiokafka's 5 minutes.
            metadata_max_age_ms=5000, **kafka,
        )
        await consumer.start()
        try:
            consumer.subscribe([settings.stats_topic, settings.model_updates_topic])
            await _poll(settings, stop, monitor, consumer, producer, ready)
        finally:
            await consumer.stop()  # leaves the group; commits nothing (auto-commit is off)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 30)


async def _poll(settings: DriftMonitorSettings, stop: asyncio.Event, monitor: DriftMonitor, consumer: Any,
                producer: Any, ready: asyncio.Event | None) -> None:
    announced = False
    last_tick = time.monotonic()
    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=500, max_records=500)
        if not announced and consumer.assignment():
            announced = True
            log.info("drift_monitor_ready", group=settings.drift_group_id, pools=len(monitor.pools),
                     partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in consumer.assignment()))
            if ready is not None:
                ready.set()
        results: list[WindowResult] = []
        offsets = {}
        for tp, records in batches.items():
            for record in records:
                results += _handle_record(monitor, settings, tp.topic, record.value)
            if records:
                offsets[tp] = records[-1].offset + 1
        pools_before = set(monitor.pools)
        if time.monotonic() - last_tick >= 1.0:
            results += monitor.tick()
            last_tick = time.monotonic()
        if offsets or results or set(monitor.pools) != pools_before:
            await _commit(monitor, settings, producer, results, offsets)


async def _commit(monitor: DriftMonitor, settings: DriftMonitorSettings, producer: Any, results: list[WindowResult],
                  offsets: dict[Any, int]) -> None:
    """Step 3: alerts, retrain requests, the snapshot and the offsets in one transaction; step 4 after it."""
    from aiokafka.errors import KafkaError

    sent: list[tuple[DriftAlert, RetrainRequest | None]] = []
    try:
        await producer.begin_transaction()
        futures = []
        for result in results:
            for alert in result.alerts:
                if alert.alert_id in monitor.sent_alerts:  # committed before: never twice
                    log.info("drift_alert_already_sent", alert_id=alert.alert_id)
                    continue
                futures.append(await producer.send(settings.drift_alerts_topic, alert.to_json_bytes(),
                                                   key=alert.model.name.encode()))
                # After the alert and in the same transaction: a request never goes out without its alert.
                request = monitor.retrain_request_for(alert)
                if request is not None:
                    futures.append(await producer.send(settings.retrain_requests_topic, request.to_json_bytes(),
                                                       key=request.model_name.encode()))
                monitor.sent_alerts.append(alert.alert_id)
                sent.append((alert, request))
        # The snapshot is taken after the sends above changed the state (cooldown, sent ids).
        state = json.dumps(monitor.snapshot(), separators=(",", ":")).encode()
        futures.append(await producer.send(settings.drift_state_topic, state, key=settings.drift_group_id.encode(),
                                           partition=0))
        if offsets:
            await producer.send_offsets_to_transaction(offsets, settings.drift_group_id)
        await asyncio.gather(*futures)
        await producer.commit_transaction()
    except (KafkaError, TimeoutError) as exc:  # anything else is a bug: the process exits, a restart recovers
        if type(exc).__name__ in FENCED_ERRORS:
            raise  # another instance took over: retrying would fence it back
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.abort_transaction(), 30)
        raise _TransactionFailed(str(exc)) from exc
    for alert, request in sent:
        monitor.metrics.alerts.labels(metric=alert.metric, severity=alert.severity).inc()
        log.warning("drift_alert", alert_id=alert.alert_id, metric=alert.metric, severity=alert.severity,
                    value=alert.value, threshold=alert.threshold, n=alert.window.n, version=alert.model.version)
        if request is not None:
            monitor.metrics.retrains.inc()
            log.warning("retrain_requested", request_id=request.request_id, alert_id=alert.alert_id)


def _handle_record(monitor: DriftMonitor, settings: DriftMonitorSettings, topic: str,
                   value: bytes | None) -> list[WindowResult]:
    if value is None:
        return []
    try:
        if topic == settings.model_updates_topic:
            monitor.note_model_update(ModelUpdate.model_validate_json(value))
            return []
        return monitor.handle_stats(WindowStats.model_validate_json(value))
    except Exception as exc:
        # A malformed record (invalid, or valid but unmergeable: histograms that do not match their edges) is
        # counted and logged, then skipped: re-raising would crash-loop the monitor on the same offset.
        monitor.metrics.stats.labels(result="invalid").inc()
        log.warning("drift_invalid_record", topic=topic, error=(str(exc).splitlines() or [repr(exc)])[0][:300])
        return []


async def _ensure_state_topic(settings: DriftMonitorSettings) -> None:
    """Creates the compacted state topic when it is missing (another instance may win the race)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        if settings.drift_state_topic in await admin.list_topics():
            return
        topic = NewTopic(settings.drift_state_topic, num_partitions=1,
                         replication_factor=settings.drift_state_replication_factor,
                         topic_configs={"cleanup.policy": "compact"})
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([topic])
        log.info("drift_state_topic_created", topic=settings.drift_state_topic)
    finally:
        await admin.close()


async def _refuse_if_running(settings: DriftMonitorSettings, stop: asyncio.Event) -> None:
    """Step a: returns once the group has no member; raises MonitorAlreadyRunning if one outlives a session
    timeout (plus a margin for the broker's expiry check), i.e. it is a live instance, not a killed one."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        deadline = time.monotonic() + settings.drift_session_timeout_ms / 1000 + 5
        coordinator_deadline = time.monotonic() + COORDINATOR_WAIT_S
        waiting = False
        while not stop.is_set():
            described = await _describe_group(admin, settings.drift_group_id, coordinator_deadline)
            if described is not None:  # else: the group coordinator is still starting (a fresh broker)
                state, members = described
                if not members:
                    return
                if time.monotonic() >= deadline:
                    raise MonitorAlreadyRunning(
                        f"consumer group {settings.drift_group_id!r} has {len(members)} live member(s) ({state}): "
                        f"another drift monitor is running")
                if not waiting:
                    waiting = True
                    log.info("drift_waiting_for_group", group=settings.drift_group_id, state=state, members=members,
                             wait_s=round(deadline - time.monotonic(), 1))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await admin.close()


async def _describe_group(admin: Any, group: str, coordinator_deadline: float) -> tuple[str, list[str]] | None:
    """(state, member ids) of ``group``; None while its coordinator is not available yet (until the deadline)."""
    from aiokafka.errors import KafkaError, for_code

    try:
        description = (await admin.describe_consumer_groups([group]))[0].groups[0]
        error_code = description[0]
        if error_code:
            raise for_code(error_code)(f"describing group {group}")
    except KafkaError as exc:
        if getattr(exc, "retriable", False) and time.monotonic() < coordinator_deadline:
            log.info("drift_group_coordinator_not_ready", group=group, error=repr(exc))
            return None
        raise
    return description[2], [member[0] for member in description[5]]


async def _read_state(settings: DriftMonitorSettings) -> dict[str, Any] | None:
    """Step c: the last committed snapshot for our key on partition 0 of the state topic (None: none yet)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, isolation_level="read_committed",
                                **settings.aiokafka_kwargs())
    await consumer.start()
    try:
        tp = TopicPartition(settings.drift_state_topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]  # under read_committed: the last stable offset
        key = settings.drift_group_id.encode()
        value: bytes | None = None
        stalled_since = time.monotonic()
        while (position := await consumer.position(tp)) < end:
            for record in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if record.key == key:
                    value = record.value  # a tombstone (None) deliberately resets the state
            if await consumer.position(tp) > position:
                stalled_since = time.monotonic()
            elif time.monotonic() - stalled_since > 60:
                raise StateError(f"state topic stuck at offset {position} of {end}")
    finally:
        await consumer.stop()
    if value is None:
        log.info("drift_state_restored", found=False)
        return None
    try:
        snapshot = json.loads(value)
    except ValueError as exc:
        raise StateError(f"state snapshot is not JSON: {exc}") from exc
    log.info("drift_state_restored", found=True, bytes=len(value), pools=len(snapshot.get("pools", [])))
    return snapshot


# -------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentiment drift-monitor",
        description="Pool all workers' WindowStats from sentiment.stats, compare them with the model manifest's "
                    "reference (bootstrap-calibrated PSI, label-mix JS, UNCERTAIN rate, label-free accuracy "
                    "estimate), publish DriftAlert and RetrainRequest. Settings come from SENTIMENT_* variables; "
                    "these flags override them.")
    parser.add_argument("--model-dir", type=Path, help="SENTIMENT_MODEL_DIR: package or registry model dir.")
    parser.add_argument("--registry-dir", type=Path, help="SENTIMENT_REGISTRY_DIR: registry root.")
    parser.add_argument("--bootstrap", help="SENTIMENT_KAFKA_BOOTSTRAP")
    parser.add_argument("--window-min-n", type=int, help="SENTIMENT_DRIFT_WINDOW_MIN_N: records per pooled window.")
    parser.add_argument("--metrics-port", type=int, help="SENTIMENT_DRIFT_METRICS_PORT (0: off).")
    parser.add_argument("--from-beginning", action="store_true",
                        help="Start a new consumer group at the earliest stats (default: latest).")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def settings_from_args(args: argparse.Namespace) -> DriftMonitorSettings:
    overrides = {
        "model_dir": args.model_dir, "registry_dir": args.registry_dir, "kafka_bootstrap": args.bootstrap,
        "drift_window_min_n": args.window_min_n, "drift_metrics_port": args.metrics_port,
        "log_level": args.log_level, "drift_auto_offset_reset": "earliest" if args.from_beginning else None,
    }
    return DriftMonitorSettings(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"drift-monitor: invalid settings: {exc}", file=sys.stderr)
        return 2
    from runtime.logs import configure

    configure(settings.log_level)
    metrics = MonitorMetrics()
    if settings.drift_metrics_port:
        start_http_server(settings.drift_metrics_port, registry=metrics.registry)
    monitor = DriftMonitor(settings, metrics)
    if monitor.detector_for(*_served_model(settings)) is None:
        log.warning("drift_no_initial_reference", model_dir=str(settings.model_dir))

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("drift_monitor_started", stats_topic=settings.stats_topic, group=settings.drift_group_id,
                 window_min_n=settings.drift_window_min_n)
        # Lag from the broker, exported here once (one monitor runs), not summed from the workers.
        lag = LagExporter(settings, settings.app_id, settings.input_topics, metrics.group_lag, settings.lag_interval_s)
        lag_task = asyncio.create_task(lag.run(stop))
        try:
            await run(settings, stop, monitor)
        finally:
            stop.set()
            await lag_task
        log.info("drift_monitor_stopped")

    try:
        asyncio.run(_main())
    except MonitorAlreadyRunning as exc:
        log.error("drift_monitor_already_running", error=str(exc))
        return EXIT_ALREADY_RUNNING
    except StateError as exc:
        log.error("drift_state_unreadable", topic=settings.drift_state_topic, key=settings.drift_group_id,
                  error=str(exc))
        return 1
    except (OSError, ConnectionError) as exc:
        log.error("drift_monitor_failed", error=str(exc))
        return 1
    except Exception as exc:  # aiokafka raises its own KafkaError family on an unreachable broker
        if type(exc).__name__ in FENCED_ERRORS:
            log.error("drift_monitor_fenced", error=repr(exc), transactional_id=transactional_id(settings))
            return 1
        if type(exc).__module__.startswith("aiokafka"):
            log.error("drift_monitor_kafka_error", error=repr(exc))
            return 1
        raise
    return 0


def _served_model(settings: DriftMonitorSettings) -> tuple[str, str]:
    """(name, version) of the package in model_dir, or ('', '') when it cannot be read."""
    try:
        manifest = read_manifest(resolve_package_dir(settings.model_dir))
    except (PackageError, OSError):
        return "", ""
    return manifest.name, manifest.version


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
