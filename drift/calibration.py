"""Thresholds for the drift statistics, from a bootstrap of the null distribution.

Contract: ``ThresholdCalibrator.thresholds(n)`` bootstraps the null distribution of the four statistics for a
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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from drift.reference import METRICS, AccuracyEstimator, Reference, WindowSummary, statistics


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


