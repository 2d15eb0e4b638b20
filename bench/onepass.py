"""One pass against three packages: labelling throughput with aspects, in one run (issue 14; a benchmark).

    nice -n 10 .venv/bin/python -m bench.onepass [--package models/sentiment-absa-en] [--n 512] [--rounds 3]

Texts: MAMS ATSA val sentences (real restaurant reviews, ≥ 2 aspects each), in micro-batches of 32, one
intra-op thread (what one worker process uses per core). Per setting, the median of ``--rounds`` passes:
  * ``today_*``: the shipped default: document model (``models/sentiment-en``) ``predict`` plus the three-package
    ``AspectStage`` (pair classifier, tagger, embedder), classify-only / auto-detection / 3 requested aspects;
  * ``onepass_*``: the one-pass package: ``predict`` (classify-only: document head only), and
    ``OnePassAspectStage.analyze`` (document + aspects from one encoder pass) with auto-detection and with 3
    requested aspects.
Ratios are to the classify-only rate of the same design and to today's classify-only rate. Also: the slowest
batch against the median batch (auto-detection), and the process's peak RSS after the one-pass settings (the
three packages are loaded last, so the first figure is the one-pass process alone).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.absa import texts_with_aspects
from runtime.categories import load_category_config
from runtime.inference import Classifier
from runtime.onepass import OnePassClassifier
from runtime.paths import DEFAULT_CATEGORIES, DEFAULT_MODEL_DIR
from worker.absa import AspectStage
from worker.onepass_stage import OnePassAspectStage

BATCH = 32


def timed(fn: Callable[[int], object], batches: int, rounds: int) -> tuple[float, list[float]]:
    """(texts/s from the median round, per-batch seconds of the last round)."""
    walls, per_batch = [], []
    for _ in range(rounds):
        per_batch = []
        start = time.perf_counter()
        for b in range(batches):
            t = time.perf_counter()
            fn(b)
            per_batch.append(time.perf_counter() - t)
        walls.append(time.perf_counter() - start)
    return batches * BATCH / statistics.median(walls), per_batch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.onepass", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", type=Path, default=Path("models/sentiment-absa-en"))
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(list(argv) if argv is not None else None)
    texts, aspects = texts_with_aspects(args.n)
    batches = len(texts) // BATCH
    chunks = [(texts[b * BATCH:(b + 1) * BATCH], aspects[b * BATCH:(b + 1) * BATCH]) for b in range(batches)]
    none = [None] * BATCH
    out: dict[str, object] = {"texts": batches * BATCH, "batch": BATCH, "threads": 1, "package": str(args.package)}

    model = OnePassClassifier.load(args.package, intra_op_threads=1)
    stage = OnePassAspectStage(model, load_category_config(DEFAULT_CATEGORIES))
    model.predict(chunks[0][0])  # warm-up
    stage.analyze(*chunks[0])
    one_classify, _ = timed(lambda b: model.predict(chunks[b][0]), batches, args.rounds)
    one_detect, detect_batches = timed(lambda b: stage.analyze(chunks[b][0], none), batches, args.rounds)
    one_three, _ = timed(lambda b: stage.analyze(*chunks[b]), batches, args.rounds)
    detected = sum(len(r) for b in range(batches) for r in stage.analyze(chunks[b][0], none)[1])
    out["onepass_peak_rss_mb"] = round(peak_rss_mb(), 1)

    doc = Classifier.load(DEFAULT_MODEL_DIR, intra_op_threads=1)
    today = AspectStage.load_default(intra_op_threads=1)
    doc.predict(chunks[0][0])
    today.analyze(*chunks[0])
    old_classify, _ = timed(lambda b: doc.predict(chunks[b][0]), batches, args.rounds)
    old_detect, _ = timed(lambda b: (doc.predict(chunks[b][0]), today.analyze(chunks[b][0], none)), batches,
                          args.rounds)
    old_three, _ = timed(lambda b: (doc.predict(chunks[b][0]), today.analyze(*chunks[b])), batches, args.rounds)
    out["peak_rss_mb_both_designs"] = round(peak_rss_mb(), 1)

    out.update({
        "today_classify_only_texts_per_s": round(old_classify, 1),
        "today_auto_detect_texts_per_s": round(old_detect, 1),
        "today_3_aspects_texts_per_s": round(old_three, 1),
        "today_ratio_auto_detect": round(old_detect / old_classify, 3),
        "today_ratio_3_aspects": round(old_three / old_classify, 3),
        "onepass_classify_only_texts_per_s": round(one_classify, 1),
        "onepass_auto_detect_texts_per_s": round(one_detect, 1),
        "onepass_3_aspects_texts_per_s": round(one_three, 1),
        "onepass_ratio_auto_detect": round(one_detect / one_classify, 3),
        "onepass_ratio_3_aspects": round(one_three / one_classify, 3),
        "onepass_auto_detect_vs_today_classify_only": round(one_detect / old_classify, 3),
        "onepass_3_aspects_vs_today_classify_only": round(one_three / old_classify, 3),
        "onepass_auto_detect_aspects_per_text": round(detected / (batches * BATCH), 2),
        "onepass_worst_batch_over_median": round(max(detect_batches) / statistics.median(detect_batches), 2),
    })
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
