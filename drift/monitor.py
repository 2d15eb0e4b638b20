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

The Kafka process (transactions, recovery, two instances) is ``drift.service``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from drift.detector import SEVERITY_RANK, DetectorConfig, DriftDetector, WindowResult
from drift.lag import lag_gauges
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
