"""``sentiment drift-fit``: fit a package's label-free accuracy estimator on labelled shifted samples.

The drift monitor estimates a window's accuracy without labels (drift/README.md §2): offset CBPE, with the
drop below the reference scaled by ``shift_slope`` k, an ``atc_weight`` w blend with ATC, and a
``truncation_penalty`` c per truncated text. Those constants are model-specific, so every package should
carry its own ``drift_estimator`` entry; this command measures it.

Contract:
  * Input: a package and one labelled file per domain, ``NAME=FILE`` (drift-check's format: JSONL with
    ``"text"`` and ``"label"``). The reference split (the package's own dev set) is never an input: the
    estimator is exact there by construction.
  * Each domain file is scored as **one window through the serving path** (``Classifier.predict`` →
    ``summarize_window`` → ``WindowSummary``), so the statistics are the ones the monitor sees.
  * The fit is a grid search for (w, k, c) minimising the mean |estimate − true accuracy| over domains.
    The report also gives each domain's leave-one-domain-out error (refit on the others, predict it):
    that, not the in-sample error, is what to expect on an unseen shift.
  * ``--write`` stores ``{"atc_weight", "shift_slope", "truncation_penalty", "fitted_on", "mean_abs_error",
    "loo_mean_abs_error"}`` as ``drift_estimator`` in ``manifest.json`` (an extra key the schema allows;
    the manifest hashes the other files, not itself) and verifies the package still loads.
  * stdout: one JSON object (per-domain rows, the fit, the leave-one-out errors); ``--markdown`` prints the
    table instead. Exit status 2 when the package or a file cannot be used (one line on stderr: the
    ``UserError``s ``PackageError``, ``DriftConfigError``, ``DriftFitError``).
  * Progress (``runtime.progress.Progress``, on stderr) counts the domain files' lines: a line that is not
    scored (blank, no text, no label the model knows) when it is read, a record once its batch is scored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from drift.check import label_index, read_records
from drift.reference import AccuracyEstimator, Reference, WindowSummary
from runtime.errors import UserError
from runtime.inference import Classifier
from runtime.package import read_manifest, save_manifest, verify_package
from runtime.progress import Progress
from runtime.window_stats import summarize_window, window_edges
from schemas import ModelManifest

ATC_WEIGHTS = tuple(np.round(np.arange(0.0, 1.0001, 0.1), 2))
SHIFT_SLOPES = tuple(np.round(np.arange(1.0, 2.5001, 0.05), 2))
TRUNCATION_PENALTIES = tuple(np.round(np.arange(0.0, 0.1501, 0.01), 2))


class DriftFitError(UserError, ValueError):
    """Bad input: too few domains, or a domain without labelled records."""


@dataclass(frozen=True)
class DomainWindow:
    """One labelled domain sample reduced to what the estimator reads."""

    name: str
    n: int
    accuracy: float
    truncated_rate: float
    mean_confidence: float
    summary: WindowSummary


@dataclass(frozen=True)
class Fit:
    atc_weight: float
    shift_slope: float
    truncation_penalty: float
    mean_abs_error: float


def domain_window(classifier: Classifier, ref: Reference, name: str, path: Path,
                  batch_size: int = 256, progress: Progress | None = None) -> DomainWindow:
    """Scores a labelled file as a single window (records whose label the model lacks are dropped)."""
    labels = classifier.labels
    with open(path, encoding="utf-8") as handle:
        read = list(read_records(handle, [0], progress))
    records = [r for r in read if label_index(r.label, labels) >= 0]
    if progress is not None:
        progress.update(len(read) - len(records))
    if not records:
        raise DriftFitError(f"{name}: no records with a label among {labels}")
    texts = [r.text for r in records]
    gold = np.array([label_index(r.label, labels) for r in records])
    probs, cut = [], []
    for lo in range(0, len(texts), batch_size):
        batch = texts[lo:lo + batch_size]
        predictions = classifier.predict(batch)
        probs.append(predictions.probabilities)
        cut.append(predictions.truncated)
        if progress is not None:
            progress.update(len(batch))
    probabilities, truncated = np.concatenate(probs), np.concatenate(cut)
    pred, conf = probabilities.argmax(axis=1), probabilities.max(axis=1)
    now = time.time()
    lengths = np.array([len(t) for t in texts])
    stats = summarize_window(classifier.ref, labels, window_edges(classifier.manifest), pred, conf,
                             conf < ref.threshold, lengths, truncated, start=now, end=now, worker_id="drift-fit")
    return DomainWindow(name=name, n=len(texts), accuracy=float((pred == gold).mean()),
                        truncated_rate=float(truncated.mean()), mean_confidence=float(conf.mean()),
                        summary=WindowSummary.from_stats(stats, labels))


def estimate(ref: Reference, window: DomainWindow, w: float, k: float, c: float) -> float:
    """The monitor's estimate for this window with constants (w, k, c), through ``AccuracyEstimator``."""
    estimator = AccuracyEstimator.for_reference(ref, "blend", atc_weight=w, shift_slope=k, truncation_penalty=c)
    s = window.summary
    return float(estimator.estimate(s.hist.sum(axis=0), s.sum_conf, s.n, s.truncated))


def fit(ref: Reference, windows: Sequence[DomainWindow]) -> Fit:
    """The grid point with the lowest mean |error|; ties go to the first in grid order (smallest w, k, c).

    The estimate is ``clip(ref − k·(ref − (w·atc + (1−w)·cbpe)) − c·truncated)``, so the grid is evaluated
    in one array expression from each window's plain CBPE and ATC values (``estimate`` gives the same
    number through ``AccuracyEstimator``; tests/test_drift_fit.py checks they agree).
    """
    if not windows:
        raise DriftFitError("need at least one domain to fit on")
    cbpe = np.array([estimate(ref, d, 0.0, 1.0, 0.0) for d in windows])
    atc = np.array([estimate(ref, d, 1.0, 1.0, 0.0) for d in windows])
    truncated = np.array([d.truncated_rate for d in windows])
    accuracy = np.array([d.accuracy for d in windows])
    w, k, c = (a[..., None] for a in np.meshgrid(ATC_WEIGHTS, SHIFT_SLOPES, TRUNCATION_PENALTIES, indexing="ij"))
    raw = w * atc + (1 - w) * cbpe
    est = np.clip(ref.expected_accuracy - k * (ref.expected_accuracy - raw) - c * truncated, 0.0, 1.0)
    errors = np.abs(est - accuracy).mean(axis=-1)
    i, j, m = np.unravel_index(int(np.argmin(errors)), errors.shape)
    return Fit(float(ATC_WEIGHTS[i]), float(SHIFT_SLOPES[j]), float(TRUNCATION_PENALTIES[m]), float(errors[i, j, m]))


def report(classifier: Classifier, ref: Reference, windows: Sequence[DomainWindow]) -> dict:
    """Per-domain rows with the in-sample fit's estimate and the leave-one-domain-out estimate."""
    if len(windows) < 3:
        raise DriftFitError("need at least 3 domains (leave-one-out needs 2 to fit on)")
    full = fit(ref, windows)
    rows = []
    for i, d in enumerate(windows):
        loo = fit(ref, [x for j, x in enumerate(windows) if j != i])
        rows.append({
            "domain": d.name, "n": d.n, "truncated_rate": round(d.truncated_rate, 3),
            "accuracy": round(d.accuracy, 4), "mean_confidence": round(d.mean_confidence, 4),
            "cbpe": round(estimate(ref, d, 0.0, 1.0, 0.0), 4),
            "atc": round(estimate(ref, d, 1.0, 1.0, 0.0), 4),
            "estimate": round(estimate(ref, d, full.atc_weight, full.shift_slope, full.truncation_penalty), 4),
            "loo_estimate": round(estimate(ref, d, loo.atc_weight, loo.shift_slope, loo.truncation_penalty), 4),
        })
    for row in rows:
        row["error"] = round(row["estimate"] - row["accuracy"], 4)
        row["loo_error"] = round(row["loo_estimate"] - row["accuracy"], 4)
    loo_errors = [abs(r["loo_error"]) for r in rows]
    return {
        "model": classifier.manifest.name, "version": classifier.manifest.version,
        "reference_accuracy": ref.expected_accuracy, "fit": asdict(full), "domains": rows,
        "loo_mean_abs_error": round(float(np.mean(loo_errors)), 4),
        "loo_max_abs_error": round(float(np.max(loo_errors)), 4),
    }


def markdown(result: dict) -> str:
    f = result["fit"]
    lines = [
        f"Fit (in-sample): w = {f['atc_weight']}, k = {f['shift_slope']}, c = {f['truncation_penalty']}, mean "
        f"|error| {f['mean_abs_error'] * 100:.1f} pts; leave-one-domain-out mean |error| "
        f"{result['loo_mean_abs_error'] * 100:.1f}, worst {result['loo_max_abs_error'] * 100:.1f} pts.", "",
        "| domain | n | truncated | true acc | raw CBPE | ATC | estimate | error | leave-one-out error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["domains"]:
        lines.append(f"| {r['domain']} | {r['n']} | {r['truncated_rate']:.0%} | {r['accuracy']:.3f} | {r['cbpe']:.3f} "
                     f"| {r['atc']:.3f} | {r['estimate']:.3f} | {r['error']:+.3f} | {r['loo_error']:+.3f} |")
    return "\n".join(lines)


def write_estimator(package_dir: Path, result: dict) -> None:
    """Stores the fit as ``drift_estimator`` in the manifest (validated by the schema; the hashed files are
    untouched, so nothing is re-blessed), then verifies the package again."""
    manifest = read_manifest(package_dir)
    f = result["fit"]
    estimator = {
        "atc_weight": f["atc_weight"], "shift_slope": f["shift_slope"], "truncation_penalty": f["truncation_penalty"],
        "fitted_on": [r["domain"] for r in result["domains"]],
        "mean_abs_error": f["mean_abs_error"], "loo_mean_abs_error": result["loo_mean_abs_error"],
    }
    save_manifest(package_dir, ModelManifest.model_validate({**manifest.model_dump(mode="json"),
                                                             "drift_estimator": estimator}))
    verify_package(package_dir)


def fit_package(model: Path, domains: Sequence[tuple[str, Path]], threads: int = 2, write: bool = False,
                progress: Progress | None = None) -> dict:
    """``sentiment drift-fit``: scores each (name, file) domain, fits, and with ``write`` stores the fit in the
    package's manifest; returns the report (``report``). Unusable input raises a ``UserError``."""
    classifier = Classifier.load(model, intra_op_threads=threads)
    ref = Reference.from_manifest(classifier.manifest)
    windows = [domain_window(classifier, ref, name, path, progress=progress) for name, path in domains]
    result = report(classifier, ref, windows)
    if write:
        write_estimator(model, result)
    return result
