"""Numerics that must agree in every process: the softmax, the confidence bins and the UNCERTAIN rule.

A probability the worker serves, the reference the trainer measures and the histogram the drift monitor
compares are all built here, so they cannot drift apart.

Why not ``scipy.special.softmax``: the worker's runtime depends on numpy and onnxruntime only (no scipy, about
35 MB more in every worker image) for a five-line function; training, which has scipy, uses this one too so
served and measured probabilities are computed identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from schemas import UNCERTAIN

# Confidence histogram edges of the manifest reference and of every window (0..1 in steps of 0.025).
BIN_EDGES: tuple[float, ...] = tuple(round(float(x), 4) for x in np.linspace(0.0, 1.0, 41))


def softmax(logits: np.ndarray, temperature: float = 1.0, dtype: type = np.float64) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, computed in float64 and returned as ``dtype``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(dtype, copy=False)


def confidence_bins(confidences: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of every confidence, with ``numpy.histogram`` semantics (last bin closed, clipped)."""
    idx = np.searchsorted(edges, confidences, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


def decide_batch(probabilities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The UNCERTAIN rule for rows of calibrated probabilities: (argmax index, its probability, uncertain).

    A row is UNCERTAIN when its top probability is below ``threshold``; the argmax is kept either way.
    """
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(probabilities)), predicted]
    return predicted, confidence, confidence < threshold


def decide(probabilities: np.ndarray, labels: Sequence[str], threshold: float) -> tuple[str, str, float]:
    """``decide_batch`` for one row, as (label, predicted_label, confidence) with UNCERTAIN as the label."""
    predicted, confidence, uncertain = decide_batch(np.asarray(probabilities)[None, :], threshold)
    name = labels[int(predicted[0])]
    return (UNCERTAIN if uncertain[0] else name), name, float(confidence[0])
