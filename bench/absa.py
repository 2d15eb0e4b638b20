"""Throughput of the labeller with and without the aspect stage (a benchmark, not a test).

``python -m bench.absa [--doc-model models/sentiment-en] [--n 512] [--batch 32]``

Measures texts/s over micro-batches of real review sentences (MAMS ATSA val) for:
  * classify-only: the document classifier's ``predict`` (the ABSA package stands in when no document model is
    given: same encoder, same cost per sequence);
  * + ABSA with the request's 3 aspect terms (one ``predict_pairs`` call per batch);
  * + ABSA with automatic detection (no request aspects: categories, embedder, tagger).
Each setting runs ``--rounds`` times; the median is reported. On a shared CPU the numbers move with the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from runtime.inference import Classifier
from training.absa import data as absa_data
from worker.absa import AspectStage, default_paths


def texts_with_aspects(n: int, k: int = 3) -> tuple[list[str], list[list[str]]]:
    """MAMS val sentences (≥ 2 aspects each by construction), padded to ``k`` request aspects."""
    texts, aspects = [], []
    for s in absa_data.read_xml(absa_data.MAMS_ATSA_VAL):
        terms = list(dict.fromkeys(t.term for t in s.terms))
        terms = [*terms, "price", "service", "food"][:k]
        texts.append(s.text)
        aspects.append(terms)
        if len(texts) == n:
            break
    return texts, aspects


def rate(fn: Callable[[int], None], batches: int, batch: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for b in range(batches):
            fn(b)
        times.append(time.perf_counter() - start)
    return batches * batch / statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.absa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc-model", type=Path, help="document model package (default: the ABSA package stands in)")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(list(argv) if argv is not None else None)
    paths = default_paths()
    doc = Classifier.load(args.doc_model or paths.absa_model_dir, intra_op_threads=args.threads)
    stage = AspectStage.load_default(intra_op_threads=args.threads)
    texts, aspects = texts_with_aspects(args.n)
    batches = len(texts) // args.batch
    chunk = [(texts[b * args.batch:(b + 1) * args.batch], aspects[b * args.batch:(b + 1) * args.batch])
             for b in range(batches)]
    classify = rate(lambda b: doc.predict(chunk[b][0]), batches, args.batch, args.rounds)
    with_terms = rate(lambda b: (doc.predict(chunk[b][0]), stage.analyze(chunk[b][0], chunk[b][1])), batches,
                      args.batch, args.rounds)
    with_detect = rate(lambda b: (doc.predict(chunk[b][0]), stage.analyze(chunk[b][0], [None] * args.batch)),
                       batches, args.batch, args.rounds)
    detected = sum(len(r) for b in range(batches) for r in stage.analyze(chunk[b][0], [None] * args.batch))
    result = {"texts": batches * args.batch, "batch": args.batch, "threads": args.threads,
              "doc_model": str(args.doc_model or "absa-en (stand-in)"),
              "classify_only_texts_per_s": round(classify, 1),
              "with_absa_3_request_aspects_texts_per_s": round(with_terms, 1),
              "ratio_3_aspects": round(with_terms / classify, 3),
              "with_absa_auto_detect_texts_per_s": round(with_detect, 1),
              "ratio_auto_detect": round(with_detect / classify, 3),
              "auto_detect_aspects_per_text": round(detected / (batches * args.batch), 2)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
