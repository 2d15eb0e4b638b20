"""Drift detection on confidence statistics: pure logic, no Kafka, no model runtime.

Contract:
  * ``Reference.from_manifest(manifest)`` turns the manifest's ``ConfidenceReference`` (measured on the
    dev split) into numeric arrays: reference "cells" (label × confidence bin × UNCERTAIN flag) with
    their counts and mean confidence, coarse PSI bins, and the accuracy estimator's constants.
  * Four test statistics per window, larger = more drift:
      - ``psi_confidence``: PSI of the pooled max-probability histogram (coarse, equal-mass bins of the
        reference; additive smoothing 0.5 so empty bins are finite);
      - ``label_mix_js``: Jensen-Shannon divergence (base 2, in [0, 1]) of the predicted-label mix;
      - ``uncertain_rate``: window UNCERTAIN rate minus the reference's (one-sided: more uncertainty);
      - ``estimated_accuracy``: reference accuracy minus the window's label-free accuracy estimate
        (one-sided: a drop). See ``AccuracyEstimator`` for the estimate.
  * ``ThresholdCalibrator.thresholds(n)`` bootstraps the null distribution of the four statistics for a
    window of ``n`` records compared with the *fixed* reference, the way the live test runs. Each replicate
    draws a plausible in-domain distribution from the reference (Bayesian bootstrap: Dirichlet over the
    reference cells) and then a window of n from it (multinomial). Drawing the distribution, not just the
    window, accounts for the reference being a finite sample (a one-sample bootstrap under-states the null
    spread once n is comparable with the reference size, and for rare events such as UNCERTAIN at any n);
    "virtual" UNCERTAIN cells with a Jeffreys pseudo-count of 0.5 per label keep a reference with zero or
    few UNCERTAIN examples from making a single UNCERTAIN window an alarm. One per-test level is then chosen
    so that the *family-wise* rate of "any statistic over its threshold" is the stated false-alarm rate (a
    Westfall-Young style min-p adjustment, which accounts for the tests' correlation). Results are cached
    per n (n above 100 is rounded down to a 5 % geometric grid: a smaller n is conservative).
  * ``DriftDetector.update(stats)`` runs the state machine over consecutive windows: a metric enters
    alarm on one window above its ``fire`` threshold or on ``consecutive`` windows above its ``warn``
    threshold, and leaves alarm only at or below its ``clear`` level (hysteresis). Thresholds never go
    below a minimum effect size (``DetectorConfig.min_*``). An episode lasts while any metric is in
    alarm; it raises one ``DriftAlert`` when it starts (plus one per severity escalation). A new episode
    within ``cooldown_windows`` of the last alert raises none if it is no more severe and involves only
    metrics that were in alarm at that alert (flapping); otherwise it alerts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from schemas import DriftAlert, ModelManifest, WindowStats
from schemas.events import DriftWindow
from worker.window_stats import confidence_bins

MetricName = Literal["psi_confidence", "label_mix_js", "uncertain_rate", "estimated_accuracy"]
Severity = Literal["info", "warning", "critical"]
METRICS: tuple[MetricName, ...] = ("psi_confidence", "label_mix_js", "uncertain_rate", "estimated_accuracy")
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
# Label-free accuracy estimate (see AccuracyEstimator) for packages without a ``drift_estimator`` entry: the fit
# of the first sentiment-en package on nine shifted sets (worker/DRIFT.md); `sentiment drift-fit` fits a package.
DEFAULT_ATC_WEIGHT = 0.0
DEFAULT_SHIFT_SLOPE = 1.5
DEFAULT_TRUNCATION_PENALTY = 0.06
SMOOTHING = 0.5  # pseudo-count per bin: keeps PSI / JS finite when a bin is empty on one side


class DriftConfigError(ValueError):
    """The manifest has no usable reference, or the window does not match it (labels, bin edges)."""


# ------------------------------------------------------------------------------------------- divergences


def _smoothed(counts: np.ndarray, smoothing: float) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64) + smoothing
    return counts / counts.sum(axis=-1, keepdims=True)


def psi(expected_counts: np.ndarray, actual_counts: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Population stability index sum((a - e) * ln(a / e)) over the last axis, after additive smoothing.

    Broadcasts over leading axes (one row per bootstrap replicate). Zero iff the smoothed
    distributions are equal; symmetric in its arguments.
    """
    e = _smoothed(expected_counts, smoothing)
    a = _smoothed(actual_counts, smoothing)
    return np.sum((a - e) * np.log(a / e), axis=-1)


def _kl_bits(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """KL(p || m) in bits with 0 log 0 = 0 (m > 0 wherever p > 0 when m is a mixture containing p)."""
    safe = np.where(p > 0, p, 1.0)
    return np.sum(np.where(p > 0, p * np.log2(safe / np.where(m > 0, m, 1.0)), 0.0), axis=-1)


def js_divergence(p_counts: np.ndarray, q_counts: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint) over the last axis."""
    p = _smoothed(p_counts, smoothing)
    q = _smoothed(q_counts, smoothing)
    m = (p + q) / 2
    return 0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m)


# ------------------------------------------------------------------------------------------- reference


def equal_mass_groups(pooled: np.ndarray, max_groups: int) -> np.ndarray:
    """Maps each fine bin to a coarse group so that every group holds >= 1/max_groups of the mass.

    Groups are runs of adjacent fine bins, built from the top (high confidence, where the mass is) down;
    a light remainder at the bottom joins the group above it. Returns group index per fine bin.
    """
    total = float(pooled.sum())
    target = total / max_groups if total > 0 else 1.0
    groups = np.zeros(len(pooled), dtype=np.int64)
    group, mass = 0, 0.0
    for i in range(len(pooled) - 1, -1, -1):  # 40 bins, once per reference: a loop is clearest
        groups[i] = group
        mass += float(pooled[i])
        if mass >= target and i > 0:
            group, mass = group + 1, 0.0
    if mass < target and group > 0:  # bottom remainder too light: merge it upward
        groups[groups == group] = group - 1
    # Renumber bottom-up so group 0 is the lowest confidence.
    return groups.max() - groups


@dataclass(frozen=True)
class Reference:
    """The manifest reference as arrays. Cells are unique (label, fine bin, uncertain) triples."""

    labels: tuple[str, ...]
    edges: np.ndarray
    cell_hist_index: np.ndarray  # (C,) flat index label * bins + bin
    cell_uncertain: np.ndarray  # (C,) bool
    cell_count: np.ndarray  # (C,) reference examples per cell (0 for virtual cells)
    cell_prior: np.ndarray  # (C,) Dirichlet parameter of the Bayesian bootstrap
    cell_conf: np.ndarray  # (C,) mean calibrated max-probability per cell
    groups: np.ndarray  # (bins,) fine bin → coarse PSI group
    expected_accuracy: float
    mean_confidence: float
    threshold: float
    text_length_p50: float | None
    name: str = ""
    version: str = ""

    @property
    def n(self) -> int:
        return int(self.cell_count.sum())

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    @property
    def hist(self) -> np.ndarray:
        """(labels, bins) reference counts."""
        flat = np.bincount(self.cell_hist_index, weights=self.cell_count, minlength=len(self.labels) * self.bins)
        return flat.reshape(len(self.labels), self.bins)

    @classmethod
    def from_manifest(cls, manifest: ModelManifest, threshold: float | None = None,
                      max_groups: int = 10) -> Reference:
        """Builds the reference; ``threshold`` overrides the manifest's UNCERTAIN threshold."""
        ref = manifest.reference
        if ref is None or ref.n <= 0:
            raise DriftConfigError(f"{manifest.name} {manifest.version}: manifest has no drift reference")
        labels = tuple(manifest.labels)
        edges = np.asarray(ref.bin_edges, dtype=np.float64)
        thr = manifest.threshold if threshold is None else threshold
        bins = len(edges) - 1
        if ref.samples:
            arr = np.asarray(ref.samples, dtype=np.float64)
            pred, conf = arr[:, 0].astype(np.int64), arr[:, 1]
        else:  # older manifests: only the histogram; use bin midpoints as the samples' confidence
            mids = (edges[:-1] + edges[1:]) / 2
            counts = np.array([ref.confidence_hist[label] for label in labels], dtype=np.int64)
            pred = np.repeat(np.repeat(np.arange(len(labels)), bins), counts.ravel())
            conf = np.repeat(np.tile(mids, len(labels)), counts.ravel())
        flat = pred * bins + confidence_bins(conf, edges)
        key = flat * 2 + (conf < thr)
        uniq, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=conf)
        cell_conf = sums / counts
        prior = counts.astype(np.float64)
        floor = 1.0 / len(labels)  # the lowest possible max-probability
        if thr > floor + 1e-6:  # UNCERTAIN is possible: make sure every label has an uncertain cell
            virtual_conf = max(thr - 1e-6, floor)
            for i in range(len(labels)):
                vkey = (i * bins + int(confidence_bins(np.array([virtual_conf]), edges)[0])) * 2 + 1
                if vkey not in uniq:
                    uniq, counts = np.append(uniq, vkey), np.append(counts, 0)
                    cell_conf, prior = np.append(cell_conf, virtual_conf), np.append(prior, 0.5)
        pooled = np.bincount(confidence_bins(conf, edges), minlength=bins).astype(np.float64)
        lengths = np.asarray(ref.text_lengths, dtype=np.float64)
        return cls(
            labels=labels, edges=edges, cell_hist_index=uniq // 2, cell_uncertain=(uniq % 2).astype(bool),
            cell_count=counts.astype(np.float64), cell_prior=prior, cell_conf=cell_conf,
            groups=equal_mass_groups(pooled, max_groups),
            expected_accuracy=float(ref.expected_accuracy), mean_confidence=float(conf.mean()), threshold=float(thr),
            text_length_p50=float(np.median(lengths)) if len(lengths) else None,
            name=manifest.name, version=manifest.version,
        )

    def summary(self) -> WindowSummary:
        """The reference itself as a window summary (the base every live window is compared with)."""
        return WindowSummary(hist=self.hist, uncertain=np.asarray(float(self.cell_count @ self.cell_uncertain)),
                             sum_conf=np.asarray(float(self.cell_count @ self.cell_conf)),
                             n=np.asarray(float(self.n)))

    def check_window(self, stats: WindowStats) -> None:
        """Raises DriftConfigError when the window's labels or bin edges differ from the reference's."""
        if set(stats.confidence_hist) != set(self.labels):
            raise DriftConfigError(f"window labels {sorted(stats.confidence_hist)} != reference {list(self.labels)}")
        if len(stats.bin_edges) != len(self.edges) or not np.allclose(stats.bin_edges, self.edges):
            raise DriftConfigError("window bin edges differ from the reference's")


# -------------------------------------------------------------------------------------- accuracy estimate


@dataclass(frozen=True)
class AccuracyEstimator:
    """Label-free accuracy estimate of a window from its confidence histogram and confidence sum.

    ``method``:
      * ``"cbpe"``: mean calibrated max-probability (NannyML's CBPE for a classifier's accuracy), plus the
        reference's gap (expected_accuracy - mean_confidence), so it returns exactly the measured
        accuracy on the reference itself.
      * ``"atc"``: average thresholded confidence (Garg et al., ICLR 2022): the fraction of the window
        whose confidence exceeds t*, where t* is set on the reference so that this fraction equals the
        measured reference accuracy. The histogram is interpolated linearly inside a bin.
      * ``"blend"``: ``atc_weight`` × atc + (1 − atc_weight) × cbpe, then the drop below the reference
        is scaled by ``shift_slope`` (measured: under domain shift accuracy falls faster than confidence),
        and ``truncation_penalty`` × (fraction of the window cut to max_length) is subtracted (measured:
        a text cut before inference is classified from its beginning only, and the model is as confident
        about that beginning as about a whole sentence). See worker/DRIFT.md. ``shift_slope = 1``,
        ``atc_weight = 0`` and no penalty is plain offset CBPE.
    The estimate is linear in the histogram, so it vectorises over bootstrap replicates.
    """

    method: Literal["cbpe", "atc", "blend"]
    expected_accuracy: float
    mean_confidence: float
    atc_weights: np.ndarray  # (bins,) per fine bin: fraction of the bin above t*
    atc_weight: float = DEFAULT_ATC_WEIGHT
    shift_slope: float = DEFAULT_SHIFT_SLOPE
    truncation_penalty: float = DEFAULT_TRUNCATION_PENALTY

    @classmethod
    def for_reference(cls, ref: Reference, method: Literal["cbpe", "atc", "blend"] = "blend",
                      atc_weight: float = DEFAULT_ATC_WEIGHT, shift_slope: float = DEFAULT_SHIFT_SLOPE,
                      truncation_penalty: float = DEFAULT_TRUNCATION_PENALTY) -> AccuracyEstimator:
        pooled = ref.hist.sum(axis=0)
        t_star = _atc_threshold(pooled, ref.edges, ref.expected_accuracy)
        return cls(method=method, expected_accuracy=ref.expected_accuracy, mean_confidence=ref.mean_confidence,
                   atc_weights=_fraction_above(ref.edges, t_star), atc_weight=atc_weight, shift_slope=shift_slope,
                   truncation_penalty=truncation_penalty)

    def estimate(self, pooled_hist: np.ndarray, sum_conf: np.ndarray, n: np.ndarray,
                 truncated: np.ndarray | float = 0.0) -> np.ndarray:
        """Accuracy estimate per row; ``pooled_hist`` is (..., bins) counts over all labels, ``truncated``
        the count of texts cut to max_length (the reference split is assumed to have none)."""
        n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
        cbpe = np.asarray(sum_conf, dtype=np.float64) / n + (self.expected_accuracy - self.mean_confidence)
        atc = (np.asarray(pooled_hist, dtype=np.float64) @ self.atc_weights) / n
        if self.method == "cbpe":
            raw = cbpe
        elif self.method == "atc":
            raw = atc
        else:
            raw = self.atc_weight * atc + (1 - self.atc_weight) * cbpe
        if self.method == "blend":
            raw = self.expected_accuracy - self.shift_slope * (self.expected_accuracy - raw)
            raw = raw - self.truncation_penalty * np.asarray(truncated, dtype=np.float64) / n
        return np.clip(raw, 0.0, 1.0)


def _fraction_above(edges: np.ndarray, t: float) -> np.ndarray:
    """Per bin, the fraction of a uniformly filled bin that lies above t."""
    return np.clip((edges[1:] - t) / np.diff(edges), 0.0, 1.0)


def _atc_threshold(pooled: np.ndarray, edges: np.ndarray, accuracy: float) -> float:
    """t* with (interpolated) fraction of reference confidences above t* equal to ``accuracy``."""
    total = pooled.sum()
    lo, hi = float(edges[0]), float(edges[-1])
    for _ in range(60):  # bisection: the fraction above t is monotone in t
        mid = (lo + hi) / 2
        if (pooled @ _fraction_above(edges, mid)) / total > accuracy:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class WindowSummary:
    """A window (or a batch of bootstrap windows) reduced to what the statistics need."""

    hist: np.ndarray  # (..., labels, bins)
    uncertain: np.ndarray  # (...,)
    sum_conf: np.ndarray  # (...,)
    n: np.ndarray  # (...,)
    truncated: np.ndarray | float = 0.0  # (...,) texts cut to max_length

    @classmethod
    def from_stats(cls, stats: WindowStats, labels: Sequence[str]) -> WindowSummary:
        hist = np.array([stats.confidence_hist[label] for label in labels], dtype=np.float64)
        return cls(hist=hist, uncertain=np.asarray(float(stats.uncertain_count)),
                   sum_conf=np.asarray(stats.sum_confidence), n=np.asarray(float(stats.n)),
                   truncated=np.asarray(float(stats.truncated_count)))

    @classmethod
    def from_cells(cls, ref: Reference, cell_counts: np.ndarray) -> WindowSummary:
        """Windows given as counts per reference cell, shape (B, C)."""
        size = len(ref.labels) * ref.bins
        onehot = np.zeros((len(ref.cell_count), size))
        onehot[np.arange(len(ref.cell_count)), ref.cell_hist_index] = 1.0
        counts = cell_counts.astype(np.float64)
        return cls(hist=(counts @ onehot).reshape(-1, len(ref.labels), ref.bins),
                   uncertain=counts @ ref.cell_uncertain.astype(np.float64), sum_conf=counts @ ref.cell_conf,
                   n=counts.sum(axis=1))

    def coarse(self, groups: np.ndarray) -> np.ndarray:
        pooled = self.hist.sum(axis=-2)
        onehot = np.zeros((len(groups), int(groups.max()) + 1))
        onehot[np.arange(len(groups)), groups] = 1.0
        return pooled @ onehot


def statistics(window: WindowSummary, base: WindowSummary, ref: Reference,
               estimator: AccuracyEstimator) -> dict[str, np.ndarray]:
    """The four test statistics of ``window`` against ``base`` (the reference, or a resample of it)."""
    n = np.maximum(window.n, 1.0)
    base_n = np.maximum(base.n, 1.0)
    return {
        "psi_confidence": psi(base.coarse(ref.groups), window.coarse(ref.groups)),
        "label_mix_js": js_divergence(base.hist.sum(axis=-1), window.hist.sum(axis=-1)),
        "uncertain_rate": window.uncertain / n - base.uncertain / base_n,
        "estimated_accuracy": (estimator.estimate(base.hist.sum(axis=-2), base.sum_conf, base.n, base.truncated)
                               - estimator.estimate(window.hist.sum(axis=-2), window.sum_conf, window.n,
                                                    window.truncated)),
    }


# ---------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class Thresholds:
    """Per metric, in statistic space (larger = more drift): fire > warn > clear."""

    n: int
    fire: dict[str, float]
    warn: dict[str, float]
    clear: dict[str, float]
    level_fire: float  # the per-test level that gives the family-wise rate
    level_warn: float


def grid_n(n: int) -> int:
    """n itself up to 100, above that the largest point <= n of a 5 % geometric grid (cache key)."""
    if n <= 100:
        return max(int(n), 1)
    k = int(np.floor(np.log(n / 100) / np.log(1.05) + 1e-9))
    return int(np.floor(100 * 1.05**k))


def _familywise_thresholds(samples: np.ndarray, target: float) -> tuple[np.ndarray, float]:
    """Per-column thresholds at a common level with P(any column > its threshold) ≈ target (<= target).

    ``samples`` is (B, M). Bisection on the per-test level between target / M (Bonferroni) and target.
    """
    def at(level: float) -> np.ndarray:
        return np.quantile(samples, 1.0 - level, axis=0, method="higher")

    lo, hi = target / samples.shape[1], target
    for _ in range(30):
        mid = np.sqrt(lo * hi)
        if np.mean(np.any(samples > at(mid), axis=1)) <= target:
            lo = mid
        else:
            hi = mid
    return at(lo), lo


class ThresholdCalibrator:
    """Bootstrap thresholds per window size for a stated family-wise false-alarm rate per window."""

    def __init__(self, ref: Reference, estimator: AccuracyEstimator, false_alarm_rate: float = 0.003,
                 warn_rate: float = 0.03, clear_quantile: float = 0.8, replicates: int = 20000,
                 seed: int = 0, metrics: Sequence[str] = METRICS, floors: dict[str, float] | None = None,
                 reference_inflation: float = 1.0) -> None:
        if not 0 < false_alarm_rate < warn_rate < 1:
            raise ValueError("need 0 < false_alarm_rate < warn_rate < 1")
        self.ref = ref
        self.estimator = estimator
        self.false_alarm_rate = false_alarm_rate
        self.warn_rate = warn_rate
        self.clear_quantile = clear_quantile
        self.replicates = replicates
        self.seed = seed
        self.metrics = tuple(metrics)
        self.floors = dict(floors or {})
        self.reference_inflation = reference_inflation
        self._cached = lru_cache(maxsize=256)(self._compute)

    def thresholds(self, n: int) -> Thresholds:
        return self._cached(grid_n(n))

    def null_samples(self, n: int) -> np.ndarray:
        """(replicates, metrics) null statistics of windows of n against the fixed reference."""
        ref = self.ref
        rng = np.random.default_rng([self.seed, n])
        base = ref.summary()
        out = []
        # Chunks bound memory (replicates × cells floats) whatever the replicate count.
        for start in range(0, self.replicates, 5000):
            size = min(5000, self.replicates - start)
            dist = rng.dirichlet(np.maximum(ref.cell_prior / self.reference_inflation, 1e-3), size=size)
            window = WindowSummary.from_cells(ref, rng.multinomial(n, dist))
            stats = statistics(window, base, ref, self.estimator)
            out.append(np.stack([stats[m] for m in self.metrics], axis=1))
        return np.concatenate(out)

    def _compute(self, n: int) -> Thresholds:
        samples = self.null_samples(n)
        fire, level_fire = _familywise_thresholds(samples, self.false_alarm_rate)
        warn, level_warn = _familywise_thresholds(samples, self.warn_rate)
        clear = np.quantile(samples, self.clear_quantile, axis=0)
        # Minimum effect sizes: at large n the bootstrap thresholds become tiny, and a stream that differs
        # from the finite reference by the reference's own sampling error would alarm for ever.
        floor = np.array([self.floors.get(m, 0.0) for m in self.metrics])
        fire, warn = np.maximum(fire, floor), np.maximum(warn, floor)
        names = self.metrics
        return Thresholds(
            n=n, fire=dict(zip(names, map(float, fire), strict=True)),
            warn=dict(zip(names, map(float, warn), strict=True)),
            clear={m: float(min(c, w)) for m, c, w in zip(names, clear, warn, strict=True)},
            level_fire=level_fire, level_warn=level_warn,
        )


# ---------------------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class DetectorConfig:
    """Knobs of the detector; the defaults are the ones measured in worker/DRIFT.md."""

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
    sentiment-en package (worker/DRIFT.md).
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
