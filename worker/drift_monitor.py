"""``sentiment drift-monitor``: pools every worker's WindowStats, runs the drift detector, publishes alerts.

Contract:
  * Consumes ``sentiment.stats`` (and ``sentiment.model-updates``, to learn where new packages live) in
    its own consumer group. Offsets are auto-committed: the monitor's state is a pool of recent windows,
    and losing or re-reading a few seconds of stats after a crash changes nothing an operator would see.
  * Pools stats per model (name, version) in arrival order, so all workers' windows count together; a
    pool is evaluated as one window once it holds ``drift_window_min_n`` records, or once its oldest stats
    are ``drift_window_max_wait_s`` old and it holds at least ``drift_window_min_n_floor``.
  * Stats of a model version it has not seen load that version's manifest (the configured model dir, the
    registry ``<root>/<name>/<version>/``, or the path a ``ModelUpdate`` named); one ``DriftDetector`` per
    version, so a reload starts a fresh history against the new model's own reference. Stats whose
    manifest cannot be found are counted and dropped, never crash the monitor.
  * Each ``DriftAlert`` goes to ``sentiment.drift-alerts`` (key: model name). An alert at or above
    ``retrain_min_severity`` also sends a ``RetrainRequest`` to ``sentiment.retrain-requests``, at most one
    per ``retrain_cooldown_s``.
  * Prometheus (own port): ``sentiment_drift_score{metric}``, ``sentiment_drift_threshold{metric}``,
    ``sentiment_drift_in_alarm{metric}``, ``sentiment_drift_estimated_accuracy``,
    ``sentiment_drift_expected_accuracy``, ``sentiment_drift_window_records``,
    ``sentiment_drift_alerts_total{metric,severity}``, ``sentiment_drift_windows_total``,
    ``sentiment_drift_retrain_requests_total``, ``sentiment_drift_stats_total{result}``.
  * SIGTERM / SIGINT stop it cleanly: the consumer leaves its group, the producer flushes, exit code 0.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from pydantic import ValidationError

from schemas import DriftAlert, ModelManifest, ModelUpdate, RetrainRequest, WindowStats
from worker.drift import METRICS, SEVERITY_RANK, DetectorConfig, DriftConfigError, DriftDetector, WindowResult
from worker.package import PackageError, read_manifest, resolve_package_dir
from worker.settings import DriftMonitorSettings
from worker.window_stats import StatsMergeError, merge_window_stats

log = structlog.get_logger("sentiment.drift_monitor")

MAX_DETECTORS = 4  # model versions kept in memory (current, previous, and a couple in flight)


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
    stats: list[WindowStats] = field(default_factory=list)
    first_seen: float = 0.0

    @property
    def n(self) -> int:
        return sum(s.n for s in self.stats)


ManifestLoader = Callable[[str, str], ModelManifest | None]


class DriftMonitor:
    """The monitor's logic without Kafka: feed it stats, get alerts and retrain requests back."""

    def __init__(self, settings: DriftMonitorSettings, metrics: MonitorMetrics | None = None,
                 loader: ManifestLoader | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.metrics = metrics or MonitorMetrics()
        self.clock = clock
        self.known_paths: dict[tuple[str, str], Path] = {}
        self.loader = loader or self.find_manifest
        self.detectors: OrderedDict[tuple[str, str], DriftDetector] = OrderedDict()
        self.missing: set[tuple[str, str]] = set()
        self.pools: dict[tuple[str, str], _Pool] = {}
        self.last_retrain: float | None = None
        self.config = DetectorConfig(
            false_alarm_rate=settings.drift_false_alarm_rate, warn_rate=max(10 * settings.drift_false_alarm_rate,
                                                                            0.02),
            cooldown_windows=settings.drift_cooldown_windows, threshold=settings.drift_threshold,
            replicates=settings.drift_replicates,
        )

    # ------------------------------------------------------------------------------------ manifests

    def note_model_update(self, update: ModelUpdate) -> None:
        """Remembers where a promoted version lives, so its stats can find their manifest."""
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
        self.metrics.stats.labels(result="accepted").inc()
        results = []
        # Another version's pool will not grow any more once a new version reports: flush it now.
        for other in [k for k in self.pools if k[0] == key[0] and k != key]:
            results += self._evaluate(other, force=True)
        pool = self.pools.setdefault(key, _Pool(first_seen=self.clock()))
        pool.stats.append(stats)
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
        if pool is None or detector is None or not pool.stats:
            return []
        if force and pool.n < self.settings.drift_window_min_n_floor:
            log.info("drift_pool_dropped", model=key[0], version=key[1], n=pool.n)
            return []
        try:
            merged = merge_window_stats(pool.stats, worker_id=f"pool:{len({s.worker_id for s in pool.stats})}")
            result = detector.update(merged)
        except (StatsMergeError, DriftConfigError) as exc:
            log.error("drift_window_rejected", model=key[0], version=key[1], error=str(exc))
            self.metrics.stats.labels(result="rejected").inc(len(pool.stats))
            return []
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
            request_id=str(uuid.uuid4()), model_name=alert.model.name, alert_id=alert.alert_id,
            reason=f"drift {alert.severity}: {alert.metric}={alert.value:.4f} (threshold {alert.threshold:.4f}, "
                   f"n={alert.window.n}, model {alert.model.version})",
        )


# ------------------------------------------------------------------------------------------- Kafka


async def run(settings: DriftMonitorSettings, stop: asyncio.Event, monitor: DriftMonitor | None = None,
              ready: asyncio.Event | None = None) -> None:
    """Consumes until ``stop`` is set; publishes alerts and retrain requests."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    monitor = monitor or DriftMonitor(settings)
    kafka = settings.aiokafka_kwargs()
    consumer = AIOKafkaConsumer(
        settings.stats_topic, settings.model_updates_topic, group_id=settings.drift_group_id,
        enable_auto_commit=True, auto_offset_reset=settings.drift_auto_offset_reset, **kafka,
    )
    producer = AIOKafkaProducer(acks="all", enable_idempotence=True, **kafka)
    await producer.start()
    try:
        await consumer.start()
        try:
            if ready is not None:
                ready.set()
            last_tick = time.monotonic()
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=500)
                results: list[WindowResult] = []
                for tp, records in batches.items():
                    for record in records:
                        results += _handle_record(monitor, settings, tp.topic, record.value)
                if time.monotonic() - last_tick >= 1.0:
                    results += monitor.tick()
                    last_tick = time.monotonic()
                for result in results:
                    await _publish(monitor, settings, producer, result)
        finally:
            await consumer.stop()
    finally:
        await producer.stop()


def _handle_record(monitor: DriftMonitor, settings: DriftMonitorSettings, topic: str,
                   value: bytes | None) -> list[WindowResult]:
    if value is None:
        return []
    try:
        if topic == settings.model_updates_topic:
            monitor.note_model_update(ModelUpdate.model_validate_json(value))
            return []
        return monitor.handle_stats(WindowStats.model_validate_json(value))
    except ValidationError as exc:
        # A malformed record must not stop monitoring; it is counted and logged, then skipped.
        monitor.metrics.stats.labels(result="invalid").inc()
        log.warning("drift_invalid_record", topic=topic, error=str(exc).splitlines()[0])
        return []


async def _publish(monitor: DriftMonitor, settings: DriftMonitorSettings, producer: object,
                   result: WindowResult) -> None:
    for alert in result.alerts:
        await producer.send_and_wait(settings.drift_alerts_topic, alert.to_json_bytes(),  # type: ignore[attr-defined]
                                     key=alert.model.name.encode())
        monitor.metrics.alerts.labels(metric=alert.metric, severity=alert.severity).inc()
        log.warning("drift_alert", alert_id=alert.alert_id, metric=alert.metric, severity=alert.severity,
                    value=alert.value, threshold=alert.threshold, n=alert.window.n, version=alert.model.version)
        request = monitor.retrain_request_for(alert)
        if request is not None:
            await producer.send_and_wait(settings.retrain_requests_topic,  # type: ignore[attr-defined]
                                         request.to_json_bytes(), key=request.model_name.encode())
            monitor.metrics.retrains.inc()
            log.warning("retrain_requested", request_id=request.request_id, alert_id=alert.alert_id)


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
    from worker.logs import configure

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
        await run(settings, stop, monitor)
        log.info("drift_monitor_stopped")

    try:
        asyncio.run(_main())
    except (OSError, ConnectionError) as exc:
        log.error("drift_monitor_failed", error=str(exc))
        return 1
    except Exception as exc:  # aiokafka raises its own KafkaError family on an unreachable broker
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
