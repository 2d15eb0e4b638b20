"""The reference a window is compared with, and the label-free accuracy estimate.

Contract:
  * ``Reference.from_manifest(manifest)`` turns the manifest's ``ConfidenceReference`` (measured on the
    dev split) into numeric arrays: reference "cells" (label × confidence bin × UNCERTAIN flag) with
    their counts and mean confidence, coarse PSI bins, and the accuracy estimator's constants.
  * ``WindowSummary`` holds one window's statistics in the reference's cells, and ``statistics`` computes the
    four test statistics per window, larger = more drift:
      - ``psi_confidence``: PSI of the pooled max-probability histogram (coarse, equal-mass bins of the
        reference; additive smoothing 0.5 so empty bins are finite);
      - ``label_mix_js``: Jensen-Shannon divergence (base 2, in [0, 1]) of the predicted-label mix;
      - ``uncertain_rate``: window UNCERTAIN rate minus the reference's (one-sided: more uncertainty);
      - ``estimated_accuracy``: reference accuracy minus the window's label-free accuracy estimate
        (one-sided: a drop). See ``AccuracyEstimator`` for the estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from drift.divergence import equal_mass_groups, js_divergence, psi
from runtime.errors import UserError
from runtime.numeric import confidence_bins
from schemas import ModelManifest, WindowStats

MetricName = Literal["psi_confidence", "label_mix_js", "uncertain_rate", "estimated_accuracy"]
METRICS: tuple[MetricName, ...] = ("psi_confidence", "label_mix_js", "uncertain_rate", "estimated_accuracy")
# Label-free accuracy estimate (see AccuracyEstimator) for packages without a ``drift_estimator`` entry: the fit
# of the first sentiment-en package on nine shifted sets (drift/README.md); `sentiment drift-fit` fits a package.
DEFAULT_ATC_WEIGHT = 0.0
DEFAULT_SHIFT_SLOPE = 1.5
DEFAULT_TRUNCATION_PENALTY = 0.06


class DriftConfigError(UserError, ValueError):
    """The manifest has no usable reference, or the window does not match it (labels, bin edges)."""


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
        about that beginning as about a whole sentence). See drift/README.md. ``shift_slope = 1``,
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


