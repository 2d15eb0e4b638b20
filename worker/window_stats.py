"""Per-worker window statistics for the drift monitor: accumulate per batch, emit ``WindowStats``.

Contract:
  * ``WindowAccumulator.add_batch(pred_idx, confidences, uncertain, text_lengths, now)`` is called once
    per micro-batch with numpy-compatible arrays of equal length. It is vectorised (one ``bincount`` per
    batch, no per-message Python loop) and returns the windows that this batch *completed by count*
    (usually none, sometimes one; a batch larger than the window yields several).
  * A window is full at exactly ``window_count`` records: a batch that crosses the boundary is split,
    so every count-closed window has ``n == window_count``.
  * ``maybe_flush(now)`` closes a non-empty window that has been open for ``window_seconds`` or more
    (call it from a timer or after each batch); ``flush(now)`` closes it unconditionally (shutdown,
    model swap). Empty windows are never emitted.
  * Confidence bins are half-open ``[e_i, e_{i+1})`` with the last bin closed, exactly as
    ``numpy.histogram`` (which builds the manifest reference), so live and reference histograms agree.
  * ``merge_window_stats`` sums several workers' windows of one model into one window.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import numpy as np

from schemas import ModelManifest, ModelRef, WindowStats

# Same edges as training.calibrate.REFERENCE_BIN_EDGES (0..1 in steps of 0.025); duplicated rather than
# imported because the worker must not import the training package.
DEFAULT_BIN_EDGES: tuple[float, ...] = tuple(round(x, 4) for x in np.linspace(0.0, 1.0, 41))
QUANTILES: tuple[tuple[str, float], ...] = (("p10", 0.1), ("p50", 0.5), ("p90", 0.9))


class StatsMergeError(ValueError):
    """The windows cannot be merged: different models, labels or bin edges, or nothing to merge."""


def to_datetime(ts: float) -> datetime:
    """Epoch seconds → aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


def confidence_bins(confidences: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of every confidence, with ``numpy.histogram`` semantics (last bin closed, clipped)."""
    idx = np.searchsorted(edges, confidences, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


class WindowAccumulator:
    """Accumulates one worker's labelled events into windows closed by count or by time."""

    def __init__(self, model: ModelRef, labels: Sequence[str], *, worker_id: str | None = None,
                 bin_edges: Sequence[float] = DEFAULT_BIN_EDGES, window_count: int = 500,
                 window_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        if window_count < 1 or window_seconds <= 0:
            raise ValueError("window_count must be >= 1 and window_seconds > 0")
        self.model = model
        self.labels = list(labels)
        self.worker_id = worker_id or socket.gethostname()
        self.edges = np.asarray(bin_edges, dtype=np.float64)
        self.window_count = window_count
        self.window_seconds = window_seconds
        self.clock = clock
        self._reset(None)

    @classmethod
    def for_manifest(cls, manifest: ModelManifest, model: ModelRef, **kwargs: object) -> WindowAccumulator:
        """Uses the reference's bin edges when the manifest has a reference, so the monitor can compare."""
        if manifest.reference is not None and "bin_edges" not in kwargs:
            kwargs["bin_edges"] = manifest.reference.bin_edges
        return cls(model, manifest.labels, **kwargs)  # type: ignore[arg-type]

    @property
    def n(self) -> int:
        """Records in the open window."""
        return self._n

    def _reset(self, start: float | None) -> None:
        k, bins = len(self.labels), len(self.edges) - 1
        self._hist = np.zeros(k * bins, dtype=np.int64)
        self._uncertain = 0
        self._truncated = 0
        self._sum_conf = 0.0
        self._lengths: list[np.ndarray] = []
        self._n = 0
        self._start = start

    def add_batch(self, pred_idx: Sequence[int] | np.ndarray, confidences: Sequence[float] | np.ndarray,
                  uncertain: Sequence[bool] | np.ndarray, text_lengths: Sequence[int] | np.ndarray,
                  now: float | None = None, truncated: Sequence[bool] | np.ndarray | None = None,
                  ) -> list[WindowStats]:
        """Adds one batch; returns the windows it completed by count (in order).

        ``truncated`` (optional): per text, whether it was cut to the model's max_length before inference.
        """
        pred = np.asarray(pred_idx, dtype=np.int64)
        conf = np.asarray(confidences, dtype=np.float64)
        unc = np.asarray(uncertain, dtype=bool)
        lengths = np.asarray(text_lengths, dtype=np.int64)
        cut = np.zeros(len(pred), dtype=bool) if truncated is None else np.asarray(truncated, dtype=bool)
        if not (len(pred) == len(conf) == len(unc) == len(lengths) == len(cut)):
            raise ValueError("add_batch: arrays must have equal length")
        if len(pred) and (pred.min() < 0 or pred.max() >= len(self.labels)):
            raise ValueError("add_batch: predicted label index out of range")
        now = self.clock() if now is None else now
        closed: list[WindowStats] = []
        start = 0
        while start < len(pred):
            if self._start is None:
                self._start = now
            take = min(self.window_count - self._n, len(pred) - start)
            part = slice(start, start + take)
            self._add(pred[part], conf[part], unc[part], lengths[part], cut[part])
            start += take
            if self._n >= self.window_count:
                closed.append(self._emit(now))
        return closed

    def _add(self, pred: np.ndarray, conf: np.ndarray, unc: np.ndarray, lengths: np.ndarray,
             cut: np.ndarray) -> None:
        bins = len(self.edges) - 1
        flat = pred * bins + confidence_bins(conf, self.edges)
        self._hist += np.bincount(flat, minlength=len(self._hist))
        self._uncertain += int(unc.sum())
        self._truncated += int(cut.sum())
        self._sum_conf += float(conf.sum())
        self._lengths.append(lengths)
        self._n += len(pred)

    def maybe_flush(self, now: float | None = None) -> WindowStats | None:
        """Closes the open window if it is non-empty and ``window_seconds`` old; else None."""
        now = self.clock() if now is None else now
        if self._n and self._start is not None and now - self._start >= self.window_seconds:
            return self._emit(now)
        return None

    def flush(self, now: float | None = None) -> WindowStats | None:
        """Closes the open window whatever its age (shutdown, model swap); None when it is empty."""
        return self._emit(self.clock() if now is None else now) if self._n else None

    def set_model(self, model: ModelRef, labels: Sequence[str], now: float | None = None,
                  bin_edges: Sequence[float] | None = None) -> WindowStats | None:
        """Switches to a new model between batches; the old model's open window is closed and returned.

        ``bin_edges``: the new model's reference edges, when they differ from the current ones.
        """
        closed = self.flush(now)
        self.model = model
        self.labels = list(labels)
        if bin_edges is not None:
            self.edges = np.asarray(bin_edges, dtype=np.float64)
        self._reset(None)
        return closed

    def _emit(self, now: float) -> WindowStats:
        bins = len(self.edges) - 1
        hist = self._hist.reshape(len(self.labels), bins)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0)
        stats = WindowStats(
            worker_id=self.worker_id, model=self.model,
            window_start=to_datetime(self._start if self._start is not None else now), window_end=to_datetime(now),
            n=self._n, bin_edges=[float(e) for e in self.edges],
            confidence_hist={label: [int(c) for c in hist[i]] for i, label in enumerate(self.labels)},
            label_counts={label: int(hist[i].sum()) for i, label in enumerate(self.labels)},
            uncertain_count=self._uncertain, sum_confidence=self._sum_conf,
            text_length_quantiles=length_quantiles(lengths), truncated_count=self._truncated,
        )
        self._reset(None)
        return stats


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
