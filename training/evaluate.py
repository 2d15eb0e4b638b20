"""Evaluation of a document-level model package: metrics.json, report.md and PNG plots.

Contract:
  * ``score_package(package_dir, texts)`` returns calibrated probabilities through the worker runtime
    (INT8 ONNX, ``softmax(logits / manifest.temperature)``): what is measured is what is served.
  * ``choose_threshold(probs, gold, error_cut)`` states and applies the UNCERTAIN rule: the lowest
    confidence threshold t on a 0.01 grid at which the dev accuracy of the predictions kept (confidence
    ≥ t) reaches ``accuracy + error_cut · (1 − accuracy)`` — i.e. the threshold removes ``error_cut`` of the
    errors (0.5: half) while abstaining on as little as possible. The rule text goes into the manifest.
  * ``evaluate(...)`` computes everything for one labelled split and ``write_report`` writes
    ``metrics.json``, ``report.md`` and the plots into a directory; the baselines show their progress (task
    ``baselines``: VADER, then each TF-IDF fit). Other task types (e.g. ABSA) can add their own ``evaluate_*``
    function and dispatch on ``manifest.task`` in ``training.workflow.EVALUATORS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.progress import Progress
from training.calibrate import ece
from training.data import LabeledTexts

THRESHOLD_GRID = np.round(np.arange(0.0, 1.0, 0.01), 2)
BANDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001)

SLICES: dict[str, re.Pattern[str]] = {
    "negation": re.compile(r"\b(not|no|never|nothing|nobody|none|neither|nor|cannot|without)\b|n't\b|\bn ' t\b",
                           re.IGNORECASE),
    "contrast (but/however/although)": re.compile(r"\b(but|however|although|though|yet)\b", re.IGNORECASE),
    "question": re.compile(r"\?"),
    "irony/sarcasm hashtag": re.compile(r"#(sarcas|iron|not\b)", re.IGNORECASE),
}
SHORT_WORDS = 8
LONG_WORDS = 25
SCORE_CHUNK = 1024  # texts per call in score_package: a progress step of seconds; a smaller split is one call
TFIDF_FOLDS = 5


@dataclass
class ThresholdChoice:
    threshold: float
    rule: str
    coverage: float
    selective_accuracy: float
    target_accuracy: float


@dataclass
class Evaluation:
    """All numbers for one model on one labelled split (JSON-able via ``as_dict``)."""

    model: str
    data: str
    labels: list[str]
    n: int
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]
    by_band: list[dict]
    by_threshold: list[dict]
    threshold: dict
    calibration: dict
    slices: dict[str, dict]
    baselines: dict[str, dict]
    errors: dict[str, list[dict]]
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score_package(package_dir: Path, texts: Sequence[str], threads: int = 2, progress: bool = True) -> np.ndarray:
    """Calibrated probabilities from the served INT8 model (hash-verified load), ``SCORE_CHUNK`` texts a call,
    each call a step of the progress (task ``score``)."""
    from runtime.inference import Classifier

    classifier = Classifier.load(package_dir, intra_op_threads=threads)
    parts = []
    with Progress("score", total=len(texts), enabled=progress) as bar:
        for lo in range(0, len(texts), SCORE_CHUNK):
            batch = list(texts[lo:lo + SCORE_CHUNK])
            parts.append(classifier.predict(batch).probabilities.astype(np.float64))
            bar.update(len(batch))
    return np.concatenate(parts) if parts else classifier.predict([]).probabilities.astype(np.float64)


def per_class_scores(pred: np.ndarray, gold: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per label (scikit-learn; 0.0 where a label is never predicted)."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, support = precision_recall_fscore_support(gold, pred, labels=list(range(len(labels))), zero_division=0)
    return {label: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]), "support": int(support[c])}
            for c, label in enumerate(labels)}


def headline(pred: np.ndarray, gold: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    pc = per_class_scores(pred, gold, labels)
    return {"accuracy": float((pred == gold).mean()) if len(gold) else 0.0,
            "macro_precision": float(np.mean([v["precision"] for v in pc.values()])),
            "macro_recall": float(np.mean([v["recall"] for v in pc.values()])),
            "macro_f1": float(np.mean([v["f1"] for v in pc.values()]))}


def choose_threshold(probs: np.ndarray, gold: Sequence[int], error_cut: float = 0.5) -> ThresholdChoice:
    """The UNCERTAIN threshold by the module's stated rule (see the module docstring)."""
    y = np.asarray(gold)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    accuracy = float(correct.mean())
    target = accuracy + error_cut * (1.0 - accuracy)
    chosen = None
    floor = np.ceil(100 / probs.shape[1]) / 100  # below 1/k a threshold never abstains
    grid = THRESHOLD_GRID[floor <= THRESHOLD_GRID]
    for t in grid:
        kept = conf >= t
        if kept.sum() >= max(20, 0.05 * len(y)) and correct[kept].mean() >= target:
            chosen = float(t)
            break
    if chosen is None:  # unreachable target: take the most selective grid point that keeps ≥ 5%
        candidates = [float(t) for t in grid if (conf >= t).mean() >= 0.05]
        chosen = max(candidates, key=lambda t: correct[conf >= t].mean()) if candidates else float(floor)
    kept = conf >= chosen
    rule = (f"lowest t >= 1/k on a 0.01 grid where dev accuracy of predictions with calibrated confidence >= t reaches "
            f"accuracy + {error_cut:g}*(1 - accuracy) = {target:.4f} (removes {error_cut:.0%} of errors while "
            f"abstaining as little as possible); below t the label is UNCERTAIN")
    return ThresholdChoice(threshold=chosen, rule=rule, coverage=float(kept.mean()),
                           selective_accuracy=float(correct[kept].mean()) if kept.any() else 0.0,
                           target_accuracy=target)


def band_table(conf: np.ndarray, correct: np.ndarray) -> list[dict]:
    rows = []
    lo = 0.0
    for hi in BANDS:
        sel = (conf >= lo) & (conf < hi)
        rows.append({"band": f"[{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'}", "n": int(sel.sum()),
                     "share": float(sel.mean()), "accuracy": float(correct[sel].mean()) if sel.any() else None})
        lo = hi
    return rows


def threshold_table(conf: np.ndarray, correct: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    rows = []
    for t in thresholds:
        kept = conf >= t
        rows.append({"threshold": float(t), "coverage": float(kept.mean()),
                     "accuracy": float(correct[kept].mean()) if kept.any() else None})
    return rows


def vader_predict(texts: Sequence[str], labels: Sequence[str]) -> np.ndarray | None:
    """VADER compound → label (binary: sign; 3-class: ±0.05 neutral band). None for other label sets."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    compound = np.array([analyzer.polarity_scores(t)["compound"] for t in texts])
    if list(labels) == ["NEGATIVE", "POSITIVE"]:
        return (compound >= 0).astype(int)
    if list(labels) == ["NEGATIVE", "NEUTRAL", "POSITIVE"]:
        return np.where(compound >= 0.05, 2, np.where(compound <= -0.05, 0, 1))
    return None


def tfidf_predict(test_texts: Sequence[str], test_gold: Sequence[int], train: LabeledTexts | None,
                  progress: Progress | None = None) -> tuple[np.ndarray, str]:
    """TF-IDF (word 1-2 grams) + logistic regression trained on ``train``, or 5-fold CV on the split itself
    (stratified, unshuffled folds: ``cross_val_predict``'s, fitted one by one so that ``progress`` counts them)."""
    from sklearn.base import clone
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                         LogisticRegression(max_iter=2000, C=4.0))
    texts, gold = list(test_texts), np.asarray(test_gold)
    progress = progress or Progress("tfidf", enabled=False)
    if train is not None:
        pipe.fit(train.texts, train.labels)
        progress.update()
        return pipe.predict(texts), f"trained on {train.name} ({len(train)} rows)"
    pred = np.empty(len(texts), dtype=gold.dtype)
    for fit_rows, test_rows in StratifiedKFold(TFIDF_FOLDS).split(texts, gold):
        fold = clone(pipe).fit([texts[i] for i in fit_rows], gold[fit_rows])
        pred[test_rows] = fold.predict([texts[i] for i in test_rows])
        progress.update()
    return pred, f"{TFIDF_FOLDS}-fold cross-validation on the evaluated split (no train file given)"


def slice_masks(texts: Sequence[str]) -> dict[str, np.ndarray]:
    words = np.array([len(t.split()) for t in texts])
    masks = {name: np.array([bool(p.search(t)) for t in texts]) for name, p in SLICES.items()}
    masks[f"short (<= {SHORT_WORDS} words)"] = words <= SHORT_WORDS
    masks[f"long (> {LONG_WORDS} words)"] = words > LONG_WORDS
    return masks


def confident_errors(probs: np.ndarray, gold: np.ndarray, texts: Sequence[str], labels: Sequence[str],
                     k: int = 8) -> dict[str, list[dict]]:
    """Per label L: the k most confident predictions of L whose gold label is not L (false L)."""
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    out = {}
    for c, label in enumerate(labels):
        idx = np.flatnonzero((pred == c) & (gold != c))
        idx = idx[np.argsort(-conf[idx])][:k]
        out[f"false {label}"] = [{"text": texts[i], "gold": labels[gold[i]], "confidence": round(float(conf[i]), 4)}
                                 for i in idx]
    return out


def evaluate(probs: np.ndarray, data: LabeledTexts, model_name: str, threshold: float | None = None,
             baseline_train: LabeledTexts | None = None, error_cut: float = 0.5,
             uncalibrated: np.ndarray | None = None, baselines: bool = True) -> Evaluation:
    """Every number of the report for calibrated ``probs`` on ``data``.

    ``threshold=None`` chooses one by ``choose_threshold``; a given threshold (the manifest's) is reported as is.
    """
    labels = data.label_names
    gold = np.asarray(data.labels)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    correct = pred == gold
    metrics = headline(pred, gold, labels)
    if len(labels) == 2 and len(np.unique(gold)) == 2:
        from sklearn.metrics import average_precision_score, roc_auc_score

        metrics["auc_roc"] = float(roc_auc_score(gold, probs[:, 1]))
        metrics["average_precision"] = float(average_precision_score(gold, probs[:, 1]))
    from sklearn.metrics import confusion_matrix

    confusion = confusion_matrix(gold, pred, labels=list(range(len(labels)))).tolist()
    if threshold is None:
        choice = choose_threshold(probs, gold, error_cut)
    else:
        kept = conf >= threshold
        choice = ThresholdChoice(threshold, "given (manifest)", float(kept.mean()),
                                 float(correct[kept].mean()) if kept.any() else 0.0, float("nan"))
    calibration = {"ece": ece(probs, gold), "mean_confidence": float(conf.mean())}
    if uncalibrated is not None:
        calibration["ece_uncalibrated"] = ece(uncalibrated, gold)
    base: dict[str, dict] = {}
    base_preds: dict[str, np.ndarray] = {}
    if baselines:
        with Progress("baselines", total=1 + (1 if baseline_train is not None else TFIDF_FOLDS)) as bar:
            vader = vader_predict(data.texts, labels)
            bar.update()
            if vader is not None:
                note = "compound score; 3-class: abs(compound) < 0.05 is NEUTRAL"
                base["VADER"] = {**headline(vader, gold, labels), "note": note}
                base_preds["VADER"] = vader
            tfidf, note = tfidf_predict(data.texts, gold, baseline_train, bar)
        base["TF-IDF + LogReg"] = {**headline(tfidf, gold, labels), "note": note}
        base_preds["TF-IDF + LogReg"] = tfidf
    slices = {}
    for name, mask in slice_masks(data.texts).items():
        if mask.sum() == 0:
            continue
        entry = {"n": int(mask.sum()), "model": headline(pred[mask], gold[mask], labels)["accuracy"],
                 "model_macro_recall": headline(pred[mask], gold[mask], labels)["macro_recall"],
                 "uncertain_rate": float((conf[mask] < choice.threshold).mean())}
        for bname, bpred in base_preds.items():
            entry[bname] = float((bpred[mask] == gold[mask]).mean())
        slices[name] = entry
    return Evaluation(
        model=model_name, data=data.name, labels=list(labels), n=len(gold), metrics=metrics,
        per_class=per_class_scores(pred, gold, labels), confusion=confusion, by_band=band_table(conf, correct),
        by_threshold=threshold_table(conf, correct, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]),
        threshold={"value": choice.threshold, "rule": choice.rule, "coverage": choice.coverage,
                   "selective_accuracy": choice.selective_accuracy, "target_accuracy": choice.target_accuracy,
                   "uncertain_rate": 1.0 - choice.coverage},
        calibration=calibration, slices=slices, baselines=base,
        errors=confident_errors(probs, gold, data.texts, labels),
    )


# --- plots and report -----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(ev: Evaluation, path: Path) -> None:
    plt = _plt()
    m = np.asarray(ev.confusion)
    fig, ax = plt.subplots(figsize=(4 + len(ev.labels) * 0.5, 3.5 + len(ev.labels) * 0.5))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(ev.labels)), ev.labels, rotation=30)
    ax.set_yticks(range(len(ev.labels)), ev.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"Confusion ({ev.data})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_threshold(probs: np.ndarray, gold: np.ndarray, ev: Evaluation, path: Path) -> None:
    plt = _plt()
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == gold
    grid = np.linspace(conf.min(), 0.995, 80)
    cov = [(conf >= t).mean() for t in grid]
    acc = [correct[conf >= t].mean() if (conf >= t).any() else np.nan for t in grid]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, acc, label="accuracy of kept")
    ax.plot(grid, cov, label="coverage (kept share)")
    ax.axvline(ev.threshold["value"], color="red", ls="--", label=f"UNCERTAIN threshold {ev.threshold['value']:.2f}")
    ax.set_xlabel("confidence threshold")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    ax.set_title("Accuracy and coverage by threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc_pr(probs: np.ndarray, gold: np.ndarray, path: Path) -> None:
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt = _plt()
    fpr, tpr, _ = roc_curve(gold, probs[:, 1])
    prec, rec, _ = precision_recall_curve(gold, probs[:, 1])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 4))
    a.plot(fpr, tpr)
    a.plot([0, 1], [0, 1], "k--", lw=1)
    a.set_xlabel("false positive rate")
    a.set_ylabel("true positive rate")
    a.set_title("ROC")
    b.plot(rec, prec)
    b.set_xlabel("recall")
    b.set_ylabel("precision")
    b.set_title("Precision-recall")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def render_markdown(ev: Evaluation, plots: Sequence[str], preamble: str = "") -> str:
    m = ev.metrics
    lines = [f"# Evaluation: {ev.model} on {ev.data}", ""]
    if preamble:
        lines += [preamble, ""]
    lines += [f"n = {ev.n}; runtime: INT8 ONNX through `runtime.inference.Classifier` (calibrated).", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in m.items()]
    lines += ["", "## Per class", "", "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
              for k, v in ev.per_class.items()]
    lines += ["", "## Confusion matrix (rows gold, columns predicted)", "",
              "| gold \\ pred | " + " | ".join(ev.labels) + " |", "|---" * (len(ev.labels) + 1) + "|"]
    lines += [f"| {ev.labels[i]} | " + " | ".join(str(x) for x in row) + " |" for i, row in enumerate(ev.confusion)]
    t = ev.threshold
    lines += ["", "## UNCERTAIN threshold", "", f"**t = {t['value']:.2f}**. Rule: {t['rule']}.", "",
              f"At t: coverage {_pct(t['coverage'])}%, accuracy of kept {_pct(t['selective_accuracy'])}%, "
              f"UNCERTAIN rate {_pct(t['uncertain_rate'])}%.", "",
              "### By confidence band", "", "| band | n | share % | accuracy % |", "|---|---|---|---|"]
    lines += [f"| {r['band']} | {r['n']} | {_pct(r['share'])} | {_pct(r['accuracy'])} |" for r in ev.by_band]
    lines += ["", "### By threshold", "", "| threshold | coverage % | accuracy of kept % |", "|---|---|---|"]
    lines += [f"| {r['threshold']:.2f} | {_pct(r['coverage'])} | {_pct(r['accuracy'])} |" for r in ev.by_threshold]
    c = ev.calibration
    lines += ["", "## Calibration", "", f"ECE (15 bins) after temperature scaling: {c['ece']:.4f}"
              + (f"; before: {c['ece_uncalibrated']:.4f}" if "ece_uncalibrated" in c else "")
              + f". Mean confidence {c['mean_confidence']:.4f}."]
    for key in ("temperature",):
        if key in ev.extra:
            lines.append(f"Temperature: {ev.extra[key]:.4f}.")
    if ev.baselines:
        lines += ["", "## Baselines (same split)", "", "| model | accuracy | macro recall | macro F1 | note |",
                  "|---|---|---|---|---|",
                  f"| **this model (INT8)** | {m['accuracy']:.4f} | {m['macro_recall']:.4f} | {m['macro_f1']:.4f} | |"]
        lines += [f"| {k} | {v['accuracy']:.4f} | {v['macro_recall']:.4f} | {v['macro_f1']:.4f} | {v['note']} |"
                  for k, v in ev.baselines.items()]
    if ev.slices:
        names = list(ev.baselines)  # baseline accuracy per slice
        lines += ["", "## Slices (accuracy %)", "",
                  "| slice | n | model | model macro-recall | UNCERTAIN % |" + "".join(f" {b} |" for b in names),
                  "|---" * (5 + len(names)) + "|"]
        for k, v in ev.slices.items():
            lines.append(f"| {k} | {v['n']} | {_pct(v['model'])} | {_pct(v['model_macro_recall'])} | "
                         f"{_pct(v['uncertain_rate'])} |" + "".join(f" {_pct(v.get(b))} |" for b in names))
    if "export" in ev.extra:
        lines += ["", "## INT8 export and parity gate (dev)", "",
                  "| variant | size MB | agreement with fp32 % | accuracy % | drop pt | max prob diff | s | gate |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ev.extra["export"]["variants"]:
            lines.append(f"| {r['name']}{' (chosen)' if r['name'] == ev.extra['export']['chosen'] else ''} | "
                         f"{r['size_bytes'] / 1e6:.1f} | {100 * r['agreement']:.2f} | {100 * r['accuracy']:.2f} | "
                         f"{100 * r['accuracy_drop']:.2f} | {r['max_abs_prob_diff']:.4f} | {r['seconds']:.2f} | "
                         f"{'pass' if r['passed'] else 'FAIL'} |")
        lines.append(f"\nfp32 ONNX accuracy: {100 * ev.extra['export']['fp32_accuracy']:.2f}%.")
    lines += ["", "## Most confident errors", ""]
    for kind, rows in ev.errors.items():
        lines += [f"### {kind}", ""]
        lines += [f"- ({r['confidence']:.3f}, gold {r['gold']}) {r['text'][:200]}" for r in rows] or ["- none"]
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(ev: Evaluation, probs: np.ndarray, gold: Sequence[int], out_dir: Path,
                 uncalibrated: np.ndarray | None = None, preamble: str = "", prefix: str = "") -> list[Path]:
    """Writes ``{prefix}metrics.json``, ``{prefix}report.md`` and PNGs into ``out_dir``; returns the paths."""
    from training.calibrate import reliability_diagram

    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(gold)
    plots = []
    plot_confusion(ev, out_dir / f"{prefix}confusion.png")
    plots.append(f"{prefix}confusion.png")
    plot_threshold(probs, y, ev, out_dir / f"{prefix}threshold.png")
    plots.append(f"{prefix}threshold.png")
    reliability_diagram(uncalibrated if uncalibrated is not None else probs, probs, y,
                        out_dir / f"{prefix}reliability.png", title=f"Reliability ({ev.data})")
    plots.append(f"{prefix}reliability.png")
    if len(ev.labels) == 2 and len(np.unique(y)) == 2:
        plot_roc_pr(probs, y, out_dir / f"{prefix}roc_pr.png")
        plots.append(f"{prefix}roc_pr.png")
    (out_dir / f"{prefix}metrics.json").write_text(json.dumps(ev.as_dict(), indent=2, default=_json_default) + "\n")
    (out_dir / f"{prefix}report.md").write_text(render_markdown(ev, plots, preamble), encoding="utf-8")
    return [out_dir / f"{prefix}metrics.json", out_dir / f"{prefix}report.md", *(out_dir / p for p in plots)]


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
