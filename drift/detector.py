"""The drift detector: a state machine over consecutive windows. Pure logic, no Kafka, no model runtime.

Contract: ``DriftDetector.update(stats)`` runs the state machine over consecutive windows: a metric enters
alarm on one window above its ``fire`` threshold or on ``consecutive`` windows above its ``warn``
threshold, and leaves alarm only at or below its ``clear`` level (hysteresis). Thresholds come from
``drift.calibration`` and never go below a minimum effect size (``DetectorConfig.min_*``). An episode lasts
while any metric is in alarm; it raises one ``DriftAlert`` when it starts (plus one per severity escalation).
A new episode within ``cooldown_windows`` of the last alert raises none if it is no more severe and involves
only metrics that were in alarm at that alert (flapping); otherwise it alerts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from drift.calibration import ThresholdCalibrator, Thresholds
from drift.reference import (
    DEFAULT_ATC_WEIGHT,
    DEFAULT_SHIFT_SLOPE,
    DEFAULT_TRUNCATION_PENALTY,
    METRICS,
    AccuracyEstimator,
    MetricName,
    Reference,
    WindowSummary,
    statistics,
)
from schemas import DriftAlert, ModelManifest, WindowStats
from schemas.events import DriftWindow

Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class DetectorConfig:
    """Knobs of the detector; the defaults are the ones measured in drift/README.md."""

    false_alarm_rate: float = 0.002  # family-wise, per window, single-window path
    warn_rate: float = 0.02  # family-wise, per window; needs `consecutive` windows in a row
    consecutive: int = 2
    clear_quantile: float = 0.8
    cooldown_windows: int = 10  # a new episode this soon after an alert must be more severe or involve new metrics
    # Smallest drift worth an alert, in statistic units (PSI; JS bits; UNCERTAIN-rate and accuracy points).
    min_psi: float = 0.02
    min_js: float = 0.002
    min_uncertain_excess: float = 0.02
    min_accuracy_drop: float = 0.02
    # The bootstrap treats the reference as if it had 1/reference_inflation of its examples: a margin for
    # a live stream whose true distribution differs from the finite reference by more than its expected
    # sampling error (the false-alarm rate holds on average over references, not for every one).
    reference_inflation: float = 2.0
    critical_accuracy_drop: float = 0.05
    critical_psi: float = 0.25
    replicates: int = 20000
    seed: int = 0
    max_psi_bins: int = 10
    threshold: float | None = None  # UNCERTAIN threshold the workers use; None: the manifest's
    estimator: Literal["cbpe", "atc", "blend"] = "blend"
    # None: the manifest's ``drift_estimator`` entry when it has one, else the module defaults.
    atc_weight: float | None = None
    shift_slope: float | None = None
    truncation_penalty: float | None = None


def estimator_parameters(manifest: ModelManifest, cfg: DetectorConfig) -> tuple[float, float, float]:
    """(atc_weight, shift_slope, truncation_penalty): per parameter the config's, else the manifest's
    ``drift_estimator`` entry, else the module default.

    A package may carry ``"drift_estimator": {"atc_weight": w, "shift_slope": k, "truncation_penalty": c}``
    (``sentiment drift-fit``, on labelled shifted data for that model); the defaults were fitted for the first
    sentiment-en package (drift/README.md).
    """
    extra = (manifest.model_extra or {}).get("drift_estimator")
    extra = extra if isinstance(extra, dict) else {}

    def pick(configured: float | None, name: str, default: float) -> float:
        return configured if configured is not None else float(extra.get(name, default))

    return (pick(cfg.atc_weight, "atc_weight", DEFAULT_ATC_WEIGHT),
            pick(cfg.shift_slope, "shift_slope", DEFAULT_SHIFT_SLOPE),
            pick(cfg.truncation_penalty, "truncation_penalty", DEFAULT_TRUNCATION_PENALTY))


@dataclass
class WindowResult:
    """What the detector concluded about one window."""

    index: int
    n: int
    values: dict[str, float]  # reported values (psi, js, uncertain rate, estimated accuracy)
    limits: dict[str, float]  # the fire threshold in the same units as values
    statistics: dict[str, float]
    thresholds: Thresholds
    exceeded: list[str]  # statistic > fire threshold in this window
    in_alarm: list[str]  # metrics in alarm after this window (hysteresis state)
    severity: Severity | None
    alerts: list[DriftAlert] = field(default_factory=list)
    suppressed: bool = False  # an episode began inside the cooldown: no alert raised
    expected_accuracy: float = 0.0
    mean_confidence: float = 0.0
    truncated_rate: float = 0.0

    @property
    def alert(self) -> bool:
        """The stream is in a drift state at this window (some metric in alarm)."""
        return bool(self.in_alarm)


@dataclass
class _MetricState:
    warn_run: int = 0
    alarm: bool = False
    fired: bool = False  # entered alarm through the single-window fire threshold


class DriftDetector:
    """Hysteresis + cooldown state machine over consecutive windows of one model."""

    def __init__(self, manifest: ModelManifest, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        cfg = self.config
        self.manifest = manifest
        self.reference = Reference.from_manifest(manifest, cfg.threshold, cfg.max_psi_bins)
        self.estimator = AccuracyEstimator.for_reference(self.reference, cfg.estimator,
                                                         *estimator_parameters(manifest, cfg))
        self.calibrator = ThresholdCalibrator(
            self.reference, self.estimator, cfg.false_alarm_rate, cfg.warn_rate, cfg.clear_quantile,
            cfg.replicates, cfg.seed,
            floors={"psi_confidence": cfg.min_psi, "label_mix_js": cfg.min_js,
                    "uncertain_rate": cfg.min_uncertain_excess, "estimated_accuracy": cfg.min_accuracy_drop},
            reference_inflation=cfg.reference_inflation,
        )
        self._base = self.reference.summary()
        self.reset()

    def reset(self) -> None:
        """Forgets the history (new model, or a deliberate restart)."""
        self._state = {m: _MetricState() for m in METRICS}
        self._index = 0
        self._last_alert: int | None = None
        self._last_severity: Severity = "info"
        self._last_metrics: set[str] = set()
        self._episode_severity: Severity | None = None

    STATE_VERSION = 1

    def state_dict(self) -> dict[str, Any]:
        """The history that decides the next alert (hysteresis per metric, window index, cooldown, episode),
        as plain JSON values. ``load_state`` of it on a detector of the same manifest continues exactly here."""
        return {
            "v": self.STATE_VERSION, "reference_version": self.reference.version, "index": self._index,
            "metrics": {m: {"warn_run": st.warn_run, "alarm": st.alarm, "fired": st.fired}
                        for m, st in self._state.items()},
            "last_alert": self._last_alert, "last_severity": self._last_severity,
            "last_metrics": sorted(self._last_metrics), "episode_severity": self._episode_severity,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``. Raises ValueError on a state of another format or another reference, and
        then leaves the detector as it was."""
        if state.get("v") != self.STATE_VERSION:
            raise ValueError(f"detector state version {state.get('v')!r}, expected {self.STATE_VERSION}")
        if state.get("reference_version") != self.reference.version:
            raise ValueError(f"detector state of reference {state.get('reference_version')!r}, "
                             f"not {self.reference.version!r}")
        try:
            metrics = {m: _MetricState(warn_run=int(state["metrics"][m]["warn_run"]),
                                       alarm=bool(state["metrics"][m]["alarm"]),
                                       fired=bool(state["metrics"][m]["fired"])) for m in METRICS}
            index = int(state["index"])
            last_alert = None if state["last_alert"] is None else int(state["last_alert"])
            last_severity = state["last_severity"]
            episode = state["episode_severity"]
            if last_severity not in SEVERITY_RANK or (episode is not None and episode not in SEVERITY_RANK):
                raise ValueError(f"unknown severity in {last_severity!r}, {episode!r}")
            last_metrics = {str(m) for m in state["last_metrics"]}
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed detector state: {exc!r}") from exc
        self._state, self._index, self._last_alert = metrics, index, last_alert
        self._last_severity, self._last_metrics, self._episode_severity = last_severity, last_metrics, episode

    def evaluate(self, stats: WindowStats) -> tuple[dict[str, float], dict[str, float], float]:
        """(statistics, reported values, mean confidence) of one window, without touching the state."""
        self.reference.check_window(stats)
        window = WindowSummary.from_stats(stats, self.reference.labels)
        stat = {m: float(v) for m, v in statistics(window, self._base, self.reference, self.estimator).items()}
        n = max(stats.n, 1)
        est = float(self.estimator.estimate(window.hist.sum(axis=0), window.sum_conf, window.n, window.truncated))
        values = {
            "psi_confidence": stat["psi_confidence"], "label_mix_js": stat["label_mix_js"],
            "uncertain_rate": stats.uncertain_count / n, "estimated_accuracy": est,
        }
        return stat, values, stats.sum_confidence / n

    def limits(self, thresholds: Thresholds) -> dict[str, float]:
        """Fire thresholds in the units of the reported values (accuracy: the lower bound)."""
        ref_unc = float(self._base.uncertain / self._base.n)
        return {
            "psi_confidence": thresholds.fire["psi_confidence"], "label_mix_js": thresholds.fire["label_mix_js"],
            "uncertain_rate": ref_unc + thresholds.fire["uncertain_rate"],
            "estimated_accuracy": self.reference.expected_accuracy - thresholds.fire["estimated_accuracy"],
        }

    def update(self, stats: WindowStats) -> WindowResult:
        """Advances the state machine by one window and returns its verdict (with any new alerts)."""
        cfg = self.config
        stat, values, mean_conf = self.evaluate(stats)
        th = self.calibrator.thresholds(stats.n)
        entered: list[str] = []
        for m in METRICS:
            s, st = stat[m], self._state[m]
            st.warn_run = st.warn_run + 1 if s > th.warn[m] else 0
            if not st.alarm and (s > th.fire[m] or st.warn_run >= cfg.consecutive):
                st.alarm, st.fired = True, s > th.fire[m]
                entered.append(m)
            elif st.alarm and s <= th.clear[m]:
                st.alarm, st.fired, st.warn_run = False, False, 0
            elif st.alarm and s > th.fire[m]:
                st.fired = True
        in_alarm = [m for m in METRICS if self._state[m].alarm]
        severity = self._severity(stat, values, th, in_alarm)
        result = WindowResult(
            index=self._index, n=stats.n, values=values, limits=self.limits(th), statistics=stat, thresholds=th,
            exceeded=[m for m in METRICS if stat[m] > th.fire[m]], in_alarm=in_alarm, severity=severity,
            expected_accuracy=self.reference.expected_accuracy, mean_confidence=mean_conf,
            truncated_rate=stats.truncated_count / max(stats.n, 1),
        )
        self._raise_alerts(result, stats, entered)
        self._index += 1
        return result

    def _severity(self, stat: dict[str, float], values: dict[str, float], th: Thresholds,
                  in_alarm: list[str]) -> Severity | None:
        if not in_alarm:
            return None
        cfg = self.config
        drop = self.reference.expected_accuracy - values["estimated_accuracy"]
        # PSI alone is critical only well above its own noise: on a small window 0.25 can be chance.
        psi_critical = max(cfg.critical_psi, 2 * th.fire["psi_confidence"])
        if ("estimated_accuracy" in in_alarm and drop >= cfg.critical_accuracy_drop) or (
                "psi_confidence" in in_alarm and values["psi_confidence"] >= psi_critical):
            return "critical"
        if any(self._state[m].fired for m in in_alarm):
            return "warning"
        return "info"

    def _raise_alerts(self, result: WindowResult, stats: WindowStats, entered: list[str]) -> None:
        severity = result.severity
        if severity is None:
            self._episode_severity = None  # episode over
            return
        if self._episode_severity is None:  # a new episode
            self._episode_severity = severity
            # Cooldown against flapping: the same metrics re-entering alarm soon after an alert, at no higher
            # severity, are the same drift. A more severe episode, or one that brings new metrics into
            # alarm (a real shift right after a false alarm), still alerts.
            recent = self._last_alert is not None and result.index - self._last_alert <= self.config.cooldown_windows
            same = set(entered or result.in_alarm) <= self._last_metrics
            if recent and same and SEVERITY_RANK[severity] <= SEVERITY_RANK[self._last_severity]:
                result.suppressed = True
                return
            escalation = False
        elif SEVERITY_RANK[severity] > SEVERITY_RANK[self._episode_severity]:
            self._episode_severity = severity
            escalation = True
        else:
            return
        candidates = entered or result.in_alarm
        primary = max(candidates, key=lambda m: result.statistics[m] / max(result.thresholds.fire[m], 1e-12))
        result.alerts.append(self._alert(result, stats, primary, severity, escalation))
        self._last_alert, self._last_severity = result.index, severity
        self._last_metrics = set(result.in_alarm)

    def _alert(self, result: WindowResult, stats: WindowStats, metric: MetricName | str, severity: Severity,
               escalation: bool) -> DriftAlert:
        ref = self.reference
        details = {
            "window_index": result.index, "escalation": escalation, "in_alarm": result.in_alarm,
            "exceeded": result.exceeded, "values": result.values, "limits": result.limits,
            "statistics": result.statistics, "fire": result.thresholds.fire, "warn": result.thresholds.warn,
            "threshold_n": result.thresholds.n, "false_alarm_rate": self.config.false_alarm_rate,
            "expected_accuracy": ref.expected_accuracy, "estimated_accuracy": result.values["estimated_accuracy"],
            "direction": "below" if metric == "estimated_accuracy" else "above",
            "text_length_p50": stats.text_length_quantiles.get("p50"), "reference_text_length_p50": ref.text_length_p50,
            "reference_version": ref.version,
        }
        return DriftAlert(
            alert_id=str(uuid.uuid4()), metric=metric, value=float(result.values[metric]),  # type: ignore[arg-type]
            threshold=float(result.limits[metric]), severity=severity,
            window=DriftWindow(start=stats.window_start, end=stats.window_end, n=stats.n), model=stats.model,
            details=details,
        )
