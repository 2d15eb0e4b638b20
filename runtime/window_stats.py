"""How a window of predictions becomes ``WindowStats``, and how windows add up. Pure numpy, no state.

Contract:
  * ``summarize_window`` turns one window's per-record arrays (predicted label index, confidence, UNCERTAIN
    flag, text length, truncated flag) into ``WindowStats``. Confidence bins are half-open ``[e_i, e_{i+1})``
    with the last bin closed, exactly as ``numpy.histogram`` (which builds the manifest reference), so live and
    reference histograms agree. The worker's ``WindowAccumulator`` and the offline ``drift-check`` /
    ``drift-fit`` both call it, so a replayed window has exactly the statistics the monitor sees live.
  * ``merge_window_stats`` sums several workers' windows of one model into one window.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from runtime.errors import SentimentError
from runtime.numeric import BIN_EDGES, confidence_bins
from schemas import ModelManifest, ModelRef, WindowStats

QUANTILES: tuple[tuple[str, float], ...] = (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))


class StatsMergeError(SentimentError, ValueError):
    """The windows cannot be merged: different models, labels or bin edges, or nothing to merge."""


def to_datetime(ts: float) -> datetime:
    """Epoch seconds → aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


def window_edges(manifest: ModelManifest) -> np.ndarray:
    """The bin edges a model's windows use: its reference's, so the monitor can compare; else ``BIN_EDGES``."""
    edges = manifest.reference.bin_edges if manifest.reference is not None else BIN_EDGES
    return np.asarray(edges, dtype=np.float64)


def summarize_window(model: ModelRef, labels: Sequence[str], edges: np.ndarray, pred: np.ndarray, conf: np.ndarray,
                     uncertain: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, *, start: float, end: float,
                     worker_id: str) -> WindowStats:
    """One window's ``WindowStats`` from equal-length per-record arrays (one ``bincount``, no Python loop)."""
    bins = len(edges) - 1
    flat = np.asarray(pred, dtype=np.int64) * bins + confidence_bins(np.asarray(conf, dtype=np.float64), edges)
    hist = np.bincount(flat, minlength=len(labels) * bins).reshape(len(labels), bins)
    return WindowStats(
        worker_id=worker_id, model=model, window_start=to_datetime(start), window_end=to_datetime(end),
        n=len(pred), bin_edges=[float(e) for e in edges],
        confidence_hist={label: [int(c) for c in hist[i]] for i, label in enumerate(labels)},
        label_counts={label: int(hist[i].sum()) for i, label in enumerate(labels)},
        uncertain_count=int(np.count_nonzero(uncertain)), sum_confidence=float(np.sum(conf, dtype=np.float64)),
        text_length_quantiles=length_quantiles(np.asarray(lengths)),
        truncated_count=int(np.count_nonzero(truncated)),
    )


def length_quantiles(lengths: np.ndarray) -> dict[str, float]:
    """p10/p50/p90 of text lengths (0.0 for an empty window)."""
    if len(lengths) == 0:
        return {name: 0.0 for name, _ in QUANTILES}
    values = np.quantile(lengths, [q for _, q in QUANTILES])
    return {name: float(v) for (name, _), v in zip(QUANTILES, values, strict=True)}


def merge_window_stats(stats: Sequence[WindowStats], worker_id: str = "merged") -> WindowStats:
    """Sums windows of one model (several workers, or consecutive windows) into one.

    Counts, histograms and sums add exactly. Text-length quantiles cannot be merged exactly from
    quantiles; they are the n-weighted mean of the inputs' quantiles (a fair summary for a dashboard,
    not a test statistic). Raises StatsMergeError on an empty input or mismatched models / bin edges.
    """
    if not stats:
        raise StatsMergeError("nothing to merge")
    first = stats[0]
    labels = list(first.confidence_hist)
    for s in stats[1:]:
        if s.model.version != first.model.version or s.model.name != first.model.name:
            raise StatsMergeError(f"model mismatch: {first.model.version} vs {s.model.version}")
        if s.bin_edges != first.bin_edges:
            raise StatsMergeError("bin edges differ")
        if sorted(s.confidence_hist) != sorted(labels):
            raise StatsMergeError("labels differ")
    n = sum(s.n for s in stats)
    hist = {label: np.sum([s.confidence_hist[label] for s in stats], axis=0) for label in labels}
    weights = np.array([s.n for s in stats], dtype=np.float64)
    quantiles = {
        name: float(np.average([s.text_length_quantiles.get(name, 0.0) for s in stats],
                               weights=weights if weights.sum() else None))
        for name, _ in QUANTILES
    }
    return WindowStats(
        worker_id=worker_id, model=first.model,
        window_start=min(s.window_start for s in stats), window_end=max(s.window_end for s in stats), n=n,
        bin_edges=list(first.bin_edges),
        confidence_hist={label: [int(c) for c in counts] for label, counts in hist.items()},
        label_counts={label: sum(s.label_counts.get(label, 0) for s in stats) for label in labels},
        uncertain_count=sum(s.uncertain_count for s in stats),
        sum_confidence=float(sum(s.sum_confidence for s in stats)), text_length_quantiles=quantiles,
        truncated_count=sum(s.truncated_count for s in stats),
    )
