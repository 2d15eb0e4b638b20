"""Long texts read as windows (issue 15): document accuracy and UNCERTAIN share on full Blitzer reviews.

    nice -n 10 .venv/bin/python -m bench.long_texts [--model models/sentiment-en] [--limit N] [--confirm]

Data: the Blitzer dev cut of the teacher mix (``training.distill.mix.build_mix``: a stratified 300 of each
domain's ``train.tsv``, seed 0), whole reviews, which no shipped model trained on (since 12-07 the default
document model trains on the *other* reviews of these files: ``training/product_rows.py``).
Each review is planned into windows once (up to ``MAX_WINDOWS``) and every window is scored once; the budgets
and aggregations below are then computed from those window scores (greedy packing is prefix-stable: the plan
for k windows is the first k windows of a longer plan). One check ties this to the served path: the default
budget and aggregation are recomputed through ``Classifier.predict`` and must agree.

Rows of the JSON printed last (per domain and pooled; accuracy = argmax correct, uncertain = confidence below
the package threshold, silent_errors = wrong and not UNCERTAIN, ece = expected calibration error over 15 bins
(pooled: the n-weighted mean of the domains'), truncated = budget exhausted):

* ``head_64``: the behaviour before issue 15 (first ``max_length`` tokens, cut mid-sentence);
* ``<aggregation>@<budget>``: every aggregation of ``runtime.chunking.AGGREGATIONS`` at each token budget;
* ``short_baseline``: the same model on *single-window reviews* (whole review ≤ ``max_length`` tokens, so
  chunking changes nothing) of the same domain: all such reviews of the domain's ``train.tsv`` (``all``,
  n ≈ 280–520 per domain) and those in the dev cut (``dev``, n ≈ 40–100). Blitzer has no sentence labels;
  these are the domain's own short texts, read whole. For a model trained on the other reviews (the default
  since 12-07) only ``dev`` is a fair baseline.

``--confirm`` also scores the mix's Blitzer training subsample (500 per domain, disjoint from the dev cut and
never used to choose the aggregation) with the served default. Since 12-07 those reviews are training data of
the default model, so for it ``--confirm`` measures training reviews.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from runtime.chunking import AGGREGATION, AGGREGATIONS, DEFAULT_TEXT_TOKEN_BUDGET, aggregate, with_specials
from runtime.inference import Classifier, bounded_text, folded
from runtime.numeric import softmax
from runtime.paths import DEFAULT_MODEL_DIR, SHARED_DATA_DIR
from training.data import BINARY, load
from training.distill.mix import BLITZER_DOMAINS, build_mix

MAX_WINDOWS = 16
BUDGETS = (64, 128, 256, 512, 1024)
BATCH = 64


def score_windows(classifier: Classifier, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """Per text: window probabilities (windows × labels), window content tokens, plan truncated at MAX_WINDOWS."""
    out = []
    specials = classifier.specials
    for lo in range(0, len(texts), BATCH):
        plans = [classifier.plan_windows(t, MAX_WINDOWS) for t in texts[lo:lo + BATCH]]
        rows = [with_specials(w, specials) for p in plans for w in p.windows]
        logits, _ = classifier.logits_for(rows)
        probs = softmax(logits, classifier.manifest.temperature, np.float32)
        start = 0
        for p in plans:
            n = len(p.windows)
            out.append((probs[start:start + n], np.array([len(w) for w in p.windows]), p.truncated))
            start += n
    return out


def head_probs(classifier: Classifier, texts: list[str]) -> np.ndarray:
    """The pre-issue-15 document pass: the first max_length tokens of each text."""
    limit = classifier.max_length
    encodings = classifier.tokenizer.encode_batch([bounded_text(folded(t, limit), limit) for t in texts])
    logits, _ = classifier.logits_for(encodings)
    return softmax(logits, classifier.manifest.temperature, np.float32)


def summary(probs: np.ndarray, labels: np.ndarray, threshold: float, truncated: np.ndarray | None = None,
            windows: np.ndarray | None = None) -> dict[str, float | int]:
    conf = probs.max(axis=1)
    row: dict[str, float | int] = {
        "n": len(labels), "accuracy": round(float((probs.argmax(axis=1) == labels).mean()), 4),
        "uncertain": round(float((conf < threshold).mean()), 4),
        "accuracy_when_certain": round(float((probs.argmax(axis=1) == labels)[conf >= threshold].mean()), 4)
        if (conf >= threshold).any() else 0.0,
    }
    # wrong and not UNCERTAIN: the errors nobody reviews (the review queue only sees UNCERTAIN events)
    row["silent_errors"] = round(float(((probs.argmax(axis=1) != labels) & (conf >= threshold)).mean()), 4)
    row["ece"] = round(expected_calibration_error(probs, labels), 4)
    if truncated is not None:
        row["truncated"] = round(float(truncated.mean()), 4)
    if windows is not None:
        row["mean_windows"] = round(float(windows.mean()), 3)
    return row


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """|accuracy - mean confidence| over equal-width confidence bins, weighted by their share of rows."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(1.0 / probs.shape[1], 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    return float(sum(abs(correct[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def evaluate(classifier: Classifier, texts: list[str], labels: np.ndarray) -> dict[str, dict]:
    threshold = classifier.manifest.threshold
    rows: dict[str, dict] = {"head_64": summary(head_probs(classifier, texts), labels, threshold)}
    scored = score_windows(classifier, texts)
    for budget in BUDGETS:
        k = max(1, budget // classifier.max_length)
        truncated = np.array([len(p) > k or cut for p, _, cut in scored])
        windows = np.array([min(len(p), k) for p, _, _ in scored])
        for name in AGGREGATIONS:
            probs = np.stack([aggregate(p[:k], t[:k], name) for p, t, _ in scored])
            rows[f"{name}@{budget}"] = summary(probs, labels, threshold, truncated, windows)
    return rows


def pooled(per_domain: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """n-weighted means over domains, row by row."""
    out: dict[str, dict] = {}
    for key in next(iter(per_domain.values())):
        rows = [d[key] for d in per_domain.values()]
        n = sum(r["n"] for r in rows)
        out[key] = {"n": n} | {m: round(sum(r[m] * r["n"] for r in rows) / n, 4)
                               for m in rows[0] if m not in ("n", "accuracy_when_certain")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--limit", type=int, default=0, help="first N dev reviews per domain (0: all 300)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--confirm", action="store_true", help="also the 500 training-subsample reviews per domain")
    args = parser.parse_args()
    started = time.time()
    classifier = Classifier.load(args.model, intra_op_threads=args.threads)
    threshold = classifier.manifest.threshold
    mix = build_mix()
    result: dict[str, object] = {"model": classifier.ref.model_dump(), "threshold": threshold,
                                 "served": {"aggregation": AGGREGATION, "text_token_budget": DEFAULT_TEXT_TOKEN_BUDGET}}
    per_domain: dict[str, dict[str, dict]] = {}
    short: dict[str, dict[str, dict]] = {}
    confirm: dict[str, dict] = {}
    limit = classifier.max_length
    for domain in BLITZER_DOMAINS:
        dev = mix.dev[f"blitzer_{domain}"][: args.limit or None]
        texts, labels = [e.text for e in dev], np.array([e.label for e in dev])
        per_domain[domain] = evaluate(classifier, texts, labels)
        served = classifier.predict(texts)  # the served path must give the default row's numbers exactly
        assert summary(served.probabilities, labels, threshold, served.truncated, served.windows) == \
            per_domain[domain][f"{AGGREGATION}@{DEFAULT_TEXT_TOKEN_BUDGET}"], "served path differs from the bench"
        everything = load(SHARED_DATA_DIR / f"amazon_multidomain_blitzer/{domain}/train.tsv", BINARY, fmt="blitzer")
        lengths = [len(e.ids) for e in classifier.tokenizer.encode_batch(everything.texts)]
        one = [i for i, n in enumerate(lengths) if n <= limit]
        dev_keys = set(texts)
        one_dev = [i for i in one if everything.texts[i] in dev_keys]
        short[domain] = {}
        for name, idx in (("all", one), ("dev", one_dev)):
            probs = classifier.predict([everything.texts[i] for i in idx]).probabilities
            short[domain][name] = summary(probs, np.array([everything.labels[i] for i in idx]), threshold)
        if args.confirm:
            rest = [e for e in mix.train if e.domain == f"blitzer_{domain}"]
            got = classifier.predict([e.text for e in rest])
            confirm[domain] = {
                "head_64": summary(head_probs(classifier, [e.text for e in rest]), np.array([e.label for e in rest]),
                                   threshold),
                "served": summary(got.probabilities, np.array([e.label for e in rest]), threshold, got.truncated,
                                  got.windows)}
        print(json.dumps({"domain": domain, "seconds": round(time.time() - started, 1)}), flush=True)
    result["dev"] = per_domain | {"pooled": pooled(per_domain)}
    result["short_baseline"] = short | {"pooled": {k: pooled({d: {k: short[d][k]} for d in short})[k]
                                                   for k in ("all", "dev")}}
    if confirm:
        result["confirm_train_subsample"] = confirm | {"pooled": pooled(confirm)}
    result["seconds"] = round(time.time() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
