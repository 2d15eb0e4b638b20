"""``sentiment evaluate`` for ABSA packages on SemEval-style XML: polarity and term-extraction report.

Contract:
  * ``evaluate_absa(package_dir, manifest, options)`` has the signature of ``training.workflow.EVALUATORS``
    entries (reads ``options.input``, ``options.output``, ``options.limit``, ``options.threads`` and
    ``options.tagger``), so ``sentiment evaluate`` on a pair-classification package runs it; ``sentiment absa
    evaluate --model models/absa-en --input FILE.xml`` is the same, refusing any other task.
  * Term polarity: every gold ``(text, aspect term)`` pair (``conflict`` dropped) through
    ``Classifier.predict_pairs`` — accuracy, macro-F1, per class, confusion, the manifest's UNCERTAIN threshold
    — in the document model's report format (``training.evaluate``). Category polarity (``aspectCategory``,
    e.g. MAMS ACSA) is scored the same way when the file has categories, into ``categories-*`` files.
  * Term extraction: the BIO tagger (``--tagger``, default ``models/aspect-tagger-en`` when shipped) on
    every sentence; exact-span precision, recall and F1 against all gold terms (``conflict`` included).
  * Writes ``report.md`` + ``metrics.json`` (+ plots) into ``--output`` (default ``runs/eval/<model>-<data>``) and
    prints the headline numbers as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.paths import DEFAULT_TAGGER_DIR
from schemas import ModelManifest
from training.absa import data as absa_data
from training.absa.data import LABELS, PairExample
from training.data import LabeledTexts, short_name

if TYPE_CHECKING:
    from training.workflow import EvaluateOptions

DEFAULT_TAGGER = DEFAULT_TAGGER_DIR


def score_pairs(package_dir: Path, examples: Sequence[PairExample], threads: int) -> np.ndarray:
    from runtime.inference import Classifier

    clf = Classifier.load(package_dir, intra_op_threads=threads)
    return clf.predict_pairs([e.text for e in examples], [e.aspect for e in examples]).probabilities.astype(
        np.float64)


def extraction_scores(tagger_dir: Path, sentences: Sequence[absa_data.AbsaSentence], threads: int) -> dict:
    from runtime.absa_models import TokenTagger
    from training.absa.tagger import span_prf, tagged

    gold = tagged(sentences)
    predicted = TokenTagger.load(tagger_dir, intra_op_threads=threads).tag([s.text for s in gold])
    return {"tagger": str(tagger_dir), "sentences": len(gold), **span_prf(predicted, [g.spans for g in gold])}


def _polarity_report(package_dir: Path, manifest: ModelManifest, examples: list[PairExample], name: str,
                     out: Path, prefix: str, threads: int, preamble: str) -> dict:
    from training.evaluate import evaluate, write_report

    probs = score_pairs(package_dir, examples, threads)
    gold = np.array([LABELS.index(e.label) for e in examples])
    data = LabeledTexts([f"[{e.aspect}] {e.text}" for e in examples], gold.tolist(), list(LABELS), name)
    ev = evaluate(probs, data, f"{manifest.name} {manifest.version}", threshold=manifest.threshold, baselines=False)
    ev.threshold["rule"] = manifest.threshold_rule or "given (manifest)"
    ev.extra["temperature"] = manifest.temperature
    write_report(ev, probs, gold, out, preamble=preamble, prefix=prefix)
    return {"n": len(examples), **ev.metrics}


def evaluate_absa(package_dir: Path, manifest: ModelManifest, options: EvaluateOptions) -> Path:
    """Polarity (terms, categories) and extraction report for one XML file; returns the report directory."""
    data_path = Path(options.input)
    sentences = absa_data.read_xml(data_path)
    if options.limit:
        sentences = sentences[: options.limit]
    threads = options.threads or 2
    out = options.output or Path("runs") / "eval" / f"{manifest.name}-{short_name(data_path).replace('/', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    terms, dropped_terms = absa_data.pair_examples(sentences, data_path.stem, use_terms=True)
    cats, dropped_cats = absa_data.pair_examples(sentences, data_path.stem, use_terms=False, use_categories=True)
    tagger_dir = options.tagger or (DEFAULT_TAGGER if (DEFAULT_TAGGER / "manifest.json").exists()
                                                   else None)
    result: dict = {"out": str(out), "data": short_name(data_path), "sentences": len(sentences)}
    extraction = None
    if tagger_dir is not None and any(s.terms for s in sentences):
        extraction = extraction_scores(Path(tagger_dir), sentences, threads)
        result["term_extraction"] = extraction
    head = (f"Package `{package_dir}` ({manifest.task}); data `{short_name(data_path)}`: {len(sentences)} sentences, "
            f"{len(terms)} term pairs (dropped {dict(dropped_terms)}), {len(cats)} category pairs (dropped "
            f"{dict(dropped_cats)}). Threshold {manifest.threshold:.2f} from the manifest.")
    if extraction is not None:
        head += ("\n\n## Term extraction (tagger, exact spans)\n\n| tagger | sentences | gold terms | predicted | "
                 "precision | recall | F1 |\n|---|---|---|---|---|---|---|\n"
                 f"| `{extraction['tagger']}` | {extraction['sentences']} | {extraction['gold']} | "
                 f"{extraction['predicted']} | {100 * extraction['precision']:.2f} | "
                 f"{100 * extraction['recall']:.2f} | {100 * extraction['f1']:.2f} |")
    if terms:
        result["term_polarity"] = _polarity_report(package_dir, manifest, terms, f"{short_name(data_path)} terms",
                                                   out, "", threads, "## Term polarity\n\n" + head)
    if cats:
        prefix = "categories-" if terms else ""
        result["category_polarity"] = _polarity_report(package_dir, manifest, cats,
                                                       f"{short_name(data_path)} categories", out, prefix, threads,
                                                       "## Category polarity\n\n" + head)
    (out / "absa-summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return out
