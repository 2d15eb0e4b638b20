"""Divergences between two histograms, smoothed so an empty bin on one side stays finite.

``psi`` (population stability index) and ``js_divergence`` (Jensen-Shannon, base 2, in [0, 1]) compare
count vectors row by row; ``equal_mass_groups`` merges fine confidence bins into coarse groups of about
equal reference mass, so PSI is not dominated by nearly empty bins.
"""

from __future__ import annotations

import numpy as np

SMOOTHING = 0.5  # pseudo-count per bin: keeps PSI / JS finite when a bin is empty on one side

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


