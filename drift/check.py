"""``sentiment drift-check``: replay a file of texts through the drift detector, one JSON line per window.

Contract:
  * Input: one record per line. A JSON object needs a string ``"text"`` (other fields are ignored, except
    an optional ``"label"``); a JSON string is the text; any other line is taken as plain text. Blank
    lines, and JSON objects without a string ``text``, are skipped (counted on stderr).
  * Windows are consecutive, non-overlapping runs of ``--window`` records in file order, numbered from 0.
    The final partial window (fewer than N records) **is reported**, flagged ``"partial": true``, and is
    tested against thresholds bootstrapped for its own size, so it keeps the same false-alarm rate.
  * Each window goes through exactly the path the stream uses: ``Classifier.predict`` →
    ``summarize_window`` (→ ``WindowStats``, as the worker builds them) → ``DriftDetector.update``.
  * stdout carries only the JSON lines. ``"alert"`` is true when the detector raises a ``DriftAlert`` at
    this window, exactly when the monitor would publish one: at the start of a drift episode (and on a
    severity escalation), not on every drifted window. ``"alerts"`` names the alerted metrics and
    ``"new_alerts"`` details them. ``"drift"`` is the hysteresis state (true while any metric is in
    alarm, listed in ``"in_alarm"``); ``"exceeded"`` lists the metrics over their single-window threshold.
  * When records carry a ``"label"`` (a label name, any case, or an index into the model's labels, e.g.
    SST-2's 0/1), the window's true accuracy is printed as ``"accuracy"`` over the ``n_labelled`` records
    whose label the model knows.
  * Exit status (``sentiment drift-check``, README "Exit codes"): 0 on success, 2 when the model or the
    input cannot be read or an argument is invalid.
  * Progress (``runtime.progress.Progress``, on stderr) counts lines: a skipped one when it is read, a
    record once its window is written.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from drift.detector import DetectorConfig, DriftDetector, WindowResult
from runtime.inference import Classifier
from runtime.progress import Progress
from runtime.window_stats import summarize_window, window_edges

LABEL_ALIASES = {"pos": "POSITIVE", "positive": "POSITIVE", "neg": "NEGATIVE", "negative": "NEGATIVE",
                 "neu": "NEUTRAL", "neutral": "NEUTRAL"}


@dataclass(frozen=True)
class Record:
    text: str
    label: Any = None


def parse_line(line: str) -> Record | None:
    """One input line → Record, or None to skip it (blank, or JSON without a string text)."""
    stripped = line.strip()
    if not stripped:
        return None
    if stripped[0] in "{\"":
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return Record(line.rstrip("\r\n"))
        if isinstance(value, dict):
            text = value.get("text")
            return Record(text, value.get("label")) if isinstance(text, str) and text.strip() else None
        if isinstance(value, str):
            return Record(value) if value.strip() else None
    return Record(line.rstrip("\r\n"))


def label_index(raw: Any, labels: Sequence[str]) -> int:
    """Index of a gold label in the model's labels; -1 when absent or unknown (e.g. NEUTRAL for binary)."""
    if raw is None or isinstance(raw, bool):
        return -1
    if isinstance(raw, int):
        return raw if 0 <= raw < len(labels) else -1
    if isinstance(raw, str):
        text = raw.strip()
        if text.lstrip("-").isdigit():
            return label_index(int(text), labels)
        name = LABEL_ALIASES.get(text.lower(), text.upper())
        return labels.index(name) if name in labels else -1
    return -1


def read_records(handle: TextIO, skipped: list[int], progress: Progress | None = None) -> Iterator[Record]:
    for line in handle:
        record = parse_line(line)
        if record is None:
            skipped[0] += 1
            if progress is not None:
                progress.update()
        else:
            yield record


def windows(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    iterator = iter(records)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _round(value: float) -> float:
    return round(float(value), 6)


def window_line(result: WindowResult, window: int, start: int, size: int, label_mix: dict[str, float],
                accuracy: float | None, n_labelled: int) -> dict[str, Any]:
    """The JSON object printed for one window."""
    v, lim = result.values, result.limits
    line: dict[str, Any] = {
        "window": window, "n": result.n, "start": start, "partial": result.n < size,
        "psi": _round(v["psi_confidence"]), "psi_threshold": _round(lim["psi_confidence"]),
        "js": _round(v["label_mix_js"]), "js_threshold": _round(lim["label_mix_js"]),
        "uncertain_rate": _round(v["uncertain_rate"]), "uncertain_rate_threshold": _round(lim["uncertain_rate"]),
        "estimated_accuracy": _round(v["estimated_accuracy"]),
        "estimated_accuracy_threshold": _round(lim["estimated_accuracy"]),
        "expected_accuracy": _round(result.expected_accuracy), "mean_confidence": _round(result.mean_confidence),
        "truncated_rate": _round(result.truncated_rate),
        "label_mix": {k: _round(x) for k, x in label_mix.items()},
        "alert": bool(result.alerts), "alerts": [a.metric for a in result.alerts],
        "drift": result.alert, "in_alarm": list(result.in_alarm), "exceeded": list(result.exceeded),
        "severity": result.severity,
        "new_alerts": [{"metric": a.metric, "severity": a.severity, "value": _round(a.value),
                        "threshold": _round(a.threshold)} for a in result.alerts],
    }
    if n_labelled:
        line["accuracy"] = _round(accuracy if accuracy is not None else 0.0)
        line["n_labelled"] = n_labelled
    return line


def run(classifier: Classifier, detector: DriftDetector, records: Iterable[Record], size: int, batch_size: int,
        out: TextIO, progress: Progress | None = None) -> int:
    """Scores ``records`` window by window and writes one JSON line per window; returns the window count."""
    labels = classifier.labels
    threshold = detector.reference.threshold
    edges = window_edges(classifier.manifest)
    count, start = 0, 0
    for chunk in windows(records, size):
        texts = [r.text for r in chunk]
        pred = np.empty(len(chunk), dtype=np.int64)
        conf = np.empty(len(chunk), dtype=np.float64)
        cut = np.zeros(len(chunk), dtype=bool)
        for lo in range(0, len(texts), batch_size):
            predictions = classifier.predict(texts[lo:lo + batch_size])
            probs = predictions.probabilities
            pred[lo:lo + len(probs)] = probs.argmax(axis=1)
            conf[lo:lo + len(probs)] = probs.max(axis=1)
            cut[lo:lo + len(probs)] = predictions.truncated
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        now = time.time()
        stats = summarize_window(classifier.ref, labels, edges, pred, conf, conf < threshold, lengths, cut,
                                 start=now, end=now, worker_id="drift-check")
        if stats is None:  # unreachable: a non-empty chunk always closes or flushes a window
            raise RuntimeError("empty window")
        result = detector.update(stats)
        gold = np.array([label_index(r.label, labels) for r in chunk])
        known = gold >= 0
        accuracy = float((pred[known] == gold[known]).mean()) if known.any() else None
        mix = {label: stats.label_counts[label] / stats.n for label in labels}
        out.write(json.dumps(window_line(result, count, start, size, mix, accuracy, int(known.sum()))) + "\n")
        out.flush()
        if progress is not None:
            progress.update(len(chunk))
        count += 1
        start += len(chunk)
    return count


@dataclass(frozen=True)
class CheckOptions:
    """What ``sentiment drift-check`` passes in; None leaves ``DetectorConfig``'s default."""

    model: Path
    window: int
    batch_size: int = 256
    threshold: float | None = None
    false_alarm_rate: float | None = None
    replicates: int | None = None
    threads: int = 1


def check(options: CheckOptions, source: TextIO, out: TextIO, progress: Progress | None = None) -> tuple[int, int]:
    """Loads the model and its detector, replays ``source``; returns (windows written, lines skipped).

    A model that cannot be loaded raises ``PackageError`` (a ``UserError``), bad detector knobs ``ValueError``.
    """
    if options.window < 1 or options.batch_size < 1:
        raise ValueError("window and batch_size must be >= 1")
    classifier = Classifier.load(options.model, intra_op_threads=options.threads)
    knobs = {"threshold": options.threshold, "false_alarm_rate": options.false_alarm_rate,
             "replicates": options.replicates}
    config = DetectorConfig(**{k: v for k, v in knobs.items() if v is not None})
    detector = DriftDetector(classifier.manifest, config)
    skipped = [0]
    count = run(classifier, detector, read_records(source, skipped, progress), options.window, options.batch_size,
                out, progress)
    return count, skipped[0]
