"""Per-worker window statistics for the drift monitor: accumulate per batch, emit ``WindowStats``.

Contract:
  * ``WindowAccumulator.add_batch(pred_idx, confidences, uncertain, text_lengths, now)`` is called once
    per micro-batch with numpy-compatible arrays of equal length (no per-message Python loop) and returns the
    windows that this batch *completed by count* (usually none, sometimes one; a batch larger than the window
    yields several).
  * A window is full at exactly ``window_count`` records: a batch that crosses the boundary is split,
    so every count-closed window has ``n == window_count``.
  * ``maybe_flush(now)`` closes a non-empty window that has been open for ``window_seconds`` or more
    (call it from a timer or after each batch); ``flush(now)`` closes it unconditionally (shutdown,
    model swap). Empty windows are never emitted.
  * A closed window is summarised by ``runtime.window_stats.summarize_window``, the function the offline
    ``drift-check`` uses too. The open window holds its records' arrays (at most ``window_count`` rows).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence

import numpy as np

from runtime.numeric import BIN_EDGES
from runtime.window_stats import summarize_window, window_edges
from schemas import ModelManifest, ModelRef, WindowStats


class WindowAccumulator:
    """Accumulates one worker's labelled events into windows closed by count or by time."""

    def __init__(self, model: ModelRef, labels: Sequence[str], *, worker_id: str | None = None,
                 bin_edges: Sequence[float] = BIN_EDGES, window_count: int = 500,
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
        """Uses the model's window edges (``runtime.window_stats.window_edges``), so the monitor can compare."""
        kwargs.setdefault("bin_edges", tuple(window_edges(manifest)))
        return cls(model, manifest.labels, **kwargs)  # type: ignore[arg-type]

    @property
    def n(self) -> int:
        """Records in the open window."""
        return self._n

    def _reset(self, start: float | None) -> None:
        self._parts: list[tuple[np.ndarray, ...]] = []
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

    def _add(self, *arrays: np.ndarray) -> None:
        self._parts.append(arrays)
        self._n += len(arrays[0])

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
        pred, conf, unc, lengths, cut = (np.concatenate(column) for column in zip(*self._parts, strict=True))
        stats = summarize_window(self.model, self.labels, self.edges, pred, conf, unc, lengths, cut,
                                 start=self._start if self._start is not None else now, end=now,
                                 worker_id=self.worker_id)
        self._reset(None)
        return stats
