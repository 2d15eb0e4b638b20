"""Calibration: temperature scaling on dev, ECE, reliability diagrams, and the drift reference.

Contract:
  * ``fit_temperature(logits, labels)`` returns T > 0 minimising dev NLL of ``softmax(logits / T)``
    (one parameter, so accuracy and the argmax never change).
  * ``ece`` is the expected calibration error of the max-probability with equal-width bins.
  * ``confidence_reference`` builds the manifest's ``ConfidenceReference`` from *calibrated* dev
    probabilities of the shipped (INT8) model; bin edges are ``runtime.numeric.BIN_EDGES`` (41 edges, 0..1 in
    steps of 0.025) for every model, so references of binary and 3-class models are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar

from runtime.numeric import BIN_EDGES, softmax
from schemas import ConfidenceReference


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the gold labels at ``temperature``."""
    p = softmax(logits, temperature)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean())


def fit_temperature(logits: np.ndarray, labels: Sequence[int], lo: float = 0.05, hi: float = 20.0) -> float:
    """Temperature minimising dev NLL: bounded Brent search on log T (NLL is unimodal in T)."""
    y = np.asarray(labels)
    found = minimize_scalar(lambda log_t: nll(logits, y, float(np.exp(log_t))), bounds=(np.log(lo), np.log(hi)),
                            method="bounded", options={"xatol": 1e-6})
    return float(np.exp(found.x))


def ece(probs: np.ndarray, labels: Sequence[int], n_bins: int = 15) -> float:
    """Expected calibration error of the max probability (equal-width bins on [0, 1])."""
    y = np.asarray(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray, labels: Sequence[int], path: Path,
                        title: str = "Reliability", n_bins: int = 15) -> Path:
    """PNG: accuracy per confidence bin before and after temperature scaling, against the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for probs, name in ((probs_before, "T=1"), (probs_after, "calibrated")):
        conf = probs.max(axis=1)
        correct = probs.argmax(axis=1) == y
        idx = np.clip(np.digitize(conf, edges[1:-1]), 0, n_bins - 1)
        xs, ys = [], []
        for b in range(n_bins):
            sel = idx == b
            if sel.sum() >= 5:
                xs.append(centres[b])
                ys.append(correct[sel].mean())
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {ece(probs, y, n_bins):.3f})")
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confidence_reference(probs: np.ndarray, gold: Sequence[int] | None, labels: Sequence[str], threshold: float,
                         texts: Sequence[str]) -> ConfidenceReference:
    """The drift monitor's reference from calibrated probabilities on the selection split.

    ``gold=None`` (no labels, e.g. generated sentences) gives ``expected_accuracy`` = mean confidence.
    """
    edges = np.asarray(BIN_EDGES)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    hist = {}
    for i, label in enumerate(labels):
        counts, _ = np.histogram(conf[pred == i], bins=edges)
        hist[label] = [int(c) for c in counts]
    mix = {label: float((pred == i).mean()) for i, label in enumerate(labels)}
    accuracy = float((pred == np.asarray(gold)).mean()) if gold is not None else float(conf.mean())
    return ConfidenceReference(
        bin_edges=[float(e) for e in edges], confidence_hist=hist, label_mix=mix,
        uncertain_rate=float((conf < threshold).mean()), expected_accuracy=accuracy,
        mean_confidence=float(conf.mean()), n=len(conf),
        samples=[(int(p), round(float(c), 6)) for p, c in zip(pred, conf, strict=True)],
        text_lengths=[len(t) for t in texts],
    )
